"""The fds a case hands QEMU, made for real, and what the back-end does to their files
(I/O; the kinds and ops are testbed.fuzz.fdspec's, the judgements testbed.fuzz.oracle's).

Each fd is an ``OpenFd``: ``sent`` is what goes to QEMU over SCM_RIGHTS (the kernel gives
QEMU its own copy); ``handle`` is ours on the same file, opened read-write where the kind
allows, so that the back-end can act on a file it sent read-only (a host truncate) and the
oracle can read it after ``sent`` was closed. ``close()`` closes everything we opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from testbed.fuzz.fdspec import FdKind, FdSpec, FileOp, Op
from testbed.fuzz.oracle import MAX_IMAGE, FileImage

MEMFD_NAME = "testbed-fuzz"
"""The name of every memfd the fuzzer makes: /proc/PID/fd shows it as /memfd:testbed-fuzz."""
PATTERN = b"FUZZ\xa5\x5a\xc3\x3c"
"""What the guest writes through BAR 4 (op guestwrite): 8 bytes."""
HOST_PATTERN = b"HOST\x11\x22\x33\x44"
"""What the back-end writes into its file (op write): other bytes, so that a guest write
through a read-only mapping is never mistaken for the back-end's own."""
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def memfd(size: int, *, sealing: bool = False) -> int:
    """A memfd of ``size`` bytes (the caller closes it)."""
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0))
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class OpenFd:
    spec: FdSpec
    sent: int
    handle: int | None = None
    others: list[int] = field(default_factory=list)
    """Other fds that belong to it (a pipe's read end, a socket's peer)."""

    def close_sent(self) -> None:
        fd, self.sent = self.sent, -1
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        self.close_sent()
        for fd in [*self.others, *([self.handle] if self.handle is not None else [])]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.others.clear()
        self.handle = None

    def image(self) -> FileImage | None:
        """The file as it is now (None: no file behind this fd)."""
        if self.handle is None:
            return None
        size = os.fstat(self.handle).st_size
        data = os.pread(self.handle, size, 0) if size <= MAX_IMAGE else None
        return FileImage(size, data)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.handle, length, offset) if self.handle is not None else b""

    def apply(self, op: Op) -> str:
        """One of the back-end's ops on its file: "" when it was done, else why not (a
        sealed or read-only file refuses some; the case goes on)."""
        try:
            self._apply(op)
        except OSError as exc:
            return exc.strerror or str(exc)
        except (OverflowError, ValueError) as exc:  # a size or offset no off_t holds
            return str(exc)
        return ""

    def _apply(self, op: Op) -> None:
        if op.op is FileOp.CLOSE:
            self.close_sent()
            return
        if self.handle is None:
            raise OSError(0, f"{self.spec.describe()} has no file")
        if op.op in (FileOp.TRUNCATE, FileOp.EXTEND):
            os.ftruncate(self.handle, op.arg(0))
        elif op.op is FileOp.PUNCH:
            _punch_hole(self.handle, op.arg(0), op.arg(1))
        elif op.op is FileOp.WRITE:
            os.pwrite(self.handle, HOST_PATTERN, op.arg(0))
        elif op.op is FileOp.SEAL:
            fcntl.fcntl(self.handle, fcntl.F_ADD_SEALS, SEALS)


def open_fd(spec: FdSpec, workdir: Path) -> OpenFd:
    """Make the fd ``spec`` describes (a regular file goes into ``workdir``)."""
    kind = spec.kind
    if kind in (FdKind.MEMFD, FdKind.SEALED):
        fd = memfd(spec.size, sealing=True)
        if kind is FdKind.SEALED:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        return OpenFd(spec, fd, os.dup(fd))
    if kind is FdKind.ROFD:
        rw = memfd(spec.size)
        return OpenFd(spec, os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC), rw)
    if kind in (FdKind.FILE, FdKind.ROFILE):
        rw, path = tempfile.mkstemp(dir=workdir, prefix="file")
        os.ftruncate(rw, spec.size)
        if kind is FdKind.FILE:
            return OpenFd(spec, os.dup(rw), rw)
        return OpenFd(spec, os.open(path, os.O_RDONLY | os.O_CLOEXEC), rw)
    if kind is FdKind.DIR:
        return OpenFd(spec, os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    if kind is FdKind.OPATH:
        return OpenFd(spec, os.open(workdir, os.O_PATH | os.O_CLOEXEC))
    if kind is FdKind.PIPE:
        r, w = os.pipe2(os.O_CLOEXEC)
        return OpenFd(spec, w, others=[r])
    if kind is FdKind.SOCKET:
        a, b = socket.socketpair()
        return OpenFd(spec, a.detach(), others=[b.detach()])
    if kind is FdKind.EVENTFD:
        return OpenFd(spec, os.eventfd(0, os.EFD_CLOEXEC))
    return OpenFd(spec, os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC))


def open_fds(texts: tuple[str, ...], workdir: Path) -> list[OpenFd]:
    """The fds of one request, in order; on a failure the ones made so far are closed."""
    out: list[OpenFd] = []
    try:
        for text in texts:
            out.append(open_fd(FdSpec.parse(text), workdir))
    except BaseException:
        for made in out:
            made.close()
        raise
    return out


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): the os module has no mode argument."""
    libc = ctypes.CDLL(None, use_errno=True)
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
