"""FUSE wire basics, as include/uapi/linux/fuse.h defines them (7.31 .. 7.41). Pure.

Versions, opcodes, flags, the in/out headers and the struct machinery. Each struct is a
frozen dataclass with ``pack()`` and ``unpack()``; ``unpack`` checks the exact length and
raises :class:`testbed.errors.FuseProtocolError` (carrying the bytes), never
``struct.error``. Padding, ``dummy`` and ``unused`` fields are written as zeros and ignored
when read: the kernel has turned such fields into real ones more than once
(``fuse_open_in.unused`` became ``open_flags``, ``fuse_in_header.padding`` became
``total_extlen``), so refusing non-zero padding would refuse a newer guest.

The payload structs (attributes, entries, per-opcode arguments, dirents) are in
:mod:`testbed.fuse.structs`; framing whole requests and replies is :mod:`testbed.fuse.codec`;
what a request means is :mod:`testbed.fuse.server`'s business.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

from testbed.errors import FuseProtocolError

# --- versions ----------------------------------------------------------------------------

KERNEL_VERSION = 7
# The newest minor whose structs this module speaks: Linux 6.12's uapi (7.41 added
# FUSE_ALLOW_IDMAP; no struct changed since 7.40's max_stack_depth).
MAX_MINOR = 41
# The oldest minor we serve: 7.31 brought FUSE_SETUPMAPPING/REMOVEMAPPING and map_alignment
# (Linux 5.10). Below it the reply layouts differ (FUSE_COMPAT_*_SIZE) and DAX cannot exist.
MIN_MINOR = 31
# fuse_init_in grew from 16 to 64 bytes in 7.36 (flags2, FUSE_INIT_EXT).
INIT_EXT_MINOR = 36

ROOT_ID = 1
# fs/fuse/dax.c fuse_setup_one_mapping(): "inarg.fh = -1;" -- Linux never names a handle.
NO_FH = (1 << 64) - 1

# fs/fuse/dax.c: "#define FUSE_DAX_SHIFT 21": the guest maps its window in 2 MiB ranges and
# refuses a map_alignment above it (fuse_dax_check_alignment()).
DAX_SHIFT = 21
DAX_RANGE = 1 << DAX_SHIFT


class Opcode(enum.IntEnum):
    """enum fuse_opcode (uapi). Kept whole so traces name what a guest sends."""

    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


def opcode_name(opcode: int) -> str:
    """'LOOKUP' for 1; 'UNKNOWN_99' for what uapi does not define."""
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"UNKNOWN_{opcode}"


class InitFlag(enum.IntFlag):
    """INIT flags; bits 32..63 travel in ``flags2`` when FUSE_INIT_EXT is set (7.36)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40


class SetattrValid(enum.IntFlag):
    """fuse_setattr_in.valid (FATTR_*)."""

    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


class MappingFlag(enum.IntFlag):
    """fuse_setupmapping_in.flags (FUSE_SETUPMAPPING_FLAG_*)."""

    WRITE = 1 << 0
    READ = 1 << 1


GETATTR_FH = 1 << 0  # fuse_getattr_in.getattr_flags: fh is valid
FSYNC_FDATASYNC = 1 << 0  # fuse_fsync_in.fsync_flags
ATTR_SUBMOUNT = 1 << 0  # fuse_attr.flags
ATTR_DAX = 1 << 1  # fuse_attr.flags: DAX for this inode in dax=inode mode (7.36)


def split_flags(value: int) -> tuple[int, int]:
    """(flags, flags2) for the wire: the low and high 32 bits of a 64-bit INIT flag set."""
    return value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF


def align8(n: int) -> int:
    """FUSE_REC_ALIGN: dirents are padded to a multiple of 8 bytes."""
    return (n + 7) & ~7


# --- the struct machinery ----------------------------------------------------------------


def check_len(what: str, data: bytes, expected: int) -> None:
    if len(data) != expected:
        raise FuseProtocolError(f"{what}: expected {expected} bytes, got {len(data)}", bytes(data))


class Struct:
    """A flat uapi struct: FORMAT's non-pad fields are the dataclass fields, in order. One
    that ends in another struct (``TAIL``: fuse_entry_out's fuse_attr) has it as its last
    field, after FORMAT's."""

    FORMAT: ClassVar[struct.Struct]
    NAME: ClassVar[str]
    TAIL: ClassVar[type[Struct] | None] = None

    def pack(self) -> bytes:
        values: list[Any] = [getattr(self, f.name) for f in fields(self)]  # type: ignore[arg-type]
        tail = values.pop() if self.TAIL is not None else None
        try:
            head = self.FORMAT.pack(*values)
        except struct.error as exc:
            raise FuseProtocolError(f"{self.NAME} {self}: {exc}") from exc
        return head if tail is None else head + tail.pack()

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if cls.TAIL is None:
            check_len(cls.NAME, data, cls.FORMAT.size)
            return cls(*cls.FORMAT.unpack(data))
        check_len(cls.NAME, data, cls.FORMAT.size + cls.TAIL.FORMAT.size)
        values = [*cls.FORMAT.unpack_from(data), cls.TAIL.unpack(data[cls.FORMAT.size :])]
        return cls(*values)


@dataclass(frozen=True)
class InHeader(Struct):
    """fuse_in_header; total_extlen (7.38) was padding before, so 6.1 sends zero there."""

    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int = 0
    gid: int = 0
    pid: int = 0
    total_extlen: int = 0  # extensions after the arguments, in 8-byte units

    FORMAT = struct.Struct("<IIQQIIIH2x")
    NAME = "fuse_in_header"


@dataclass(frozen=True)
class OutHeader(Struct):
    len: int
    error: int  # 0 or -errno
    unique: int

    FORMAT = struct.Struct("<IiQ")
    NAME = "fuse_out_header"
