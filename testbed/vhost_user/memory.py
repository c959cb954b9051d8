"""Guest memory as a vhost-user back-end sees it: the regions of QEMU's memory table.

Three parts, one job each:

- :class:`RegionTable` (pure): which region holds a guest-physical range, and the guest
  address of a QEMU *user* address. vhost-user's SET_VRING_ADDR carries QEMU's user
  (virtual) addresses of the rings unless VHOST_USER_PROTOCOL_F_GPA_ADDRESSES was
  negotiated (we never offer it), so the rings are found through each region's user_addr.
- :class:`RegionMemory`: read/write over one buffer per region, through a RegionTable;
  :class:`MemoryImage` is one over bytearrays, for tests.
- :class:`MappedMemory`: the I/O part, each region's fd mmapped at its mmap_offset.

A range that is outside every region, or that crosses from one region into the next, is a
:class:`GuestMemoryError` saying which range and which regions: a buffer of a virtqueue
must lie in one region (QEMU hands out one region per contiguous RAM block, and a chain's
buffers are the driver's business to keep inside them).
"""

from __future__ import annotations

import bisect
import mmap
import os
import stat
from collections.abc import Sequence
from typing import Protocol

from testbed.errors import GuestMemoryError
from testbed.resource import Closeable
from testbed.vhost_user.protocol import MemoryRegion


class GuestMemory(Protocol):
    """What ring code needs from guest memory: bytes at guest-physical addresses."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def check(self, gpa: int, length: int) -> None:
        """GuestMemoryError unless [gpa, gpa+length) lies inside one region."""
        ...


def _describe(regions: Sequence[MemoryRegion]) -> str:
    shown = ", ".join(f"{r.guest_addr:#x}-{r.guest_addr + r.size - 1:#x}" for r in regions)
    return shown or "none"


class RegionTable:
    """The memory table's address arithmetic (pure). Regions must not overlap."""

    def __init__(self, regions: Sequence[MemoryRegion]) -> None:
        self.regions = tuple(sorted(regions, key=lambda r: r.guest_addr))
        for before, after in zip(self.regions, self.regions[1:], strict=False):
            if before.guest_addr + before.size > after.guest_addr:
                raise GuestMemoryError(
                    f"memory table regions overlap: {_describe((before, after))}; QEMU "
                    "sent a table no back-end can use"
                )
        self._starts = [r.guest_addr for r in self.regions]

    def locate(self, gpa: int, length: int) -> tuple[int, int]:
        """(index into ``regions``, offset inside it) of the range [gpa, gpa+length).

        A zero-length range touches nothing: it is accepted wherever it points (index -1).
        """
        if length == 0:
            return -1, 0
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is negative")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa >= self.regions[i].guest_addr + self.regions[i].size:
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{length:#x} is outside every region of the memory "
                f"table (regions: {_describe(self.regions)})"
            )
        region = self.regions[i]
        end = region.guest_addr + region.size
        if gpa + length > end:
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{length:#x} runs past the end of region "
                f"{region.guest_addr:#x}-{end - 1:#x} by {gpa + length - end} bytes "
                f"(regions: {_describe(self.regions)})"
            )
        return i, gpa - region.guest_addr

    def user_to_guest(self, user_addr: int, length: int) -> int:
        """The guest address of QEMU's user address ``user_addr``; the whole range
        [user_addr, user_addr+length) must lie in one region."""
        for region in self.regions:
            if region.user_addr <= user_addr < region.user_addr + region.size:
                if user_addr + length > region.user_addr + region.size:
                    raise GuestMemoryError(
                        f"user range {user_addr:#x}+{length:#x} runs past the end of the "
                        f"region at user address {region.user_addr:#x} (size {region.size:#x})"
                    )
                return region.guest_addr + (user_addr - region.user_addr)
        users = ", ".join(f"{r.user_addr:#x}+{r.size:#x}" for r in self.regions) or "none"
        raise GuestMemoryError(
            f"user address {user_addr:#x} is in no region of the memory table (user "
            f"ranges: {users}); SET_VRING_ADDR carries QEMU's user addresses"
        )


