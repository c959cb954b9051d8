"""DAX for virtio-fs: the mapper contract and the model of the live mappings. Pure.

A virtio-fs guest with a cache window (shared-memory region 0) asks the server to map file
ranges into it: FUSE_SETUPMAPPING becomes a vhost-user SHMEM_MAP, FUSE_REMOVEMAPPING a
SHMEM_UNMAP. The device glue implements :class:`DaxMapper`; the server keeps
:class:`MappingTable` so that what QEMU has mapped is always known, and unmaps all of it when
the session ends.

What Linux does (fs/fuse/dax.c, 5.10 .. 6.12), and therefore what the rules here are:

* The window is cut in 2 MiB ranges (FUSE_DAX_SHIFT 21); every SETUPMAPPING is one whole
  range: ``len = FUSE_DAX_SZ``, ``moffset = i * FUSE_DAX_SZ``, ``foffset`` a multiple of
  2 MiB, ``fh = -1`` (the server finds the file from the header's nodeid). The length is
  2 MiB even past the end of the file.
* Upgrading a read-only range to writable (fuse_upgrade_dax_mapping()) sends SETUPMAPPING
  again for the *same* moffset, with FLAG_WRITE, and no REMOVEMAPPING before it. A range
  whose REMOVEMAPPING failed goes back to the free pool all the same ("Failed to remove
  mapping" is only a warning), so a new SETUPMAPPING can land on a range the server still
  has mapped. vhost-user refuses a SHMEM_MAP over a live mapping, so the server unmaps what
  is there first (each whole: SHMEM_UNMAP must cover a whole earlier mapping), then maps.
* RELEASE leaves the inode's ranges mapped: they belong to the inode, not to the open file,
  and a later open reuses them without asking. Ranges go on reclaim and at inode eviction
  (REMOVEMAPPING), but never at unmount: virtio_kill_sb() runs fuse_conn_destroy() (DESTROY,
  then fuse_abort_conn()) before kill_anon_super() evicts the inodes, so the REMOVEMAPPINGs
  and FORGETs eviction then tries fail with -ENOTCONN inside the guest
  (inode_reclaim_dmap_range(): "if (err && err != -ENOTCONN)") and never arrive. DESTROY
  is the only word the server gets: it must unmap everything itself.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Protocol

from testbed.errors import ConfigError, StateError
from testbed.fuse.wire import DAX_RANGE, DAX_SHIFT

# off_t is signed: a file range must end at or below 2**63.
_OFF_MAX = 1 << 63


class DaxMapper(Protocol):
    """What the server needs from the device glue (SHMEM_MAP / SHMEM_UNMAP on shmid 0).

    Both return 0 on success or a positive errno, and do not raise. ``fd`` is valid only
    during the call: the mapper passes it on (SCM_RIGHTS duplicates it) before returning,
    and the server may close it right after. ``writable`` maps read-write (the host fd is
    then open for writing); otherwise read-only. ``unmap`` is only ever called with the
    exact ``(moffset, length)`` of one earlier successful ``map``.
    """

    def map(self, fd: int, foffset: int, length: int, moffset: int, writable: bool) -> int: ...

    def unmap(self, moffset: int, length: int) -> int: ...


@dataclass(frozen=True)
class LiveMapping:
    """One range of the window that QEMU has mapped: ``[moffset, moffset + length)``."""

    moffset: int
    length: int
    node: int
    foffset: int
    writable: bool

    @property
    def end(self) -> int:
        return self.moffset + self.length

    def overlaps(self, moffset: int, length: int) -> bool:
        return self.moffset < moffset + length and moffset < self.end

    def inside(self, moffset: int, length: int) -> bool:
        return moffset <= self.moffset and self.end <= moffset + length


@dataclass(frozen=True)
class DaxWindow:
    """The cache window as INIT announced it: its size and log2 of the map alignment."""

    size: int
    alignment_shift: int

    def __post_init__(self) -> None:
        if not 0 <= self.alignment_shift <= DAX_SHIFT:
            raise ConfigError(
                f"map alignment 2**{self.alignment_shift}: Linux fails the mount above "
                f"2**{DAX_SHIFT} (fs/fuse/dax.c fuse_dax_check_alignment())"
            )
        if self.size < DAX_RANGE or self.size % self.alignment:
            # dax.c fuse_dax_mem_range_init(): nr_ranges = nr_pages / FUSE_DAX_PAGES. A
            # window under 2 MiB gives the guest no range, and its DAX I/O waits forever.
            raise ConfigError(
                f"DAX window of {self.size} bytes: give at least {DAX_RANGE} (one 2 MiB "
                f"range, Linux's unit) and a multiple of {self.alignment}"
            )

    @property
    def alignment(self) -> int:
        return 1 << self.alignment_shift

    def check_range(self, moffset: int, length: int) -> int:
        """0 if ``[moffset, moffset + length)`` is a legal, aligned range of the window;
        else EINVAL. The length must be aligned too: mappings are whole pages, and an
        unaligned length would leave REMOVEMAPPING nothing exact to match."""
        align = self.alignment
        if length <= 0 or moffset % align or length % align:
            return errno.EINVAL
        if moffset + length > self.size:
            return errno.EINVAL
        return 0

    def check_file_range(self, foffset: int, length: int) -> int:
        if foffset % self.alignment or foffset + length > _OFF_MAX:
            return errno.EINVAL
        return 0


class MappingTable:
    """The live mappings by moffset. A model only: the server calls the mapper and then
    records here what succeeded."""

    def __init__(self) -> None:
        self._live: dict[int, LiveMapping] = {}

    def __len__(self) -> int:
        return len(self._live)

    def snapshot(self) -> dict[int, LiveMapping]:
        return dict(sorted(self._live.items()))

    def overlapping(self, moffset: int, length: int) -> list[LiveMapping]:
        return sorted(
            (m for m in self._live.values() if m.overlaps(moffset, length)), key=lambda m: m.moffset
        )

    def covered(self, moffset: int, length: int) -> list[LiveMapping] | None:
        """The live mappings inside ``[moffset, moffset + length)``; None if one of them
        sticks out of it (a SHMEM mapping cannot be split)."""
        hits = self.overlapping(moffset, length)
        if any(not m.inside(moffset, length) for m in hits):
            return None
        return hits

    def add(self, mapping: LiveMapping) -> None:
        if self.overlapping(mapping.moffset, mapping.length):
            raise StateError("overlaps a live mapping", "a free range", what=str(mapping))
        self._live[mapping.moffset] = mapping

    def remove(self, moffset: int) -> LiveMapping:
        return self._live.pop(moffset)

    def clear(self) -> list[LiveMapping]:
        gone = sorted(self._live.values(), key=lambda m: m.moffset)
        self._live.clear()
        return gone
