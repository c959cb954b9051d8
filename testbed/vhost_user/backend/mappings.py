"""The fds QEMU hands one connection: its memory regions (SET_MEM_TABLE, ADD/REM_MEM_REG)
and the vring eventfds (SET_VRING_KICK/CALL/ERR). Each is owned here until it is replaced,
removed, or the connection ends; none is ever closed twice.

The memory table is mapped only when a ring is served (memory()), and the mapping is
dropped whenever the table changes: a device that never serves a queue never maps guest
RAM, and a served ring always sees the current table (QEMU re-sends it after a SHMEM_MAP).
"""

from __future__ import annotations

from collections.abc import Sequence

from testbed.resource import Closeable
from testbed.vhost_user.connection import OwnedFd, close_all
from testbed.vhost_user.memory import MappedMemory
from testbed.vhost_user.protocol import MemoryRegion


class Mappings(Closeable):
    def __init__(self) -> None:
        self.mem_table: list[tuple[MemoryRegion, OwnedFd]] = []
        self.vring_fds: dict[tuple[str, int], OwnedFd] = {}
        self._memory: MappedMemory | None = None

    def memory(self) -> MappedMemory:
        """The current memory table, mapped (once per table). GuestMemoryError if a
        region cannot be mapped or the regions overlap."""
        if self._memory is None:
            self._memory = MappedMemory([(r, fd.fileno()) for r, fd in self.mem_table])
        return self._memory

    def _forget_memory(self) -> None:
        memory, self._memory = self._memory, None
        if memory is not None:
            memory.close()

    def set_mem_table(self, regions: Sequence[MemoryRegion], fds: list[OwnedFd]) -> None:
        """Replace the whole table; takes the fds (one per region, in order)."""
        self._forget_memory()
        close_all(fd for _, fd in self.mem_table)
        self.mem_table = list(zip(regions, fds, strict=True))
        fds.clear()

    def add_region(self, region: MemoryRegion, fd: OwnedFd) -> None:
        self._forget_memory()
        self.mem_table.append((region, fd))

    def remove_region(self, region: MemoryRegion) -> bool:
        """Drop (and close) every region with this guest address and size; False if none."""
        self._forget_memory()
        key = (region.guest_addr, region.size)
        keep = []
        for known, fd in self.mem_table:
            if (known.guest_addr, known.size) == key:
                fd.close()
            else:
                keep.append((known, fd))
        found = len(keep) != len(self.mem_table)
        self.mem_table = keep
        return found

    def set_vring_fd(self, request: str, index: int, fd: OwnedFd | None) -> None:
        """Keep ``fd`` for (request, ring), closing the one it replaces; None = no fd now."""
        old = self.vring_fds.pop((request, index), None)
        if old is not None:
            old.close()
        if fd is not None:
            self.vring_fds[(request, index)] = fd

    def close(self) -> None:
        self._forget_memory()
        close_all(fd for _, fd in self.mem_table)
        self.mem_table.clear()
        close_all(self.vring_fds.values())
        self.vring_fds.clear()
