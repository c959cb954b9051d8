"""A FUSE file server over a host directory, speaking virtio-fs requests, with DAX.

``FuseServer.handle(request) -> reply`` takes the device-readable bytes of one chain and
returns the bytes for its device-writable buffers (None for FORGET, BATCH_FORGET and
INTERRUPT, which have none). It knows nothing of virtqueues; the device glue moves bytes
and implements :class:`testbed.fuse.dax.DaxMapper` with SHMEM_MAP/UNMAP.

This module owns the session (INIT, DESTROY, reset), the dispatch and the counters; the
operations are :mod:`testbed.fuse.fileops` and :mod:`testbed.fuse.daxops`. Errors the
guest caused come back as FUSE error replies: ``handle`` lets no OSError, struct error or
malformed request out (a malformed request is answered EPROTO and kept in
``protocol_errors``). Only a chain too short to hold an in-header, which cannot be
answered, raises :class:`testbed.errors.FuseProtocolError`.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import ConfigError, FuseProtocolError, StateError
from testbed.fuse.codec import (
    NO_REPLY,
    FuseRequest,
    decode_header,
    decode_request,
    encode_error,
    encode_reply,
)
from testbed.fuse.dax import DaxMapper, DaxWindow, LiveMapping
from testbed.fuse.daxops import DaxOps, Handler
from testbed.fuse.fileops import FileOps
from testbed.fuse.host import HostFs
from testbed.fuse.structs import InitIn, InitOut
from testbed.fuse.wire import (
    INIT_EXT_MINOR,
    KERNEL_VERSION,
    MAX_MINOR,
    MIN_MINOR,
    InHeader,
    InitFlag,
    Opcode,
    opcode_name,
    split_flags,
)
from testbed.resource import Closeable

log = logging.getLogger(__name__)

# What we accept of what the guest offers. Left out on purpose: WRITEBACK_CACHE (writes
# go straight to the host file), POSIX/FLOCK locks (the guest keeps them locally),
# READDIRPLUS_AUTO (so every listing is READDIRPLUS, deterministically), SECURITY_CTX and
# CREATE_SUPP_GROUP (no request extensions), SUBMOUNTS, EXPORT_SUPPORT, PASSTHROUGH.
BASE_FLAGS = (
    InitFlag.ASYNC_READ
    | InitFlag.ATOMIC_O_TRUNC
    | InitFlag.BIG_WRITES
    | InitFlag.DO_READDIRPLUS
    | InitFlag.MAX_PAGES
)
# struct virtio_fs_config: "__u8 tag[36]", not necessarily NUL-terminated.
TAG_MAX = 36
# Linux's max_write is counted in its own pages; 4 KiB on the guests we run.
GUEST_PAGE = 4096


class SessionState(enum.Enum):
    NEW = "new"  # no INIT yet, or after DESTROY / reset
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True)
class Negotiated:
    """What INIT settled: the minor in use and the flags the server replied with."""

    minor: int
    flags: int  # 64-bit InitFlag set
    max_write: int
    max_pages: int
    map_alignment: int | None  # log2; None without DAX
    inode_dax: bool

    @property
    def dax(self) -> bool:
        return self.map_alignment is not None


@dataclass(frozen=True)
class FuseStats:
    requests: dict[str, int]  # by opcode name, every request received
    errors: dict[str, int]  # error replies by opcode name
    bytes_read: int  # data served by READ
    bytes_written: int  # data taken by WRITE
    maps: int  # successful map() calls
    unmaps: int  # successful unmap() calls (REMOVEMAPPING, replacement, DESTROY, close)
    bytes_mapped: int
    bytes_unmapped: int
    live_mappings: int
    mapper_failures: int  # map()/unmap() errnos or exceptions
    removals_of_nothing: int  # REMOVEMAPPING entries that covered no live mapping
    protocol_errors: int


class FuseServer(Closeable):
    """A FUSE server over ``share``; DAX when ``mapper`` and ``window_size`` are given.

    ``tag`` is the virtio-fs tag the device announces. ``map_alignment`` (log2) defaults
    to the host page size: SHMEM_MAP mmaps the file, so offsets must be page-aligned.
    ``inode_dax`` answers FUSE_HAS_INODE_DAX and marks regular files FUSE_ATTR_DAX, so a
    guest mounted without ``dax=always`` (dax=inode, the default) uses DAX too.
    ``timeout`` is how long the guest may cache entries and attributes, in seconds.
    """

    def __init__(
        self,
        share: Path,
        mapper: DaxMapper | None = None,
        *,
        tag: str,
        window_size: int = 0,
        map_alignment: int | None = None,
        max_pages: int = 32,
        timeout: float = 1.0,
        inode_dax: bool = False,
    ) -> None:
        encoded = tag.encode()
        if not encoded or len(encoded) > TAG_MAX or b"\0" in encoded:
            raise ConfigError(f"virtio-fs tag {tag!r}: 1..{TAG_MAX} bytes of UTF-8, no NUL")
        if (mapper is None) != (window_size == 0):
            raise ConfigError("DAX needs both a mapper and a window size (or neither)")
        if not 1 <= max_pages <= 256:
            raise ConfigError(f"max_pages {max_pages}: Linux accepts 1..256")
        if timeout < 0:
            raise ConfigError(f"timeout {timeout}: must be >= 0")
        shift = map_alignment
        if shift is None:
            shift = os.sysconf("SC_PAGE_SIZE").bit_length() - 1
        window = DaxWindow(window_size, shift) if mapper is not None else None
        self.tag = tag
        self._max_pages = max_pages
        self._want_inode_dax = inode_dax
        self._counters: Counter[str] = Counter()
        self._host = HostFs(share)
        self._files = FileOps(self._host, self._counters, timeout=timeout)
        self._dax = DaxOps(self._host, mapper, window, self._counters)
        self._handlers: dict[int, Handler] = {
            Opcode.INIT: self._init,
            Opcode.DESTROY: self._destroy,
            Opcode.INTERRUPT: self._interrupt,
            **self._files.handlers(),
            **self._dax.handlers(),
        }
        self._lock = threading.Lock()
        self._state = SessionState.NEW
        self._negotiated: Negotiated | None = None
        self._requests: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._protocol_errors: list[FuseProtocolError] = []

    # --- the public face -----------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def negotiated(self) -> Negotiated | None:
        return self._negotiated

    @property
    def mappings(self) -> dict[int, LiveMapping]:
        """The live mappings by moffset: what QEMU has mapped right now."""
        return self._dax.table.snapshot()

    @property
    def held_fds(self) -> int:
        """Host fds held: the share's root, one per looked-up node, one per open handle."""
        return self._host.held_fds

    @property
    def protocol_errors(self) -> tuple[FuseProtocolError, ...]:
        return tuple(self._protocol_errors)

    @property
    def stats(self) -> FuseStats:
        c = self._counters
        return FuseStats(
            requests=dict(self._requests),
            errors=dict(self._errors),
            bytes_read=c["read"],
            bytes_written=c["written"],
            maps=c["maps"],
            unmaps=c["unmaps"],
            bytes_mapped=c["mapped"],
            bytes_unmapped=c["unmapped"],
            live_mappings=len(self._dax.table),
            mapper_failures=c["mapper_failures"],
            removals_of_nothing=c["removals_of_nothing"],
            protocol_errors=len(self._protocol_errors),
        )

    def handle(self, request: bytes) -> bytes | None:
        """Serve one request; the reply bytes, or None when the opcode has no reply."""
        with self._lock:
            if self._state is SessionState.CLOSED:
                raise StateError(self._state, "open", what="FuseServer")
            header = decode_header(request)  # too short to answer: raises
            self._requests[opcode_name(header.opcode)] += 1
            try:
                req = decode_request(request)
            except FuseProtocolError as exc:
                log.warning("malformed FUSE request: %s", exc)
                self._protocol_errors.append(exc)
                return self._fail(header, errno.EPROTO)
            return self._dispatch(req)

    def reset(self, *, unmap: bool) -> None:
        """End the session without DESTROY (the device was reset, the guest is gone).

        ``unmap=False`` when QEMU dropped the mappings itself (a device reset does): the
        model is cleared without calling the mapper."""
        with self._lock:
            if self._state is not SessionState.CLOSED:
                self._end_session(unmap=unmap)

    def close(self) -> None:
        """Unmap every live mapping and close every host fd. Idempotent."""
        with self._lock:
            if self._state is SessionState.CLOSED:
                return
            self._end_session(unmap=True)
            self._host.close()
            self._state = SessionState.CLOSED

    # --- dispatch ------------------------------------------------------------------------

    def _fail(self, header: InHeader, code: int) -> bytes | None:
        self._errors[opcode_name(header.opcode)] += 1
        if header.opcode in NO_REPLY:
            return None
        return encode_error(header.unique, code)

    def _dispatch(self, req: FuseRequest) -> bytes | None:
        if self._state is SessionState.NEW and req.opcode != Opcode.INIT:
            # libfuse answers EIO to anything before INIT; so do we.
            return self._fail(req.header, errno.EIO)
        handler = self._handlers.get(req.opcode)
        if handler is None:
            return self._fail(req.header, errno.ENOSYS)
        try:
            payload = handler(req)
        except OSError as exc:
            return self._fail(req.header, exc.errno or errno.EIO)
        except OverflowError:  # a value the host's off_t / time_t cannot hold
            return self._fail(req.header, errno.EINVAL)
        if payload is None or req.opcode in NO_REPLY:
            return None
        return encode_reply(req.unique, payload)

    # --- session -------------------------------------------------------------------------

    def _init(self, req: FuseRequest) -> bytes:
        arg = req.args_as(InitIn)
        if self._state is SessionState.READY:
            raise OSError(errno.EPROTO, "second INIT in one session")
        if arg.major > KERNEL_VERSION:
            # uapi "Version negotiation": reply with our major and wait for a new INIT.
            return InitOut(KERNEL_VERSION, MAX_MINOR).pack()
        if arg.major < KERNEL_VERSION or arg.minor < MIN_MINOR:
            raise OSError(errno.EPROTO, f"FUSE {arg.major}.{arg.minor} is older than 7.31")
        # uapi: "If the major versions match then both shall use the smallest of the two
        # minor versions"; the kernel takes the minor we reply with as fc->minor.
        minor = min(arg.minor, MAX_MINOR)
        offered = arg.all_flags
        want = int(BASE_FLAGS)
        # The guest offers MAP_ALIGNMENT when it has a window and DAX is not "never";
        # without a mapper we stay silent and answer SETUPMAPPING with ENOSYS.
        dax = self._dax.available and bool(offered & InitFlag.MAP_ALIGNMENT)
        if dax:
            want |= InitFlag.MAP_ALIGNMENT
            if self._want_inode_dax:
                want |= InitFlag.HAS_INODE_DAX
        if offered & InitFlag.INIT_EXT and minor >= INIT_EXT_MINOR:
            want |= InitFlag.INIT_EXT
        flags = offered & want
        if not flags & InitFlag.INIT_EXT:
            flags &= 0xFFFFFFFF  # without flags2 the high bits cannot travel
        lo, hi = split_flags(flags)
        window = self._dax.window
        shift = window.alignment_shift if dax and window is not None else None
        max_write = self._max_pages * GUEST_PAGE
        self._negotiated = Negotiated(
            minor=minor,
            flags=flags,
            max_write=max_write,
            max_pages=self._max_pages,
            map_alignment=shift,
            inode_dax=bool(flags & InitFlag.HAS_INODE_DAX),
        )
        self._files.inode_dax = self._negotiated.inode_dax
        self._files.atomic_o_trunc = bool(flags & InitFlag.ATOMIC_O_TRUNC)
        self._dax.active = dax
        self._state = SessionState.READY
        return InitOut(
            major=KERNEL_VERSION,
            minor=minor,
            max_readahead=arg.max_readahead,
            flags=lo,
            max_write=max_write,
            time_gran=1,
            max_pages=self._max_pages if flags & InitFlag.MAX_PAGES else 0,
            map_alignment=shift or 0,
            flags2=hi,
        ).pack()

    def _destroy(self, req: FuseRequest) -> bytes:
        # Linux unmounts with DESTROY and nothing else: no REMOVEMAPPING, no FORGET for
        # what is still cached (see testbed.fuse.dax). Everything goes here.
        self._end_session(unmap=True)
        return b""

    def _interrupt(self, req: FuseRequest) -> None:
        # Requests are served one at a time, so the one to interrupt has been answered
        # already; virtio-fs never sends INTERRUPT anyway (virtio_fs.c: "TODO interrupts").
        return None

    def _end_session(self, *, unmap: bool) -> None:
        self._dax.unmap_all(unmap=unmap)
        self._host.reset()
        self._files.inode_dax = self._files.atomic_o_trunc = False
        self._negotiated = None
        self._state = SessionState.NEW
