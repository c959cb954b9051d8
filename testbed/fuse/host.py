"""The host side of the FUSE server: the share, its nodes and open handles, as host fds.

Nothing here resolves a path string from the share's root: every node holds an
``O_PATH | O_NOFOLLOW`` fd, children are opened relative to their parent's fd with
``O_NOFOLLOW``, and a node is reopened for I/O through ``/proc/self/fd/N``, which reaches
the pinned inode itself rather than a path. Only regular files and directories are ever
reopened, so a symlink in the share is never followed, and a name is one path component
(``/``, ``.`` and ``..`` are refused by the server before they get here).

Failures are ``OSError`` with an errno; the server turns them into error replies.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from testbed.errors import ConfigError, HostCapabilityError
from testbed.fuse.structs import Attr, Kstatfs
from testbed.fuse.wire import ATTR_DAX, ROOT_ID
from testbed.resource import Closeable

# Open flags as the guest sends them (fuse_open_in.flags, fuse_create_in.flags): the
# guest's O_* numbering. x86_64 and arm64 share asm-generic/fcntl.h for these and differ
# only in O_DIRECTORY, O_NOFOLLOW, O_DIRECT and O_LARGEFILE (arm64 O_LARGEFILE is x86_64
# O_NOFOLLOW), so only these bits are read and everything else is dropped.
GUEST_O_ACCMODE = 0o3
GUEST_O_CREAT = 0o100
GUEST_O_EXCL = 0o200
GUEST_O_TRUNC = 0o1000
GUEST_O_DSYNC = 0o10000
GUEST_O_SYNC = 0o4000000  # __O_SYNC; O_SYNC is __O_SYNC | O_DSYNC
_HOST_ACCMODE = {0: os.O_RDONLY, 1: os.O_WRONLY, 2: os.O_RDWR}


def host_open_flags(guest_flags: int, *, truncate: bool) -> int:
    """Host flags for a guest open. Dropped on purpose: O_APPEND (the guest computes the
    offset of every WRITE itself, and a host O_APPEND would make pwrite() ignore it),
    O_DIRECT (pread/pwrite buffers are not aligned), O_NOATIME, O_NONBLOCK, O_LARGEFILE."""
    access = guest_flags & GUEST_O_ACCMODE
    if access not in _HOST_ACCMODE:
        raise OSError(errno.EINVAL, "open: access mode 3")
    flags = _HOST_ACCMODE[access] | os.O_CLOEXEC
    if truncate and guest_flags & GUEST_O_TRUNC:
        flags |= os.O_TRUNC
    if guest_flags & GUEST_O_SYNC:
        flags |= os.O_SYNC
    elif guest_flags & GUEST_O_DSYNC:
        flags |= os.O_DSYNC
    return flags


def encode_dev(dev: int) -> int:
    """fuse_attr.rdev is new_encode_dev(): minor low 8 bits, major, then the minor's rest."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def _sec_nsec(ns: int) -> tuple[int, int]:
    sec, nsec = divmod(ns, 1_000_000_000)
    return sec & ((1 << 64) - 1), nsec  # time before 1970: s64 in a u64 field


def attr_from_stat(st: os.stat_result, *, dax: bool = False) -> Attr:
    """fuse_attr for a host stat; ``dax`` sets FUSE_ATTR_DAX on regular files (dax=inode)."""
    atime, atimensec = _sec_nsec(st.st_atime_ns)
    mtime, mtimensec = _sec_nsec(st.st_mtime_ns)
    ctime, ctimensec = _sec_nsec(st.st_ctime_ns)
    flags = ATTR_DAX if dax and stat.S_ISREG(st.st_mode) else 0
    return Attr(
        ino=st.st_ino,
        size=st.st_size,
        blocks=st.st_blocks,
        atime=atime,
        mtime=mtime,
        ctime=ctime,
        atimensec=atimensec,
        mtimensec=mtimensec,
        ctimensec=ctimensec,
        mode=st.st_mode,
        nlink=min(st.st_nlink, 0xFFFFFFFF),
        uid=st.st_uid,
        gid=st.st_gid,
        rdev=encode_dev(st.st_rdev),
        blksize=st.st_blksize,
        flags=flags,
    )


