"""The driver's side of a split virtqueue (pure): what a guest's virtio driver writes into
guest memory, and how it reads completions back.

Test support: where no guest driver runs, the qtest tests (tests/test_*_qemu.py) play one
over qtest memory accesses and the unit tests over a MemoryImage. Both use this class, so
the ring layout is written once for each side (testbed.vhost_user.virtqueue is the
device's side, the product's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from testbed.errors import StateError
from testbed.vhost_user.memory import GuestMemory
from testbed.vhost_user.virtqueue import (
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    U16,
    USED_ELEM,
    Descriptor,
    RingLayout,
    avail_ring_bytes,
    desc_table_bytes,
    used_ring_bytes,
)

_IDX_MASK = 0xFFFF


@dataclass(frozen=True)
class Used:
    """One completion read back from the used ring."""

    id: int
    length: int


class DriverQueue:
    """Places chains in the descriptor table, makes them available, reads the used ring."""

    def __init__(self, memory: GuestMemory, layout: RingLayout) -> None:
        self.memory = memory
        self.layout = layout
        self.avail_idx = 0
        self.last_used = 0
        self._free = list(range(layout.size))
        self._chains: dict[int, list[int]] = {}

    def reset(self) -> None:
        """Zero the three areas (a fresh ring)."""
        size = self.layout.size
        self.memory.write(self.layout.desc, bytes(desc_table_bytes(size)))
        self.memory.write(self.layout.avail, bytes(avail_ring_bytes(size)))
        self.memory.write(self.layout.used, bytes(used_ring_bytes(size)))

    def write_descriptor(self, index: int, desc: Descriptor, table: int | None = None) -> None:
        """Write one descriptor as it is (bad ones too): entry ``index`` of the queue's
        table, or of the indirect table at ``table``."""
        base = self.layout.desc if table is None else table
        self.memory.write(base + DESC.size * index, desc.pack())

    def add(
        self,
        readable: Sequence[tuple[int, int]] = (),
        writable: Sequence[tuple[int, int]] = (),
        *,
        indirect_table: int | None = None,
    ) -> int:
        """Chain (addr, length) buffers, readable first, and return the head. With
        ``indirect_table``: the buffers go to an indirect table written at that address and
        the queue spends one descriptor on it. The chain is not yet available: expose()."""
        buffers = [(a, n, 0) for a, n in readable] + [(a, n, DESC_F_WRITE) for a, n in writable]
        if not buffers:
            raise StateError("no buffers", "at least one buffer", "DriverQueue.add")
        if indirect_table is not None:
            for i, (addr, length, flags) in enumerate(buffers):
                more = DESC_F_NEXT if i + 1 < len(buffers) else 0
                self.write_descriptor(
                    i, Descriptor(addr, length, flags | more, i + 1 if more else 0), indirect_table
                )
            buffers = [(indirect_table, DESC.size * len(buffers), DESC_F_INDIRECT)]
        if len(buffers) > len(self._free):
            raise StateError(
                f"{len(self._free)} free descriptors", f"{len(buffers)}", "DriverQueue.add"
            )
        indices = [self._free.pop(0) for _ in buffers]
        for i, (addr, length, flags) in enumerate(buffers):
            last = i + 1 == len(buffers)
            nxt = 0 if last else indices[i + 1]
            self.write_descriptor(
                indices[i], Descriptor(addr, length, flags | (0 if last else DESC_F_NEXT), nxt)
            )
        self._chains[indices[0]] = indices
        return indices[0]

    def expose(self, head: int) -> None:
        """Make chain ``head`` available: the ring entry first, then the index."""
        slot = self.avail_idx % self.layout.size
        self.memory.write(self.layout.avail + 4 + 2 * slot, U16.pack(head))
        self.avail_idx = (self.avail_idx + 1) & _IDX_MASK
        self.memory.write(self.layout.avail + 2, U16.pack(self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write(self.layout.avail, U16.pack(flags))

    def set_used_event(self, value: int) -> None:
        self.memory.write(self.layout.avail + 4 + 2 * self.layout.size, U16.pack(value))

    def used_idx(self) -> int:
        return int(U16.unpack(self.memory.read(self.layout.used + 2, 2))[0])

    def avail_event(self) -> int:
        at = self.layout.used + 4 + USED_ELEM.size * self.layout.size
        return int(U16.unpack(self.memory.read(at, 2))[0])

    def take_used(self) -> list[Used]:
        """The completions published since the last call; their descriptors are free again."""
        out: list[Used] = []
        end = self.used_idx()
        while self.last_used != end:
            slot = self.last_used % self.layout.size
            at = self.layout.used + 4 + USED_ELEM.size * slot
            elem = Used(*USED_ELEM.unpack(self.memory.read(at, USED_ELEM.size)))
            self._free.extend(self._chains.pop(elem.id, []))
            out.append(elem)
            self.last_used = (self.last_used + 1) & _IDX_MASK
        return out
