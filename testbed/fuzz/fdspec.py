"""The fds a case hands QEMU, and what the back-end then does to their files (pure).

An fd is written in a case as ``"<kind>[:<size>]"`` (the JSON form; older cases have
"memfd:<size>", "rofd:<size>", "socket", "pipe", which keep their meaning):

    memfd    a memfd opened read-write                        (sized)
    sealed   a memfd sealed against shrinking, growing and writing   (sized)
    file     a regular file on disk, opened O_RDWR             (sized)
    rofile   the same file opened O_RDONLY                      (sized)
    rofd     a memfd reopened O_RDONLY                          (sized)
    dir      a directory (O_RDONLY | O_DIRECTORY)
    opath    a directory opened O_PATH
    pipe     the write end of a pipe
    socket   one end of a socketpair
    eventfd  an eventfd
    chardev  /dev/zero opened O_RDWR

After the request's reply a case may act on its first fd's file while the mapping is live
(``Action.after``), each op written ``"<op>[:<arg>[:<arg>]]"``:

    truncate:N     the back-end truncates its file to N bytes (a host ftruncate)
    extend:N       ... grows it to N bytes
    punch:OFF:LEN  punches a hole (fallocate PUNCH_HOLE | KEEP_SIZE)
    write:OFF      writes 8 bytes into the file at OFF
    close          closes the fd it sent (QEMU holds its own copy)
    seal           adds F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE (memfds only)
    read:OFF       the guest reads 8 bytes through BAR 4 at OFF into the mapping (qtest)
    guestwrite:OFF the guest writes 8 bytes there (qtest)

Host ops name file offsets; guest ops name offsets inside the mapping (from shm_offset).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FdKind(enum.StrEnum):
    MEMFD = "memfd"
    SEALED = "sealed"
    FILE = "file"
    ROFILE = "rofile"
    ROFD = "rofd"
    DIR = "dir"
    OPATH = "opath"
    PIPE = "pipe"
    SOCKET = "socket"
    EVENTFD = "eventfd"
    CHARDEV = "chardev"


FILE_KINDS = frozenset({FdKind.MEMFD, FdKind.SEALED, FdKind.FILE, FdKind.ROFILE, FdKind.ROFD})
"""Kinds backed by a file of a size: what mmap(2) can map and the file oracle can read."""
READ_ONLY_KINDS = frozenset({FdKind.ROFILE, FdKind.ROFD})
"""Opened O_RDONLY: a read-only mapping (flags 0) is all mmap(2) allows of them."""
WRITE_SEALED_KINDS = frozenset({FdKind.SEALED})
"""Writable fds whose file refuses every shared writable mapping (F_SEAL_WRITE)."""
UNMAPPABLE_KINDS = frozenset({FdKind.DIR, FdKind.OPATH, FdKind.PIPE, FdKind.SOCKET, FdKind.EVENTFD})
"""mmap(2) fails on these whatever the flags: QEMU must refuse them."""


@dataclass(frozen=True)
class FdSpec:
    kind: FdKind
    size: int = 0

    @classmethod
    def parse(cls, text: str) -> FdSpec:
        kind, _, size = text.partition(":")
        return cls(FdKind(kind), int(size) if size else 0)

    def format(self) -> str:
        return f"{self.kind}:{self.size}" if self.kind in FILE_KINDS else str(self.kind)

    @property
    def has_file(self) -> bool:
        return self.kind in FILE_KINDS

    def mappable(self, writable: bool) -> bool | None:
        """Can mmap(2) map this fd MAP_SHARED, read-only or read-write? None: it depends
        on the device (a character device maps or not as its driver says)."""
        if self.kind in UNMAPPABLE_KINDS:
            return False
        if self.kind is FdKind.CHARDEV:
            return None
        if not writable:
            return True
        return self.kind not in READ_ONLY_KINDS | WRITE_SEALED_KINDS

    def describe(self) -> str:
        """The fd in words (the oracles' texts): "a read-only memfd", "a pipe"."""
        words = {
            FdKind.MEMFD: "a memfd",
            FdKind.SEALED: "a write-sealed memfd",
            FdKind.FILE: "a regular file",
            FdKind.ROFILE: "a regular file opened read-only",
            FdKind.ROFD: "a memfd opened read-only",
            FdKind.DIR: "a directory",
            FdKind.OPATH: "an O_PATH fd",
            FdKind.PIPE: "a pipe",
            FdKind.SOCKET: "a socket",
            FdKind.EVENTFD: "an eventfd",
            FdKind.CHARDEV: "a character device (/dev/zero)",
        }
        return words[self.kind]


def fd_kind_of(text: str) -> str:
    """The kind of an fd written in a case (coverage counts kinds, not sizes)."""
    return text.partition(":")[0]


class SizeClass(enum.StrEnum):
    """The file's size against the range it is asked to back (fd_offset + len)."""

    EMPTY = "empty"
    SHORTER = "shorter"
    EQUAL = "equal"
    LONGER = "longer"
    ODD = "odd"  # not a page multiple


def size_class(size: int, fd_offset: int, length: int, page: int) -> SizeClass:
    if size == 0:
        return SizeClass.EMPTY
    if size % page:
        return SizeClass.ODD
    end = fd_offset + length
    if size < end:
        return SizeClass.SHORTER
    return SizeClass.EQUAL if size == end else SizeClass.LONGER


class FileOp(enum.StrEnum):
    TRUNCATE = "truncate"
    EXTEND = "extend"
    PUNCH = "punch"
    WRITE = "write"
    CLOSE = "close"
    SEAL = "seal"
    READ = "read"
    GUEST_WRITE = "guestwrite"


GUEST_OPS = frozenset({FileOp.READ, FileOp.GUEST_WRITE})
"""Ops the guest does (through BAR 4, over qtest); the others are the back-end's."""


@dataclass(frozen=True)
class Op:
    op: FileOp
    args: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Op:
        name, *args = text.split(":")
        return cls(FileOp(name), tuple(int(a) for a in args))

    def format(self) -> str:
        return ":".join([str(self.op), *(str(a) for a in self.args)])

    def arg(self, i: int) -> int:
        return self.args[i] if i < len(self.args) else 0

    @property
    def by_guest(self) -> bool:
        return self.op in GUEST_OPS