def dirent_type(mode: int) -> int:
    """DT_* is the S_IFMT nibble (IFTODT)."""
    return stat.S_IFMT(mode) >> 12


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


@dataclass
class Node:
    """A looked-up inode: the kernel holds ``lookups`` references until it FORGETs them."""

    nodeid: int
    fd: int  # O_PATH | O_NOFOLLOW
    key: tuple[int, int]  # (st_dev, st_ino)
    mode: int  # S_IFMT bits; an inode never changes type
    lookups: int = 0


@dataclass(frozen=True)
class DirEntry:
    name: bytes
    ino: int
    type: int


@dataclass
class Handle:
    """An open file or directory (OPEN, CREATE, OPENDIR) and its host fd."""

    fh: int
    node: int
    fd: int
    readable: bool
    writable: bool
    is_dir: bool = False
    entries: list[DirEntry] = field(default_factory=list)


class HostFs(Closeable):
    """Nodes and handles over one host directory. Not thread-safe: the server serialises."""

    def __init__(self, share: Path) -> None:
        if not Path("/proc/self/fd").is_dir():
            raise HostCapabilityError("the FUSE server reopens files through /proc/self/fd")
        try:
            root = os.open(share, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"share {share}: not an existing directory ({exc})") from exc
        st = os.fstat(root)
        self.share = share
        self.root = Node(ROOT_ID, root, (st.st_dev, st.st_ino), stat.S_IFDIR, lookups=1)
        self._nodes: dict[int, Node] = {ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int], int] = {self.root.key: ROOT_ID}
        self._handles: dict[int, Handle] = {}
        self._next_node = ROOT_ID + 1
        self._next_fh = 1
        self._closed = False

    # --- nodes ---------------------------------------------------------------------------

    def node(self, nodeid: int) -> Node:
        try:
            return self._nodes[nodeid]
        except KeyError:
            raise OSError(errno.ESTALE, f"no node {nodeid}") from None

    def _adopt(self, fd: int) -> tuple[Node, os.stat_result]:
        """Take an O_PATH fd: the node for its inode (one more lookup), and its stat."""
        try:
            st = os.fstat(fd)
        except OSError:
            _close_quietly(fd)
            raise
        key = (st.st_dev, st.st_ino)
        known = self._by_key.get(key)
        if known is not None:
            _close_quietly(fd)
            node = self._nodes[known]
        else:
            node = Node(self._next_node, fd, key, stat.S_IFMT(st.st_mode))
            self._next_node += 1
            self._nodes[node.nodeid] = node
            self._by_key[key] = node.nodeid
        node.lookups += 1
        return node, st

    def lookup(self, parent: int, name: bytes) -> tuple[Node, os.stat_result]:
        pfd = self._dir_fd(parent)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        return self._adopt(fd)

    def forget(self, nodeid: int, nlookup: int) -> None:
        node = self._nodes.get(nodeid)
        if node is None or nodeid == ROOT_ID:
            return
        node.lookups = max(0, node.lookups - nlookup)
        if node.lookups == 0:
            del self._nodes[nodeid]
            del self._by_key[node.key]
            _close_quietly(node.fd)

    def stat(self, nodeid: int) -> os.stat_result:
        return os.fstat(self.node(nodeid).fd)

    def _dir_fd(self, nodeid: int) -> int:
        node = self.node(nodeid)
        if not stat.S_ISDIR(node.mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        return node.fd

    def reopen(self, nodeid: int, flags: int) -> int:
        """A new fd on the node's inode; regular files and directories only."""
        node = self.node(nodeid)
        if stat.S_ISDIR(node.mode):
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise OSError(errno.EISDIR, "is a directory")
            return os.open(_proc(node.fd), flags | os.O_DIRECTORY | os.O_CLOEXEC)
        if not stat.S_ISREG(node.mode):
            # A symlink would be followed, a FIFO would block the server: neither is served.
            raise OSError(errno.EACCES, "the share serves regular files and directories only")
        return os.open(_proc(node.fd), flags | os.O_CLOEXEC)

    # --- handles -------------------------------------------------------------------------

    def _new_handle(self, node: int, fd: int, flags: int, *, is_dir: bool = False) -> Handle:
        access = flags & os.O_ACCMODE
        handle = Handle(
            self._next_fh,
            node,
            fd,
            readable=access in (os.O_RDONLY, os.O_RDWR),
            writable=access in (os.O_WRONLY, os.O_RDWR),
            is_dir=is_dir,
        )
        self._next_fh += 1
        self._handles[handle.fh] = handle
        return handle

    def handle(self, fh: int, *, is_dir: bool = False) -> Handle:
        found = self._handles.get(fh)
        if found is None or found.is_dir != is_dir:
            raise OSError(errno.EBADF, f"no {'directory' if is_dir else 'file'} handle {fh}")
        return found

    def open(self, nodeid: int, flags: int) -> Handle:
        node = self.node(nodeid)
        if stat.S_ISDIR(node.mode):
            raise OSError(errno.EISDIR, "OPEN of a directory")
        return self._new_handle(nodeid, self.reopen(nodeid, flags), flags)

    def opendir(self, nodeid: int) -> Handle:
        if not stat.S_ISDIR(self.node(nodeid).mode):
            raise OSError(errno.ENOTDIR, "OPENDIR of a non-directory")
        return self._new_handle(nodeid, self.reopen(nodeid, os.O_RDONLY), 0, is_dir=True)

    def release(self, fh: int, *, is_dir: bool = False) -> None:
        handle = self.handle(fh, is_dir=is_dir)
        del self._handles[fh]
        _close_quietly(handle.fd)

    def create(
        self, parent: int, name: bytes, flags: int, mode: int, *, exclusive: bool
    ) -> tuple[Node, os.stat_result, Handle]:
        """CREATE: open (creating if missing) and look up, in one step."""
        pfd = self._dir_fd(parent)
        base = flags | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(name, base | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=pfd)
            created = True
        except FileExistsError:
            if exclusive:
                raise
            fd = os.open(name, base, dir_fd=pfd)
            created = False
        try:
            if created:
                os.fchmod(fd, mode)  # exactly the guest's mode: not our process umask
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EACCES, "CREATE of an existing non-regular file")
            path_fd = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)
        except OSError:
            _close_quietly(fd)
            raise
        node, st = self._adopt(path_fd)
        return node, st, self._new_handle(node.nodeid, fd, flags)

    def mkdir(self, parent: int, name: bytes, mode: int) -> tuple[Node, os.stat_result]:
        pfd = self._dir_fd(parent)
        os.mkdir(name, 0o700, dir_fd=pfd)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
        try:
            os.chmod(_proc(fd), mode)
        except OSError:
            _close_quietly(fd)
            raise
        return self._adopt(fd)

    def unlink(self, parent: int, name: bytes) -> None:
        os.unlink(name, dir_fd=self._dir_fd(parent))

    def rmdir(self, parent: int, name: bytes) -> None:
        os.rmdir(name, dir_fd=self._dir_fd(parent))

    def rename(self, parent: int, old: bytes, newdir: int, new: bytes) -> None:
        os.rename(old, new, src_dir_fd=self._dir_fd(parent), dst_dir_fd=self._dir_fd(newdir))

    # --- data ----------------------------------------------------------------------------

    def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handle(fh)
        if not handle.readable:
            raise OSError(errno.EBADF, "handle not open for reading")
        return os.pread(handle.fd, size, offset)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handle(fh)
        if not handle.writable:
            raise OSError(errno.EBADF, "handle not open for writing")
        done = 0
        while done < len(data):
            n = os.pwrite(handle.fd, data[done:], offset + done)
            if n == 0:
                break
            done += n
        return done

    def fsync(self, fh: int, *, datasync: bool, is_dir: bool = False) -> None:
        fd = self.handle(fh, is_dir=is_dir).fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    def list_dir(self, fh: int, *, refresh: bool) -> list[DirEntry]:
        """The directory's entries: ".", "..", then the names sorted. Taken once per pass
        (offset 0) so that offsets stay stable across the READDIR calls of one listing."""
        handle = self.handle(fh, is_dir=True)
        if refresh or not handle.entries:
            own = os.fstat(handle.fd).st_ino
            up = own if handle.node == ROOT_ID else os.stat("..", dir_fd=handle.fd).st_ino
            found = [DirEntry(b".", own, stat.S_IFDIR >> 12), DirEntry(b"..", up, 4)]
            with os.scandir(handle.fd) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # gone since the listing began
                    found.append(
                        DirEntry(os.fsencode(entry.name), st.st_ino, dirent_type(st.st_mode))
                    )
            found[2:] = sorted(found[2:], key=lambda e: e.name)
            handle.entries = found
        return handle.entries

    # --- attributes ----------------------------------------------------------------------

    def _path_for_change(self, nodeid: int) -> str:
        node = self.node(nodeid)
        if not (stat.S_ISREG(node.mode) or stat.S_ISDIR(node.mode)):
            raise OSError(errno.EOPNOTSUPP, "attributes of special files are not changed")
        return _proc(node.fd)

    def chmod(self, nodeid: int, mode: int) -> None:
        os.chmod(self._path_for_change(nodeid), mode & 0o7777)

    def chown(self, nodeid: int, uid: int, gid: int) -> None:
        os.chown(self._path_for_change(nodeid), uid, gid)

    def truncate(self, nodeid: int, size: int, fh: int | None) -> None:
        if fh is not None:
            handle = self.handle(fh)
            if handle.node != nodeid:
                raise OSError(errno.EBADF, "handle of another node")
            os.ftruncate(handle.fd, size)
            return
        node = self.node(nodeid)
        if stat.S_ISDIR(node.mode):
            raise OSError(errno.EISDIR, "truncate of a directory")
        os.truncate(self._path_for_change(nodeid), size)

    def utime(self, nodeid: int, atime_ns: int | None, mtime_ns: int | None) -> None:
        path = self._path_for_change(nodeid)
        st = os.stat(path)
        a = st.st_atime_ns if atime_ns is None else atime_ns
        m = st.st_mtime_ns if mtime_ns is None else mtime_ns
        os.utime(path, ns=(a, m))

    def access(self, nodeid: int, mask: int) -> None:
        node = self.node(nodeid)
        if mask and not os.access(_proc(node.fd), mask):
            raise OSError(errno.EACCES, "access denied")

    def statfs(self) -> Kstatfs:
        st = os.statvfs(self.root.fd)
        return Kstatfs(
            blocks=st.f_blocks,
            bfree=st.f_bfree,
            bavail=st.f_bavail,
            files=st.f_files,
            ffree=st.f_ffree,
            bsize=st.f_bsize,
            namelen=st.f_namemax,
            frsize=st.f_frsize,
        )

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def held_fds(self) -> int:
        """Host fds this object holds: one per node (the root too) and one per handle."""
        return len(self._nodes) + len(self._handles)

    def reset(self) -> None:
        """DESTROY: close every handle and forget every node but the root."""
        for handle in self._handles.values():
            _close_quietly(handle.fd)
        self._handles.clear()
        for node in self._nodes.values():
            if node.nodeid != ROOT_ID:
                _close_quietly(node.fd)
        self._nodes = {ROOT_ID: self.root}
        self._by_key = {self.root.key: ROOT_ID}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.reset()
        _close_quietly(self.root.fd)
        self._nodes.clear()
        self._by_key.clear()
