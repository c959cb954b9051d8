"""The DAX half of the FUSE server: FUSE_SETUPMAPPING and FUSE_REMOVEMAPPING.

Checks each request against the window INIT announced, calls the
:class:`testbed.fuse.dax.DaxMapper` (SHMEM_MAP/UNMAP in the device glue), and keeps the
:class:`testbed.fuse.dax.MappingTable` in step with what the mapper accepted. The rules
and where they come from in Linux are in :mod:`testbed.fuse.dax`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable

from testbed.errors import TestbedError
from testbed.fuse.codec import FuseRequest, RemovemappingArgs
from testbed.fuse.dax import DaxMapper, DaxWindow, LiveMapping, MappingTable
from testbed.fuse.host import HostFs
from testbed.fuse.structs import SetupmappingIn
from testbed.fuse.wire import NO_FH, MappingFlag, Opcode

log = logging.getLogger(__name__)

Handler = Callable[[FuseRequest], bytes | None]

WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
# What an O_RDWR open of a file we may only read fails with: permission (EACCES), an
# immutable or append-only file (EPERM), a read-only file system (EROFS), a running
# executable (ETXTBSY).
NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY})


class DaxOps:
    """SETUPMAPPING/REMOVEMAPPING for one server. ``active`` is set by INIT when the guest
    asked for DAX (FUSE_MAP_ALIGNMENT) and a mapper is there; otherwise both are ENOSYS."""

    def __init__(
        self,
        host: HostFs,
        mapper: DaxMapper | None,
        window: DaxWindow | None,
        counters: Counter[str],
    ) -> None:
        self._host = host
        self._mapper = mapper
        self.window = window
        self._counters = counters
        self.table = MappingTable()
        self.active = False

    def handlers(self) -> dict[int, Handler]:
        return {Opcode.SETUPMAPPING: self.setupmapping, Opcode.REMOVEMAPPING: self.removemapping}

    @property
    def available(self) -> bool:
        return self._mapper is not None and self.window is not None

    # --- the mapper ----------------------------------------------------------------------

    def _call(self, fn: Callable[..., int], *args: int | bool) -> int:
        try:
            code = fn(*args)
        except TestbedError as exc:  # e.g. the back-end channel closed under the glue
            log.warning("DAX mapper raised: %s", exc)
            code = errno.EIO
        if not isinstance(code, int) or code < 0:
            log.warning("DAX mapper returned %r, not 0 or an errno", code)
            code = errno.EIO
        if code:
            self._counters["mapper_failures"] += 1
        return code

    def _map(self, live: LiveMapping, fd: int) -> None:
        assert self._mapper is not None
        code = self._call(
            self._mapper.map, fd, live.foffset, live.length, live.moffset, live.writable
        )
        if code:
            raise OSError(code, "the DAX mapper refused the mapping")
        self.table.add(live)
        self._counters["maps"] += 1
        self._counters["mapped"] += live.length

    def _unmap(self, live: LiveMapping) -> None:
        assert self._mapper is not None
        code = self._call(self._mapper.unmap, live.moffset, live.length)
        if code:
            raise OSError(code, f"unmap of {live} failed")
        self.table.remove(live.moffset)
        self._counters["unmaps"] += 1
        self._counters["unmapped"] += live.length

    def unmap_all(self, *, unmap: bool) -> None:
        """End of session: every live mapping unmapped (``unmap=False``: only forgotten,
        when QEMU dropped them itself on a device reset). Failures are counted, and the
        model is empty afterwards either way: the session is over."""
        for live in self.table.snapshot().values():
            if unmap and self._mapper is not None:
                with contextlib.suppress(OSError):
                    self._unmap(live)
        self.table.clear()
        self.active = False

    # --- requests ------------------------------------------------------------------------

    def _window(self) -> DaxWindow:
        if not self.active or self.window is None:
            raise OSError(errno.ENOSYS, "no DAX window in this session")
        return self.window

    def _fd_for(self, nodeid: int, fh: int, writable: bool) -> tuple[int, bool]:
        """The fd to map, and whether it is ours to close. Linux sends fh = -1 (NO_FH):
        the node's file is opened for the mapping (``_open_for_map``)."""
        if fh == NO_FH:
            if not stat.S_ISREG(self._host.node(nodeid).mode):
                raise OSError(errno.EINVAL, "SETUPMAPPING of a non-regular file")
            return self._open_for_map(nodeid, writable), True
        handle = self._host.handle(fh)
        if handle.node != nodeid:
            raise OSError(errno.EBADF, f"handle {fh} is not open on node {nodeid}")
        if not handle.readable or (writable and not handle.writable):
            raise OSError(errno.EACCES, f"handle {fh} does not allow this mapping")
        return handle.fd, False

    def _open_for_map(self, nodeid: int, writable: bool) -> int:
        """The node's file opened O_RDWR whenever it is writable to us, also for a
        read-only mapping; O_RDONLY only for a read-only mapping of a file we may not
        write. Why: QEMU 11.1.3 maps every SHMEM_MAP's fd PROT_READ|PROT_WRITE whatever
        its flags say (known bug readonly-map-writable), so a read-only map of an
        O_RDONLY fd is refused, and Linux maps every range read-only first: each DAX read
        would fail. A shared cache's server choosing a read-write fd is what virtiofsd-style
        servers do. "Writable to us": a write bit in the file's mode (a server running as
        root honours the host's chmod a-w, though root could open it anyway) and the
        O_RDWR open succeeding (not a read-only file system, not immutable, permitted)."""
        if writable:
            return self._host.reopen(nodeid, os.O_RDWR)
        if self._host.stat(nodeid).st_mode & WRITE_BITS:
            try:
                return self._host.reopen(nodeid, os.O_RDWR)
            except OSError as exc:
                if exc.errno not in NOT_WRITABLE:
                    raise
        return self._host.reopen(nodeid, os.O_RDONLY)

    def _restore(self, live: LiveMapping) -> None:
        """Best effort: map again a mapping that was replaced by one that then failed, so
        that the guest, which still believes in it, does not read a hole."""
        try:
            fd = self._open_for_map(live.node, live.writable)
        except OSError:
            return
        try:
            self._map(live, fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def setupmapping(self, req: FuseRequest) -> bytes:
        arg = req.args_as(SetupmappingIn)
        window = self._window()
        # int(): ~ on an IntFlag complements within its members only, hiding unknown bits.
        known = int(MappingFlag.READ | MappingFlag.WRITE)
        if arg.flags & ~known or not arg.flags & known:
            raise OSError(errno.EINVAL, f"SETUPMAPPING flags 0x{arg.flags:x}")
        writable = bool(arg.flags & MappingFlag.WRITE)
        if window.check_range(arg.moffset, arg.len) or window.check_file_range(
            arg.foffset, arg.len
        ):
            raise OSError(errno.EINVAL, "SETUPMAPPING outside the window or misaligned")
        fd, ours = self._fd_for(req.nodeid, arg.fh, writable)
        replaced: list[LiveMapping] = []
        try:
            # Linux maps over a live range (an upgrade to writable, or a range whose
            # REMOVEMAPPING failed): replace what is there, each mapping whole, since
            # SHMEM_MAP over a live mapping fails.
            for live in self.table.overlapping(arg.moffset, arg.len):
                self._unmap(live)
                replaced.append(live)
            self._map(LiveMapping(arg.moffset, arg.len, req.nodeid, arg.foffset, writable), fd)
        except OSError:
            for live in replaced:
                self._restore(live)
            raise
        finally:
            if ours:
                os.close(fd)
        return b""

    def removemapping(self, req: FuseRequest) -> bytes:
        entries = req.args_as(RemovemappingArgs).entries
        window = self._window()
        plan: dict[int, LiveMapping] = {}
        for one in entries:  # every entry checked before anything is unmapped
            if window.check_range(one.moffset, one.len):
                raise OSError(errno.EINVAL, f"REMOVEMAPPING of {one} outside the window")
            covered = self.table.covered(one.moffset, one.len)
            if covered is None:
                raise OSError(errno.EINVAL, f"REMOVEMAPPING of {one} splits a live mapping")
            if not covered:
                self._counters["removals_of_nothing"] += 1
            plan.update((m.moffset, m) for m in covered)
        for live in plan.values():
            self._unmap(live)
        return b""
