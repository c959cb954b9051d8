"""A reproducible initramfs: newc cpio written in Python, gzip'ed with mtime 0 (pure).

Every entry is owned by uid/gid 0 with mtime 0 and entries are sorted by path, parents
before children, so the same inputs give byte-identical archives on any machine and under
any user (no root needed to make root-owned files).
"""

from __future__ import annotations

import gzip
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from testbed.errors import ProvisionError

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. `path` is relative ("bin/busybox"), no leading slash."""

    path: str
    mode: int  # full st_mode: type bits | permission bits
    data: bytes = b""  # file contents, or the target of a symlink

    @classmethod
    def directory(cls, path: str, perm: int = 0o755) -> CpioEntry:
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, path: str, target: str) -> CpioEntry:
        return cls(path, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, path: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(path, stat.S_IFCHR | perm, f"{major}:{minor}".encode())


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(
    ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int], namesize: int
) -> bytes:
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], namesize, 0]
    return _MAGIC + b"".join(b"%08x" % f for f in fields)


def _record(
    ino: int, name: str, mode: int, nlink: int, body: bytes, rdev: tuple[int, int]
) -> bytes:
    encoded = name.encode() + b"\0"
    head = _header(ino, mode, nlink, len(body), rdev, len(encoded))
    # newc: header + name padded to 4 (counting the 110-byte header), then data padded to 4
    return head + encoded + _pad4(len(head) + len(encoded)) + body + _pad4(len(body))


def with_parents(entries: Iterable[CpioEntry]) -> list[CpioEntry]:
    """Entries plus a 0755 directory for each missing parent, sorted by path.

    Duplicate paths are an error: two packages must not silently race for one file.
    """
    by_path: dict[str, CpioEntry] = {}
    for entry in entries:
        path = entry.path.strip("/")
        if not path or ".." in path.split("/"):
            raise ProvisionError(f"initramfs entry with a bad path: {entry.path!r}")
        if path in by_path:
            raise ProvisionError(f"initramfs entry {path!r} added twice")
        by_path[path] = CpioEntry(path, entry.mode, entry.data)
    for path in list(by_path):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            existing = by_path.get(parent)
            if existing is None:
                by_path[parent] = CpioEntry.directory(parent)
            elif not stat.S_ISDIR(existing.mode):
                raise ProvisionError(f"initramfs: {parent!r} is both a file and a directory")
    # sorting the path components (not the strings) keeps parents before children
    return [by_path[p] for p in sorted(by_path, key=lambda p: p.split("/"))]


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """The newc archive (uncompressed) of `entries` and their parent directories."""
    out = bytearray()
    for ino, entry in enumerate(with_parents(entries), start=1):
        rdev = (0, 0)
        body = entry.data
        if stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode):
            major, minor = (int(x) for x in entry.data.decode().split(":"))
            rdev, body = (major, minor), b""
        elif stat.S_ISDIR(entry.mode):
            body = b""
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        out += _record(ino, entry.path, entry.mode, nlink, body, rdev)
    out += _record(0, _TRAILER, 0, 1, b"", (0, 0))
    return bytes(out)


def gzip_reproducible(data: bytes) -> bytes:
    """gzip with mtime 0 and no file name, so equal input gives equal output."""
    return gzip.compress(data, compresslevel=6, mtime=0)


def compress_initrd(data: bytes, compression: str) -> bytes:
    """The cpio as the kernel gets it: "gzip" (reproducible) or "none" (as is)."""
    if compression == "gzip":
        return gzip_reproducible(data)
    if compression == "none":
        return data
    raise ProvisionError(f"unknown initrd compression {compression!r}: use gzip or none")


def read_initrd(data: bytes) -> list[CpioEntry]:
    """The entries of an initrd written by compress_initrd (gzip'ed or not)."""
    return read_cpio(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (for tests and `images show`); stops at the trailer."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != _MAGIC:
            raise ProvisionError(f"not a newc cpio archive at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmajor, rminor, namesize = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body_start = name_start + namesize + (-(110 + namesize) % 4)
        body = data[body_start : body_start + size]
        pos = body_start + size + (-size % 4)
        if name == _TRAILER:
            return entries
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            body = f"{rmajor}:{rminor}".encode()
        entries.append(CpioEntry(name, mode, body))
