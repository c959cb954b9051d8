"""The payload structs of FUSE requests and replies (include/uapi/linux/fuse.h). Pure.

Layouts as Linux 6.1 (7.37) and 6.12 (7.41) send and expect them; the machinery, the
headers and the rules for padding are in :mod:`testbed.fuse.wire`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from testbed.errors import FuseProtocolError
from testbed.fuse.wire import INIT_EXT_MINOR, InitFlag, Struct, align8


@dataclass(frozen=True)
class Attr(Struct):
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int = 0

    FORMAT = struct.Struct("<QQQQQQIIIIIIIIII")
    NAME = "fuse_attr"


@dataclass(frozen=True)
class EntryOut(Struct):
    """fuse_entry_out: LOOKUP, CREATE, MKDIR replies and the head of each direntplus."""

    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int
    attr_valid_nsec: int
    attr: Attr

    FORMAT = struct.Struct("<QQQQII")
    NAME = "fuse_entry_out"
    TAIL = Attr
    SIZE: ClassVar[int] = FORMAT.size + Attr.FORMAT.size  # 128


@dataclass(frozen=True)
class AttrOut(Struct):
    attr_valid: int
    attr_valid_nsec: int
    attr: Attr

    FORMAT = struct.Struct("<QI4x")
    NAME = "fuse_attr_out"
    TAIL = Attr
    SIZE: ClassVar[int] = FORMAT.size + Attr.FORMAT.size  # 104


@dataclass(frozen=True)
class InitIn(Struct):
    """fuse_init_in: 16 bytes up to 7.35, 64 from 7.36 (flags2 + unused[11])."""

    major: int
    minor: int
    max_readahead: int
    flags: int
    flags2: int = 0

    FORMAT = struct.Struct("<IIIII44x")
    COMPAT: ClassVar[struct.Struct] = struct.Struct("<IIII")
    NAME = "fuse_init_in"

    @property
    def all_flags(self) -> int:
        """The 64-bit flag set: flags2 counts only when FUSE_INIT_EXT says it is there."""
        if self.flags & InitFlag.INIT_EXT:
            return self.flags | (self.flags2 << 32)
        return self.flags

    def pack(self) -> bytes:
        if self.minor < INIT_EXT_MINOR and not self.flags2:
            try:
                return self.COMPAT.pack(self.major, self.minor, self.max_readahead, self.flags)
            except struct.error as exc:
                raise FuseProtocolError(f"{self.NAME} {self}: {exc}") from exc
        return super().pack()

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) == cls.COMPAT.size:
            return cls(*cls.COMPAT.unpack(data))
        if len(data) != cls.FORMAT.size:
            raise FuseProtocolError(
                f"{cls.NAME}: expected {cls.COMPAT.size} or {cls.FORMAT.size} bytes, "
                f"got {len(data)}",
                bytes(data),
            )
        return cls(*cls.FORMAT.unpack(data))


@dataclass(frozen=True)
class InitOut(Struct):
    """fuse_init_out, 64 bytes (7.23+); max_stack_depth is 7.40's passthrough field."""

    major: int
    minor: int
    max_readahead: int = 0
    flags: int = 0
    max_background: int = 0
    congestion_threshold: int = 0
    max_write: int = 0
    time_gran: int = 0
    max_pages: int = 0
    map_alignment: int = 0
    flags2: int = 0
    max_stack_depth: int = 0

    FORMAT = struct.Struct("<IIIIHHIIHHII24x")
    NAME = "fuse_init_out"

    @property
    def all_flags(self) -> int:
        if self.flags & InitFlag.INIT_EXT:
            return self.flags | (self.flags2 << 32)
        return self.flags


@dataclass(frozen=True)
class ForgetIn(Struct):
    nlookup: int
    FORMAT = struct.Struct("<Q")
    NAME = "fuse_forget_in"


@dataclass(frozen=True)
class ForgetOne(Struct):
    nodeid: int
    nlookup: int
    FORMAT = struct.Struct("<QQ")
    NAME = "fuse_forget_one"


@dataclass(frozen=True)
class BatchForgetIn(Struct):
    count: int
    FORMAT = struct.Struct("<I4x")
    NAME = "fuse_batch_forget_in"


@dataclass(frozen=True)
class GetattrIn(Struct):
    getattr_flags: int
    fh: int
    FORMAT = struct.Struct("<I4xQ")
    NAME = "fuse_getattr_in"


@dataclass(frozen=True)
class SetattrIn(Struct):
    valid: int
    fh: int = 0
    size: int = 0
    lock_owner: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    atimensec: int = 0
    mtimensec: int = 0
    ctimensec: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    FORMAT = struct.Struct("<I4xQQQQQQIIII4xII4x")
    NAME = "fuse_setattr_in"


@dataclass(frozen=True)
class OpenIn(Struct):
    flags: int  # the guest's O_* flags, in the guest architecture's numbering
    open_flags: int = 0  # FUSE_OPEN_KILL_SUIDGID (7.33)
    FORMAT = struct.Struct("<II")
    NAME = "fuse_open_in"


@dataclass(frozen=True)
class OpenOut(Struct):
    fh: int
    open_flags: int = 0  # FOPEN_*
    FORMAT = struct.Struct("<QI4x")
    NAME = "fuse_open_out"


