"""The file-system half of the FUSE server: nodes, attributes, files and directories.

One method per opcode; each takes the decoded request and returns the reply payload (None
for the requests without a reply) or raises ``OSError``, which the server turns into an
error reply. The host side is :class:`testbed.fuse.host.HostFs`.
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from collections.abc import Callable

from testbed.fuse.codec import (
    BatchForgetArgs,
    CreateArgs,
    FuseRequest,
    MkdirArgs,
    NameArgs,
    RenameArgs,
    WriteArgs,
)
from testbed.fuse.host import GUEST_O_EXCL, DirEntry, HostFs, attr_from_stat, host_open_flags
from testbed.fuse.structs import (
    AccessIn,
    Attr,
    AttrOut,
    Dirent,
    Direntplus,
    EntryOut,
    FlushIn,
    ForgetIn,
    FsyncIn,
    GetattrIn,
    OpenIn,
    OpenOut,
    ReadIn,
    ReleaseIn,
    SetattrIn,
    WriteOut,
)
from testbed.fuse.wire import FSYNC_FDATASYNC, GETATTR_FH, Opcode, SetattrValid

MAX_READ = 1 << 24  # far above Linux's max_pages (256) x 64 KiB pages
NAME_LEN_MAX = 255

Handler = Callable[[FuseRequest], bytes | None]


def check_name(name: bytes) -> None:
    """One path component, never a way out: no '/', no '.', no '..', nothing empty."""
    if not name or name in (b".", b"..") or b"/" in name:
        raise OSError(errno.EINVAL, f"name {name!r} is not a single component")
    if len(name) > NAME_LEN_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")


def _timespec_ns(sec: int, nsec: int) -> int:
    if nsec >= 1_000_000_000:
        raise OSError(errno.EINVAL, "nanoseconds out of range")
    signed = sec - (1 << 64) if sec >= 1 << 63 else sec  # an s64 in a u64 field
    return signed * 1_000_000_000 + nsec


class FileOps:
    """LOOKUP .. READDIRPLUS over one HostFs. ``inode_dax`` and ``atomic_o_trunc`` are what
    INIT settled; the server sets them."""

    def __init__(self, host: HostFs, counters: Counter[str], *, timeout: float) -> None:
        self._host = host
        self._counters = counters
        self._valid = (int(timeout), int((timeout - int(timeout)) * 1e9))
        self.inode_dax = False
        self.atomic_o_trunc = False

    def handlers(self) -> dict[int, Handler]:
        o = Opcode
        return {
            o.LOOKUP: self.lookup,
            o.FORGET: self.forget,
            o.BATCH_FORGET: self.batch_forget,
            o.GETATTR: self.getattr,
            o.SETATTR: self.setattr,
            o.ACCESS: self.access,
            o.STATFS: self.statfs,
            o.GETXATTR: self.no_xattrs,
            o.LISTXATTR: self.no_xattrs,
            o.OPEN: self.open,
            o.OPENDIR: self.opendir,
            o.CREATE: self.create,
            o.MKDIR: self.mkdir,
            o.UNLINK: self.unlink,
            o.RMDIR: self.rmdir,
            o.RENAME: self.rename,
            o.RENAME2: self.rename,
            o.READ: self.read,
            o.WRITE: self.write,
            o.FLUSH: self.flush,
            o.RELEASE: self.release,
            o.RELEASEDIR: self.releasedir,
            o.FSYNC: self.fsync,
            o.FSYNCDIR: self.fsync,
            o.READDIR: self.readdir,
            o.READDIRPLUS: self.readdir,
        }

    # --- nodes and attributes ------------------------------------------------------------

    def _entry(self, nodeid: int, st: os.stat_result) -> EntryOut:
        sec, nsec = self._valid
        return EntryOut(nodeid, 0, sec, sec, nsec, nsec, attr_from_stat(st, dax=self.inode_dax))

    def _attr_out(self, st: os.stat_result) -> bytes:
        sec, nsec = self._valid
        return AttrOut(sec, nsec, attr_from_stat(st, dax=self.inode_dax)).pack()

    def lookup(self, req: FuseRequest) -> bytes:
        name = req.args_as(NameArgs).name
        check_name(name)
        node, st = self._host.lookup(req.nodeid, name)
        return self._entry(node.nodeid, st).pack()

    def forget(self, req: FuseRequest) -> None:
        self._host.forget(req.nodeid, req.args_as(ForgetIn).nlookup)

    def batch_forget(self, req: FuseRequest) -> None:
        for one in req.args_as(BatchForgetArgs).entries:
            self._host.forget(one.nodeid, one.nlookup)

    def getattr(self, req: FuseRequest) -> bytes:
        arg = req.args_as(GetattrIn)
        if arg.getattr_flags & GETATTR_FH:
            self._host.handle(arg.fh)
        return self._attr_out(self._host.stat(req.nodeid))

    def setattr(self, req: FuseRequest) -> bytes:
        arg = req.args_as(SetattrIn)
        valid = SetattrValid(arg.valid & sum(SetattrValid))  # unknown bits: ignored
        fh = arg.fh if valid & SetattrValid.FH else None
        if fh is not None:
            self._host.handle(fh)
        if valid & SetattrValid.MODE:
            self._host.chmod(req.nodeid, arg.mode)
        if valid & (SetattrValid.UID | SetattrValid.GID):
            uid = arg.uid if valid & SetattrValid.UID else -1
            gid = arg.gid if valid & SetattrValid.GID else -1
            self._host.chown(req.nodeid, uid, gid)
        if valid & SetattrValid.SIZE:
            self._host.truncate(req.nodeid, arg.size, fh)
        now = time.time_ns()
        atime = mtime = None
        if valid & SetattrValid.ATIME_NOW:
            atime = now
        elif valid & SetattrValid.ATIME:
            atime = _timespec_ns(arg.atime, arg.atimensec)
        if valid & SetattrValid.MTIME_NOW:
            mtime = now
        elif valid & SetattrValid.MTIME:
            mtime = _timespec_ns(arg.mtime, arg.mtimensec)
        if atime is not None or mtime is not None:
            self._host.utime(req.nodeid, atime, mtime)
        return self._attr_out(self._host.stat(req.nodeid))

    def access(self, req: FuseRequest) -> bytes:
        mask = req.args_as(AccessIn).mask
        if mask & ~(os.R_OK | os.W_OK | os.X_OK):
            raise OSError(errno.EINVAL, "access mask")
        self._host.access(req.nodeid, mask)
        return b""

    def statfs(self, req: FuseRequest) -> bytes:
        return self._host.statfs().pack()

    def no_xattrs(self, req: FuseRequest) -> bytes:
        # ENOSYS, not ENODATA: fs/fuse/xattr.c then sets fc->no_getxattr / no_listxattr and
        # answers -EOPNOTSUPP itself, instead of asking again on every write
        # (file_remove_privs() looks for security.capability each time).
        raise OSError(errno.ENOSYS, "the share exposes no extended attributes")

    # --- files ---------------------------------------------------------------------------

    def open(self, req: FuseRequest) -> bytes:
        flags = host_open_flags(req.args_as(OpenIn).flags, truncate=self.atomic_o_trunc)
        return OpenOut(self._host.open(req.nodeid, flags).fh).pack()

    def opendir(self, req: FuseRequest) -> bytes:
        req.args_as(OpenIn)
        return OpenOut(self._host.opendir(req.nodeid).fh).pack()

    def create(self, req: FuseRequest) -> bytes:
        args = req.args_as(CreateArgs)
        check_name(args.name)
        # dir.c fuse_create_open() passes O_TRUNC whatever atomic_o_trunc says.
        flags = host_open_flags(args.arg.flags, truncate=True)
        # Without FUSE_DONT_MASK the guest masked the mode already; masking twice is a no-op.
        mode = args.arg.mode & ~args.arg.umask & 0o7777
        exclusive = bool(args.arg.flags & GUEST_O_EXCL)
        node, st, handle = self._host.create(
            req.nodeid, args.name, flags, mode, exclusive=exclusive
        )
        return self._entry(node.nodeid, st).pack() + OpenOut(handle.fh).pack()

    def mkdir(self, req: FuseRequest) -> bytes:
        args = req.args_as(MkdirArgs)
        check_name(args.name)
        mode = args.arg.mode & ~args.arg.umask & 0o7777
        node, st = self._host.mkdir(req.nodeid, args.name, mode)
        return self._entry(node.nodeid, st).pack()

    def unlink(self, req: FuseRequest) -> bytes:
        name = req.args_as(NameArgs).name
        check_name(name)
        self._host.unlink(req.nodeid, name)
        return b""

    def rmdir(self, req: FuseRequest) -> bytes:
        name = req.args_as(NameArgs).name
        check_name(name)
        self._host.rmdir(req.nodeid, name)
        return b""

    def rename(self, req: FuseRequest) -> bytes:
        args = req.args_as(RenameArgs)
        if args.flags:
            # RENAME_NOREPLACE/EXCHANGE/WHITEOUT need renameat2(); dir.c fuse_rename2()
            # answers EINVAL to the caller for flags a server cannot do.
            raise OSError(errno.EINVAL, f"RENAME2 flags 0x{args.flags:x}")
        check_name(args.old)
        check_name(args.new)
        self._host.rename(req.nodeid, args.old, args.newdir, args.new)
        return b""

    def read(self, req: FuseRequest) -> bytes:
        arg = req.args_as(ReadIn)
        if arg.size > MAX_READ:
            raise OSError(errno.EINVAL, f"READ of {arg.size} bytes")
        data = self._host.read(arg.fh, arg.offset, arg.size)
        self._counters["read"] += len(data)
        return data

    def write(self, req: FuseRequest) -> bytes:
        args = req.args_as(WriteArgs)
        done = self._host.write(args.arg.fh, args.arg.offset, args.data)
        self._counters["written"] += done
        return WriteOut(done).pack()

    def flush(self, req: FuseRequest) -> bytes:
        self._host.handle(req.args_as(FlushIn).fh)  # nothing buffered: writes go straight
        return b""

    def release(self, req: FuseRequest) -> bytes:
        # The file's DAX ranges stay mapped: they belong to the inode (see testbed.fuse.dax).
        self._host.release(req.args_as(ReleaseIn).fh)
        return b""

    def releasedir(self, req: FuseRequest) -> bytes:
        self._host.release(req.args_as(ReleaseIn).fh, is_dir=True)
        return b""

    def fsync(self, req: FuseRequest) -> bytes:
        arg = req.args_as(FsyncIn)
        datasync = bool(arg.fsync_flags & FSYNC_FDATASYNC)
        self._host.fsync(arg.fh, datasync=datasync, is_dir=req.opcode == Opcode.FSYNCDIR)
        return b""

    # --- directories ---------------------------------------------------------------------

    def readdir(self, req: FuseRequest) -> bytes:
        arg = req.args_as(ReadIn)
        plus = req.opcode == Opcode.READDIRPLUS
        handle = self._host.handle(arg.fh, is_dir=True)
        # Offsets are positions in a listing taken at offset 0, so a listing that takes
        # several calls resumes exactly where the previous reply stopped.
        entries = self._host.list_dir(arg.fh, refresh=arg.offset == 0)
        out: list[bytes] = []
        used = 0
        for index in range(arg.offset, len(entries)):
            entry = entries[index]
            size = (Direntplus if plus else Dirent).size_for(entry.name)
            if used + size > min(arg.size, MAX_READ):
                break  # checked before any lookup: an entry not sent is not counted
            dirent = Dirent(entry.ino, index + 1, entry.type, entry.name)
            if plus:
                out.append(Direntplus(self._dirent_entry(handle.node, entry), dirent).pack())
            else:
                out.append(dirent.pack())
            used += size
        return b"".join(out)

    def _dirent_entry(self, parent: int, entry: DirEntry) -> EntryOut:
        """The entry half of a direntplus. '.' and '..' get nodeid 0: readdir.c
        fuse_direntplus_link() skips them, so a lookup counted here would never be
        forgotten. A name gone since the listing was taken gets nodeid 0 too."""
        if entry.name not in (b".", b".."):
            try:
                node, st = self._host.lookup(parent, entry.name)
            except OSError:
                pass
            else:
                return self._entry(node.nodeid, st)
        blank = Attr(entry.ino, 0, 0, 0, 0, 0, 0, 0, 0, entry.type << 12, 0, 0, 0, 0, 0)
        return EntryOut(0, 0, 0, 0, 0, 0, blank)
