"""Stand-ins for the FUSE tests. ``Guest`` plays a Linux virtio-fs guest: requests packed by
hand from include/uapi/linux/fuse.h, replies unpacked by hand, independent of testbed.fuse's own
encoders, so that a layout mistake there cannot hide behind the same mistake here.

``FakeMapper`` plays QEMU's side of SHMEM_MAP/UNMAP and its rules.

The INIT flag sets are what fs/fuse/inode.c fuse_send_init() offers in Linux 6.1 (7.37)
and 6.12 (7.41) for a virtiofs mount (fc->auto_submounts is set by virtio_fs_get_tree()).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testbed.fuse.server import FuseServer

IN_HDR = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HDR = struct.Struct("<IiQ")  # len error unique
ATTR = "QQQQQQIIIIIIIIII"  # ino size blocks a/m/ctime a/m/ctimensec mode nlink uid gid rdev
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR)  # 128 bytes
ATTR_OUT = struct.Struct("<QII" + ATTR)  # 104 bytes
INIT_IN = struct.Struct("<IIIII11I")  # major minor max_readahead flags flags2 unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHII6I")  # ... max_pages map_alignment flags2 max_stack
OPEN_OUT = struct.Struct("<QII")
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")
DIRENT = struct.Struct("<QQII")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
SETUPMAPPING_IN = struct.Struct("<QQQQQ")  # fh foffset len flags moffset

# Opcodes (enum fuse_opcode).
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
MKDIR, UNLINK, RMDIR, RENAME = 9, 10, 11, 12
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
GETXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 22, 25, 26, 27, 28, 29
ACCESS, CREATE, INTERRUPT, DESTROY = 34, 35, 36, 38
BATCH_FORGET, READDIRPLUS, RENAME2 = 42, 44, 45
SETUPMAPPING, REMOVEMAPPING, SYNCFS = 48, 49, 50

NO_FH = 2**64 - 1
MiB = 1 << 20
O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_EXCL, O_TRUNC = 0, 1, 2, 0o100, 0o200, 0o1000
X86_O_LARGEFILE = 0o100000
ARM64_O_LARGEFILE = 0o400000  # x86_64's O_NOFOLLOW: must not reach the host as that


def _bits(*numbers: int) -> int:
    return sum(1 << n for n in numbers)


# fuse_send_init() in 6.1: ASYNC_READ .. EXPLICIT_INVAL_DATA (bits 0-25 but FILE_OPS),
# HANDLE_KILLPRIV_V2 (28), SETXATTR_EXT (29), INIT_EXT (30), SECURITY_CTX (32), plus
# SUBMOUNTS (27) for virtiofs; MAP_ALIGNMENT (26) with a DAX window; HAS_INODE_DAX (33)
# unless mounted dax=always or dax=never.
LINUX_6_1 = _bits(*(b for b in range(26) if b != 2), 27, 28, 29, 30, 32)
# 6.12 adds CREATE_SUPP_GROUP (34), HAS_EXPIRE_ONLY (35), DIRECT_IO_ALLOW_MMAP (36),
# PASSTHROUGH (37, CONFIG_FUSE_PASSTHROUGH), NO_EXPORT_SUPPORT (38), HAS_RESEND (39),
# ALLOW_IDMAP (40).
LINUX_6_12 = LINUX_6_1 | _bits(34, 35, 36, 37, 38, 39, 40)
MAP_ALIGNMENT = 1 << 26
INIT_EXT = 1 << 30
HAS_INODE_DAX = 1 << 33


@dataclass(frozen=True)
class Entry:
    nodeid: int
    ino: int
    size: int
    mode: int
    flags: int


def name_arg(name: bytes) -> bytes:
    return name + b"\0"


def read_in(fh: int, offset: int, size: int) -> bytes:
    return READ_IN.pack(fh, offset, size, 0, 0, 0o100000, 0)


class Guest:
    """Sends requests to a FuseServer the way the guest kernel lays them out."""

    def __init__(self, server: FuseServer) -> None:
        self.server = server
        self.unique = 0

    def raw(self, data: bytes) -> bytes | None:
        return self.server.handle(data)

    def send(
        self, opcode: int, nodeid: int = 1, body: bytes = b"", ext: bytes = b""
    ) -> tuple[int, bytes]:
        """(errno, payload); errno 0 on success."""
        self.unique += 2
        head = IN_HDR.pack(
            IN_HDR.size + len(body) + len(ext), opcode, self.unique, nodeid, 0, 0, 42,
            len(ext) // 8, 0,
        )  # fmt: skip
        reply = self.server.handle(head + body + ext)
        assert reply is not None, f"opcode {opcode} got no reply"
        length, error, unique = OUT_HDR.unpack_from(reply)
        assert length == len(reply) and unique == self.unique
        assert error <= 0
        if error:
            assert length == OUT_HDR.size
        return -error, reply[OUT_HDR.size :]

    def ok(self, opcode: int, nodeid: int = 1, body: bytes = b"") -> bytes:
        code, payload = self.send(opcode, nodeid, body)
        assert code == 0, f"opcode {opcode}: {errno.errorcode.get(code, code)}"
        return payload

    def error(self, opcode: int, nodeid: int = 1, body: bytes = b"") -> int:
        code, _ = self.send(opcode, nodeid, body)
        return code

    def no_reply(self, opcode: int, nodeid: int, body: bytes) -> None:
        self.unique += 2
        head = IN_HDR.pack(IN_HDR.size + len(body), opcode, self.unique, nodeid, 0, 0, 0, 0, 0)
        assert self.server.handle(head + body) is None

    def init(self, flags: int = LINUX_6_12, minor: int = 41) -> dict[str, int]:
        body = INIT_IN.pack(7, minor, 128 * 1024, flags & 0xFFFFFFFF, flags >> 32, *[0] * 11)
        out = INIT_OUT.unpack(self.ok(INIT, 0, body))
        names = "major minor max_readahead flags max_background congestion_threshold "
        names += "max_write time_gran max_pages map_alignment flags2 max_stack_depth"
        fields = dict(zip(names.split(), out, strict=False))
        fields["all_flags"] = fields["flags"] | (fields["flags2"] << 32)
        return fields

    @staticmethod
    def entry(payload: bytes) -> Entry:
        values = ENTRY_OUT.unpack(payload[: ENTRY_OUT.size])
        return Entry(values[0], values[6], values[7], values[15], values[21])

    def lookup(self, parent: int, name: bytes) -> Entry:
        return self.entry(self.ok(LOOKUP, parent, name_arg(name)))

    def getattr(self, nodeid: int) -> tuple[int, ...]:
        return ATTR_OUT.unpack(self.ok(GETATTR, nodeid, struct.pack("<IIQ", 0, 0, 0)))

    def open(self, nodeid: int, flags: int = O_RDONLY | X86_O_LARGEFILE) -> int:
        return int(OPEN_OUT.unpack(self.ok(OPEN, nodeid, struct.pack("<II", flags, 0)))[0])

    def opendir(self, nodeid: int = 1) -> int:
        return int(OPEN_OUT.unpack(self.ok(OPENDIR, nodeid, struct.pack("<II", 0o204000, 0)))[0])

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        return self.ok(READ, nodeid, read_in(fh, offset, size))

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        body = WRITE_IN.pack(fh, offset, len(data), 0, 0, 0o100001, 0) + data
        return int(struct.unpack("<II", self.ok(WRITE, nodeid, body))[0])

    def create(self, parent: int, name: bytes, mode: int = 0o100644) -> tuple[Entry, int]:
        flags = O_CREAT | O_RDWR | X86_O_LARGEFILE
        body = struct.pack("<IIII", flags, mode, 0o022, 0) + name_arg(name)
        payload = self.ok(CREATE, parent, body)
        fh = OPEN_OUT.unpack(payload[ENTRY_OUT.size :])[0]
        return self.entry(payload), int(fh)

    def release(self, nodeid: int, fh: int, opcode: int = RELEASE) -> None:
        self.ok(opcode, nodeid, struct.pack("<QIIQ", fh, 0o100000, 0, 0))

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.no_reply(FORGET, nodeid, struct.pack("<Q", nlookup))

    def readdir(self, fh: int, offset: int, size: int = 4096, *, plus: bool) -> list[tuple]:
        """Parsed entries: (off, name, type, nodeid or None)."""
        payload = self.ok(READDIRPLUS if plus else READDIR, 1, read_in(fh, offset, size))
        out = []
        pos = 0
        while pos < len(payload):
            nodeid = None
            if plus:
                nodeid = ENTRY_OUT.unpack_from(payload, pos)[0]
                pos += ENTRY_OUT.size
            _ino, off, namelen, dtype = DIRENT.unpack_from(payload, pos)
            name = payload[pos + DIRENT.size : pos + DIRENT.size + namelen]
            record = (DIRENT.size + namelen + 7) & ~7
            assert payload[pos + DIRENT.size + namelen : pos + record].strip(b"\0") == b""
            pos += record
            assert pos % 8 == 0
            out.append((off, name, dtype, nodeid))
        return out

    def setattr_size(self, nodeid: int, size: int, fh: int | None = None) -> tuple[int, ...]:
        valid = 1 << 3 | ((1 << 6) if fh is not None else 0)
        body = SETATTR_IN.pack(valid, 0, fh or 0, size, *[0] * 12)
        return ATTR_OUT.unpack(self.ok(SETATTR, nodeid, body))

    def setupmapping(
        self, nodeid: int, foffset: int, moffset: int, *, write: bool = False,
        length: int = 2 * MiB, fh: int = NO_FH, flags: int | None = None,
    ) -> int:  # fmt: skip
        if flags is None:
            flags = 0b10 | (0b01 if write else 0)  # FLAG_READ, FLAG_WRITE
        body = SETUPMAPPING_IN.pack(fh, foffset, length, flags, moffset)
        return self.error(SETUPMAPPING, nodeid, body)

    def removemapping(self, nodeid: int, *ranges: tuple[int, int]) -> int:
        # fuse_removemapping_in is a lone u32: the entries start at offset 4, unpadded.
        body = struct.pack("<I", len(ranges)) + b"".join(struct.pack("<QQ", *r) for r in ranges)
        return self.error(REMOVEMAPPING, nodeid, body)

    def destroy(self) -> None:
        assert self.ok(DESTROY, 0) == b""


class FakeMapper:
    """Plays QEMU's side: records each call (and what the fd holds), answers from the
    queued results (0 once the queue is empty), and checks QEMU's rules in ``live()``."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.map_results: list[int] = []
        self.unmap_results: list[int] = []

    def map(self, fd: int, foffset: int, length: int, moffset: int, writable: bool) -> int:
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        head = os.pread(fd, 8, foffset)
        result = self.map_results.pop(0) if self.map_results else 0
        self.calls.append(("map", moffset, length, foffset, writable, access, head, result))
        return result

    def unmap(self, moffset: int, length: int) -> int:
        result = self.unmap_results.pop(0) if self.unmap_results else 0
        self.calls.append(("unmap", moffset, length, result))
        return result

    def live(self) -> dict[int, int]:
        """What QEMU would have mapped after the successful calls: moffset -> length."""
        live: dict[int, int] = {}
        for call in self.calls:
            if call[-1]:
                continue
            if call[0] == "map":
                assert call[1] not in live, "SHMEM_MAP over a live mapping"
                live[call[1]] = call[2]
            else:
                assert live.pop(call[1]) == call[2], "SHMEM_UNMAP not of a whole mapping"
        return live


def fd_count() -> int:
    """This process's open fds: the tests compare it before and after a server's life."""
    return len(os.listdir("/proc/self/fd"))
