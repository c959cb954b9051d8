"""The FUSE server against a temporary share: INIT as Linux 6.1 / 6.12 negotiate it, a whole
session (lookup, read, write, create, listings over several calls, truncate, fsync), DAX
mappings through a fake mapper, error cases, escape attempts, and no fd left behind."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_guest import (
    ACCESS,
    ARM64_O_LARGEFILE,
    ATTR_OUT,
    BATCH_FORGET,
    CREATE,
    DESTROY,
    FLUSH,
    FSYNC,
    GETXATTR,
    HAS_INODE_DAX,
    INIT,
    INIT_EXT,
    INIT_IN,
    INTERRUPT,
    LINUX_6_1,
    LINUX_6_12,
    LOOKUP,
    MAP_ALIGNMENT,
    MKDIR,
    OPEN,
    READ,
    RELEASEDIR,
    RENAME,
    RENAME2,
    RMDIR,
    SETATTR,
    SETATTR_IN,
    STATFS,
    SYNCFS,
    UNLINK,
    FakeMapper,
    Guest,
    MiB,
    fd_count,
    name_arg,
    read_in,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.errors import ConfigError, FuseProtocolError, StateError
from testbed.fuse import FuseServer, SessionState
from testbed.fuse.host import host_open_flags

WINDOW = 8 * MiB
DAX_61 = LINUX_6_1 | MAP_ALIGNMENT  # dax=always: no HAS_INODE_DAX
DAX_612 = LINUX_6_12 | MAP_ALIGNMENT


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello, virtio-fs\n")
    (root / "sub" / "inner").write_bytes(b"inner")
    (tmp_path / "secret").write_bytes(b"outside the share")
    (root / "escape").symlink_to(tmp_path / "secret")
    (root / "updir").symlink_to(tmp_path)
    return root


@pytest.fixture
def mapper() -> FakeMapper:
    return FakeMapper()


@pytest.fixture
def server(share: Path, mapper: FakeMapper) -> Iterator[FuseServer]:
    before = fd_count()
    with FuseServer(share, mapper, tag="testfs", window_size=WINDOW, map_alignment=12) as srv:
        yield srv
    assert fd_count() == before, "the server left host fds open"
    assert mapper.live() == {}, "a SHMEM_MAP without its SHMEM_UNMAP"


@pytest.fixture
def guest(server: FuseServer) -> Guest:
    g = Guest(server)
    g.init(DAX_612)
    return g


# --- INIT ----------------------------------------------------------------------------------


def test_init_with_linux_6_1_dax_always(server: FuseServer) -> None:
    out = Guest(server).init(DAX_61, minor=37)
    assert (out["major"], out["minor"]) == (7, 37)
    assert out["all_flags"] & MAP_ALIGNMENT and out["map_alignment"] == 12
    assert out["all_flags"] & INIT_EXT and out["flags2"] == 0
    assert (out["max_pages"], out["max_write"], out["time_gran"]) == (32, 128 * 1024, 1)
    assert out["max_readahead"] == 128 * 1024
    accepted = {0, 3, 5, 13, 22, 26, 30}  # ASYNC_READ ATOMIC_O_TRUNC BIG_WRITES ...
    assert out["all_flags"] == sum(1 << b for b in accepted)
    assert server.negotiated is not None and server.negotiated.dax


def test_init_with_linux_6_12_default_dax_mode(share: Path, mapper: FakeMapper) -> None:
    # Mounted without dax=: the guest offers HAS_INODE_DAX; we accept it only when asked.
    for inode_dax in (False, True):
        with FuseServer(share, mapper, tag="t", window_size=WINDOW, inode_dax=inode_dax) as server:
            guest = Guest(server)
            out = guest.init(DAX_612 | HAS_INODE_DAX)
            assert out["minor"] == 41
            assert bool(out["all_flags"] & HAS_INODE_DAX) is inode_dax
            hello = guest.lookup(1, b"hello.txt")
            assert hello.flags == (2 if inode_dax else 0)  # FUSE_ATTR_DAX on regular files
            assert guest.lookup(1, b"sub").flags == 0


def test_init_without_a_mapper_is_plain_virtio_fs(share: Path) -> None:
    with FuseServer(share, tag="plain") as server:
        guest = Guest(server)
        out = guest.init(DAX_612)
        assert not out["all_flags"] & MAP_ALIGNMENT and out["map_alignment"] == 0
        hello = guest.lookup(1, b"hello.txt")
        # Linux keeps DAX on whatever INIT says (dax=always + a window): SETUPMAPPING
        # then gets ENOSYS, as from virtiofsd.
        assert guest.setupmapping(hello.nodeid, 0, 0) == errno.ENOSYS


def test_init_without_map_alignment_offered(server: FuseServer) -> None:
    guest = Guest(server)
    out = guest.init(LINUX_6_12)  # dax=never, or no window in the guest
    assert not out["all_flags"] & MAP_ALIGNMENT
    assert guest.setupmapping(guest.lookup(1, b"hello.txt").nodeid, 0, 0) == errno.ENOSYS


def test_version_negotiation(server: FuseServer) -> None:
    guest = Guest(server)
    body = INIT_IN.pack(8, 0, 0, 0, 0, *[0] * 11)
    major, minor = struct.unpack_from("<II", guest.ok(INIT, 0, body))
    assert (major, minor) == (7, 41) and server.state is SessionState.NEW
    assert guest.error(INIT, 0, INIT_IN.pack(7, 30, 0, 0, 0, *[0] * 11)) == errno.EPROTO
    assert guest.error(LOOKUP, 1, name_arg(b"hello.txt")) == errno.EIO  # before INIT
    assert guest.init(DAX_612, minor=45)["minor"] == 41  # a newer guest: our minor
    assert guest.error(INIT, 0, INIT_IN.pack(7, 41, 0, 0, 0, *[0] * 11)) == errno.EPROTO


# --- a whole session -------------------------------------------------------------------------


def test_session(guest: Guest, server: FuseServer, share: Path) -> None:
    hello = guest.lookup(1, b"hello.txt")
    assert hello.size == 17 and hello.mode & 0o170000 == 0o100000
    assert ATTR_OUT.unpack(guest.ok(3, hello.nodeid, bytes(16)))[4] == 17
    fh = guest.open(hello.nodeid)
    assert guest.read(hello.nodeid, fh, 7, 100) == b"virtio-fs\n"
    guest.release(hello.nodeid, fh)

    fh = guest.open(hello.nodeid, 2)  # O_RDWR
    assert guest.write(hello.nodeid, fh, 0, b"HELLO") == 5
    assert (share / "hello.txt").read_bytes() == b"HELLO, virtio-fs\n"
    assert guest.setattr_size(hello.nodeid, 5, fh)[4] == 5
    assert guest.ok(FSYNC, hello.nodeid, struct.pack("<QII", fh, 1, 0)) == b""
    assert guest.ok(FLUSH, hello.nodeid, struct.pack("<QIIQ", fh, 0, 0, 0)) == b""
    guest.release(hello.nodeid, fh)
    assert (share / "hello.txt").read_bytes() == b"HELLO"

    new, fh = guest.create(1, b"new.bin", 0o100640)
    assert guest.write(new.nodeid, fh, 4096, b"tail") == 4
    guest.release(new.nodeid, fh)
    assert (share / "new.bin").stat().st_size == 4100
    assert (share / "new.bin").stat().st_mode & 0o777 == 0o640 & ~0o022

    sub = guest.lookup(1, b"sub")
    made = guest.entry(guest.ok(MKDIR, sub.nodeid, struct.pack("<II", 0o40755, 0o022) + b"d\0"))
    assert made.mode & 0o777 == 0o755 and (share / "sub" / "d").is_dir()
    renamed = struct.pack("<Q", 1) + b"inner\0moved\0"
    assert guest.ok(RENAME, sub.nodeid, renamed) == b""
    assert (share / "moved").read_bytes() == b"inner"
    assert guest.ok(UNLINK, 1, name_arg(b"moved")) == b""
    assert guest.ok(RMDIR, sub.nodeid, name_arg(b"d")) == b""
    statfs = guest.ok(STATFS, 1)
    assert len(statfs) == 80 and struct.unpack_from("<5QII", statfs)[6] == 255
    assert guest.ok(ACCESS, 1, struct.pack("<II", os.R_OK, 0)) == b""

    stats = server.stats
    assert stats.requests["LOOKUP"] == 2 and stats.requests["WRITE"] == 2
    assert stats.bytes_read == 10 and stats.bytes_written == 9
    guest.destroy()
    assert server.state is SessionState.NEW and server.held_fds == 1


@pytest.mark.parametrize("plus", [True, False], ids=["readdirplus", "readdir"])
def test_listing_over_several_calls(server: FuseServer, share: Path, plus: bool) -> None:
    for i in range(60):
        (share / f"f{i:02}").write_bytes(b"x" * i)
    guest = Guest(server)
    guest.init(DAX_612)
    fds = server.held_fds
    fh = guest.opendir()
    seen: list[tuple] = []
    offset, calls = 0, 0
    while batch := guest.readdir(fh, offset, 4096 if plus else 512, plus=plus):
        seen += batch
        offset = batch[-1][0]  # the next call resumes at the last entry's off
        calls += 1
    assert calls >= 3
    names = [name for _, name, _, _ in seen]
    expected = [b".", b"..", *sorted(os.fsencode(p.name) for p in share.iterdir())]
    assert names == expected
    types = {name: dtype for _, name, dtype, _ in seen}
    assert (types[b"sub"], types[b"hello.txt"], types[b"escape"]) == (4, 8, 10)
    if plus:
        looked_up = [(name, node) for _, name, _, node in seen if node]
        assert [n for n, _ in looked_up] == expected[2:]  # '.' and '..' are nodeid 0
        for _, node in looked_up:
            guest.forget(node, 1)
    guest.release(1, fh, RELEASEDIR)
    assert server.held_fds == fds


def test_forget_batch_forget_and_lookup_counts(guest: Guest, server: FuseServer) -> None:
    first = guest.lookup(1, b"hello.txt")
    again = guest.lookup(1, b"hello.txt")
    assert first.nodeid == again.nodeid and server.held_fds == 2
    guest.forget(first.nodeid, 1)
    assert server.held_fds == 2  # one lookup left
    body = struct.pack("<II", 1, 0) + struct.pack("<QQ", first.nodeid, 1)
    guest.no_reply(BATCH_FORGET, 0, body)
    assert server.held_fds == 1
    assert guest.error(3, first.nodeid, bytes(16)) == errno.ESTALE
    guest.no_reply(INTERRUPT, 0, struct.pack("<Q", 12))


# --- errors and escapes ----------------------------------------------------------------------


def test_errors(guest: Guest) -> None:
    assert guest.error(LOOKUP, 1, name_arg(b"missing")) == errno.ENOENT
    hello = guest.lookup(1, b"hello.txt")
    assert guest.error(READ, hello.nodeid, read_in(999, 0, 10)) == errno.EBADF
    fh = guest.open(hello.nodeid)  # read-only
    body = struct.pack("<QQIIQII", fh, 0, 1, 0, 0, 0, 0) + b"x"
    assert guest.error(16, hello.nodeid, body) == errno.EBADF
    assert guest.error(OPEN, 1, struct.pack("<II", 0, 0)) == errno.EISDIR
    assert guest.error(GETXATTR, 1, struct.pack("<II", 0, 0) + b"user.x\0") == errno.ENOSYS
    assert guest.error(SYNCFS, 1, bytes(8)) == errno.ENOSYS
    assert guest.error(RENAME2, 1, struct.pack("<QII", 1, 1, 0) + b"a\0b\0") == errno.EINVAL
    create = struct.pack("<IIII", 0o301, 0o100644, 0, 0) + b"hello.txt\0"  # O_EXCL
    assert guest.error(CREATE, 1, create) == errno.EEXIST


@pytest.mark.parametrize(
    "name", [b"..", b".", b"sub/inner", b"", b"x" * 256], ids=["dotdot", "dot", "slash", "", "long"]
)
def test_names_that_are_not_one_component(guest: Guest, name: bytes) -> None:
    code = guest.error(LOOKUP, 1, name_arg(name))
    assert code == (errno.ENAMETOOLONG if len(name) > 255 else errno.EINVAL)


def test_symlinks_are_never_followed_out(guest: Guest, tmp_path: Path) -> None:
    escape = guest.lookup(1, b"escape")  # the link itself, as the guest would see it
    assert escape.mode & 0o170000 == 0o120000
    assert guest.error(OPEN, escape.nodeid, struct.pack("<II", 0, 0)) == errno.EACCES
    assert guest.setupmapping(escape.nodeid, 0, 0) == errno.EINVAL
    updir = guest.lookup(1, b"updir")
    assert guest.error(LOOKUP, updir.nodeid, name_arg(b"secret")) == errno.ENOTDIR
    create = struct.pack("<IIII", 0o101, 0o100644, 0, 0) + b"escape\0"
    assert guest.error(CREATE, 1, create) == errno.ELOOP
    assert (tmp_path / "secret").read_bytes() == b"outside the share"


def test_open_flags_from_another_architecture() -> None:
    # An arm64 guest's O_LARGEFILE is x86_64's O_NOFOLLOW; neither reaches the host.
    assert host_open_flags(2 | ARM64_O_LARGEFILE, truncate=True) == os.O_RDWR | os.O_CLOEXEC
    assert host_open_flags(1 | 0o1000 | 0o2000, truncate=True) & os.O_APPEND == 0
    assert host_open_flags(1 | 0o1000, truncate=False) & os.O_TRUNC == 0
    with pytest.raises(OSError, match="access mode"):
        host_open_flags(3, truncate=False)


def test_malformed_requests_are_answered(guest: Guest, server: FuseServer) -> None:
    code, _ = guest.send(LOOKUP, 1, b"no-nul")
    assert code == errno.EPROTO and len(server.protocol_errors) == 1
    assert server.protocol_errors[0].data is not None
    assert guest.raw(struct.pack("<IIQQIIIHH", 48, 2, 1, 1, 0, 0, 0, 0, 0) + b"short") is None
    with pytest.raises(FuseProtocolError, match="in-header"):
        guest.raw(b"\0" * 12)
    assert server.stats.protocol_errors == 2


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=40, max_size=120), st.integers(1, 60))
def test_server_fuzzed(tmp_path_factory: pytest.TempPathFactory, data: bytes, opcode: int) -> None:
    share = tmp_path_factory.mktemp("fuzz")
    (share / "f").write_bytes(b"data")
    with FuseServer(share, FakeMapper(), tag="fuzz", window_size=WINDOW) as server:
        Guest(server).init(DAX_612)
        data = struct.pack("<II", len(data), opcode) + data[8:]
        reply = server.handle(data)
        if reply is not None:
            length, error, _ = struct.unpack_from("<IiQ", reply)
            assert length == len(reply) and -511 <= error <= 0


def test_configuration_is_checked(share: Path, tmp_path: Path) -> None:
    mapper = FakeMapper()
    for kwargs in (
        {"tag": ""},
        {"tag": "x" * 37},
        {"tag": "t", "window_size": WINDOW},  # a window without a mapper
        {"tag": "t", "max_pages": 0},
    ):
        with pytest.raises(ConfigError):
            FuseServer(share, **kwargs)
    with pytest.raises(ConfigError, match="2097152"):
        FuseServer(share, mapper, tag="t", window_size=MiB)
    with pytest.raises(ConfigError, match="fuse_dax_check_alignment"):
        FuseServer(share, mapper, tag="t", window_size=WINDOW, map_alignment=22)
    with pytest.raises(ConfigError, match="not an existing directory"):
        FuseServer(tmp_path / "nowhere", tag="t")


def test_closed_server(share: Path) -> None:
    server = FuseServer(share, tag="t")
    server.close()
    server.close()
    with pytest.raises(StateError):
        server.handle(b"\0" * 40)


def test_destroy_then_a_new_mount(guest: Guest, server: FuseServer) -> None:
    guest.lookup(1, b"hello.txt")
    guest.ok(DESTROY, 0)
    assert guest.error(LOOKUP, 1, name_arg(b"hello.txt")) == errno.EIO
    guest.init(DAX_61, minor=37)
    assert guest.lookup(1, b"hello.txt").size == 17


def test_init_from_a_7_31_guest(server: FuseServer) -> None:
    # Linux 5.10 (7.31): a 16-byte fuse_init_in, no flags2; DAX works all the same.
    guest = Guest(server)
    body = struct.pack("<IIII", 7, 31, 65536, (LINUX_6_1 | MAP_ALIGNMENT) & 0x3FFFFFFF)
    out = struct.unpack("<IIIIHHIIHHII6I", guest.ok(INIT, 0, body))
    assert out[1] == 31 and out[3] & MAP_ALIGNMENT and not out[3] & INIT_EXT
    assert out[9] == 12 and out[10] == 0
    assert guest.setupmapping(guest.lookup(1, b"hello.txt").nodeid, 0, 0) == 0


def test_setattr_mode_times_and_truncate_by_path(guest: Guest, share: Path) -> None:
    hello = guest.lookup(1, b"hello.txt")
    valid = 1 << 0 | 1 << 4 | 1 << 5  # MODE | ATIME | MTIME
    body = SETATTR_IN.pack(valid, 0, 0, 0, 0, 1000, 2000, 0, 5, 6, 0, 0o600, 0, 0, 0, 0)
    attr = ATTR_OUT.unpack(guest.ok(SETATTR, hello.nodeid, body))
    assert attr[12] & 0o7777 == 0o600 and (attr[6], attr[7]) == (1000, 2000)
    st = (share / "hello.txt").stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 6)
    assert guest.setattr_size(hello.nodeid, 3)[4] == 3  # no FATTR_FH: truncate by node
    assert (share / "hello.txt").read_bytes() == b"hel"
    sub = guest.lookup(1, b"sub")
    assert guest.error(SETATTR, sub.nodeid, SETATTR_IN.pack(8, *[0] * 15)) == errno.EISDIR
    bad_nsec = SETATTR_IN.pack(1 << 4, 0, 0, 0, 0, 1, 0, 0, 10**9, 0, 0, 0, 0, 0, 0, 0)
    assert guest.error(SETATTR, hello.nodeid, bad_nsec) == errno.EINVAL


def test_listing_again_from_zero(guest: Guest, share: Path) -> None:
    fh = guest.opendir()
    first = [name for _, name, _, _ in guest.readdir(fh, 0, plus=False)]
    (share / "late").write_bytes(b"")
    again = [name for _, name, _, _ in guest.readdir(fh, 0, plus=False)]
    assert again == sorted([*first, b"late"], key=lambda n: (n not in (b".", b".."), n))
    assert guest.readdir(fh, len(again), plus=False) == []  # past the end: an empty reply
    guest.release(1, fh, RELEASEDIR)