@dataclass(frozen=True)
class CreateIn(Struct):
    flags: int
    mode: int
    umask: int
    open_flags: int = 0
    FORMAT = struct.Struct("<IIII")
    NAME = "fuse_create_in"


@dataclass(frozen=True)
class MkdirIn(Struct):
    mode: int
    umask: int
    FORMAT = struct.Struct("<II")
    NAME = "fuse_mkdir_in"


@dataclass(frozen=True)
class RenameIn(Struct):
    newdir: int
    FORMAT = struct.Struct("<Q")
    NAME = "fuse_rename_in"


@dataclass(frozen=True)
class Rename2In(Struct):
    newdir: int
    flags: int
    FORMAT = struct.Struct("<QI4x")
    NAME = "fuse_rename2_in"


@dataclass(frozen=True)
class ReleaseIn(Struct):
    fh: int
    flags: int = 0
    release_flags: int = 0
    lock_owner: int = 0
    FORMAT = struct.Struct("<QIIQ")
    NAME = "fuse_release_in"


@dataclass(frozen=True)
class FlushIn(Struct):
    fh: int
    lock_owner: int = 0
    FORMAT = struct.Struct("<Q8xQ")
    NAME = "fuse_flush_in"


@dataclass(frozen=True)
class ReadIn(Struct):
    """fuse_read_in: READ, READDIR and READDIRPLUS."""

    fh: int
    offset: int
    size: int
    read_flags: int = 0
    lock_owner: int = 0
    flags: int = 0
    FORMAT = struct.Struct("<QQIIQI4x")
    NAME = "fuse_read_in"


@dataclass(frozen=True)
class WriteIn(Struct):
    fh: int
    offset: int
    size: int
    write_flags: int = 0
    lock_owner: int = 0
    flags: int = 0
    FORMAT = struct.Struct("<QQIIQI4x")
    NAME = "fuse_write_in"


@dataclass(frozen=True)
class WriteOut(Struct):
    size: int
    FORMAT = struct.Struct("<I4x")
    NAME = "fuse_write_out"


@dataclass(frozen=True)
class Kstatfs(Struct):
    """fuse_kstatfs, the whole of fuse_statfs_out."""

    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int
    FORMAT = struct.Struct("<QQQQQIII4x24x")
    NAME = "fuse_kstatfs"


@dataclass(frozen=True)
class FsyncIn(Struct):
    fh: int
    fsync_flags: int = 0
    FORMAT = struct.Struct("<QI4x")
    NAME = "fuse_fsync_in"


@dataclass(frozen=True)
class GetxattrIn(Struct):
    """fuse_getxattr_in (GETXATTR, LISTXATTR); the same layout is fuse_getxattr_out."""

    size: int
    FORMAT = struct.Struct("<I4x")
    NAME = "fuse_getxattr_in"


@dataclass(frozen=True)
class AccessIn(Struct):
    mask: int
    FORMAT = struct.Struct("<I4x")
    NAME = "fuse_access_in"


@dataclass(frozen=True)
class InterruptIn(Struct):
    unique: int
    FORMAT = struct.Struct("<Q")
    NAME = "fuse_interrupt_in"


@dataclass(frozen=True)
class SetupmappingIn(Struct):
    fh: int  # NO_FH from Linux: the server picks the file from the header's nodeid
    foffset: int
    len: int
    flags: int  # MappingFlag
    moffset: int
    FORMAT = struct.Struct("<QQQQQ")
    NAME = "fuse_setupmapping_in"


@dataclass(frozen=True)
class RemovemappingIn(Struct):
    """fuse_removemapping_in is one u32: the entries that follow start at offset 4, unpadded
    (dax.c fuse_send_removemapping(): "in_args[0].size = sizeof(*inargp)")."""

    count: int
    FORMAT = struct.Struct("<I")
    NAME = "fuse_removemapping_in"


@dataclass(frozen=True)
class RemovemappingOne(Struct):
    moffset: int
    len: int
    FORMAT = struct.Struct("<QQ")
    NAME = "fuse_removemapping_one"


# --- directory entries -------------------------------------------------------------------

_DIRENT = struct.Struct("<QQII")


@dataclass(frozen=True)
class Dirent:
    """fuse_dirent: ino, off (the cookie of the NEXT entry), namelen, type (DT_*), name,
    padded with zeros to 8 bytes (FUSE_DIRENT_ALIGN)."""

    ino: int
    off: int
    type: int
    name: bytes

    HEAD: ClassVar[int] = _DIRENT.size  # FUSE_NAME_OFFSET, 24

    @staticmethod
    def size_for(name: bytes) -> int:
        return align8(_DIRENT.size + len(name))

    def pack(self) -> bytes:
        try:
            head = _DIRENT.pack(self.ino, self.off, len(self.name), self.type)
        except struct.error as exc:
            raise FuseProtocolError(f"fuse_dirent {self}: {exc}") from exc
        raw = head + self.name
        return raw + b"\0" * (self.size_for(self.name) - len(raw))


@dataclass(frozen=True)
class Direntplus:
    """fuse_direntplus: a fuse_entry_out, then a fuse_dirent (FUSE_DIRENTPLUS_SIZE)."""

    entry: EntryOut
    dirent: Dirent

    @staticmethod
    def size_for(name: bytes) -> int:
        return align8(EntryOut.SIZE + _DIRENT.size + len(name))

    def pack(self) -> bytes:
        return self.entry.pack() + self.dirent.pack()