class RegionMemory:
    """GuestMemory over one writable buffer per region (bytearray, or a view of an mmap)."""

    def __init__(self, table: RegionTable, buffers: Sequence[memoryview]) -> None:
        if len(buffers) != len(table.regions):
            raise GuestMemoryError(
                f"{len(buffers)} buffers for {len(table.regions)} regions of the memory table"
            )
        self.table = table
        self._buffers = list(buffers)

    def check(self, gpa: int, length: int) -> None:
        self.table.locate(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        i, offset = self.table.locate(gpa, length)
        if i < 0:
            return b""
        return bytes(self._buffers[i][offset : offset + length])

    def write(self, gpa: int, data: bytes) -> None:
        i, offset = self.table.locate(gpa, len(data))
        if i >= 0:
            self._buffers[i][offset : offset + len(data)] = data

    def user_to_guest(self, user_addr: int, length: int) -> int:
        return self.table.user_to_guest(user_addr, length)

    def _release(self) -> None:
        for view in self._buffers:
            view.release()
        self._buffers = []


class MemoryImage(RegionMemory):
    """Guest memory held in bytearrays: one flat region by default (for tests)."""

    def __init__(
        self, size: int = 0, base: int = 0, *, regions: Sequence[MemoryRegion] | None = None
    ) -> None:
        if regions is None:
            regions = (MemoryRegion(base, size, user_addr=base, mmap_offset=0),)
        table = RegionTable(regions)
        super().__init__(table, [memoryview(bytearray(r.size)) for r in table.regions])


def _check_file_size(fd: int, region: MemoryRegion) -> None:
    """A region past the end of its file would map fine and then kill the whole process
    with SIGBUS at the first access: refuse it here instead."""
    try:
        info = os.fstat(fd)
    except OSError as exc:
        raise GuestMemoryError(f"memory region fd {fd}: {exc}") from exc
    needed = region.mmap_offset + region.size
    if stat.S_ISREG(info.st_mode) and info.st_size < needed:
        raise GuestMemoryError(
            f"the memory region at guest address {region.guest_addr:#x} needs its file up to "
            f"byte {needed:#x} (mmap_offset {region.mmap_offset:#x} + size {region.size:#x}); "
            f"the file has {info.st_size:#x} bytes"
        )


class MappedMemory(RegionMemory, Closeable):
    """The memory table's regions mmapped (shared, read-write) from their fds.

    The fds stay owned by the caller (the mmaps keep the memory alive by themselves).
    close() unmaps; idempotent.
    """

    def __init__(self, entries: Sequence[tuple[MemoryRegion, int]]) -> None:
        table = RegionTable([region for region, _ in entries])
        fds = {id(region): fd for region, fd in entries}
        self._maps: list[mmap.mmap] = []
        views: list[memoryview] = []
        try:
            for region in table.regions:
                # mmap wants a page-aligned offset: map from the page below and skip ahead.
                aligned = region.mmap_offset - region.mmap_offset % mmap.PAGESIZE
                skip = region.mmap_offset - aligned
                _check_file_size(fds[id(region)], region)
                try:
                    mapped = mmap.mmap(
                        fds[id(region)],
                        skip + region.size,
                        flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=aligned,
                    )
                except (OSError, ValueError, OverflowError) as exc:
                    raise GuestMemoryError(
                        f"cannot map the memory region at guest address "
                        f"{region.guest_addr:#x} (size {region.size:#x}, mmap_offset "
                        f"{region.mmap_offset:#x}) from its fd: {exc}"
                    ) from exc
                self._maps.append(mapped)
                views.append(memoryview(mapped)[skip : skip + region.size])
        except BaseException:
            for view in views:
                view.release()
            self._unmap()
            raise
        super().__init__(table, views)

    def _unmap(self) -> None:
        maps, self._maps = self._maps, []
        for mapped in maps:
            mapped.close()  # BufferError here would mean a view of ours is still alive

    def close(self) -> None:
        self._release()
        self._unmap()
