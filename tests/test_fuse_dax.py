"""DAX through the FUSE server: SETUPMAPPING / REMOVEMAPPING as fs/fuse/dax.c sends them,
checked against a fake mapper that plays QEMU's rules (no map over a live mapping, unmaps of
whole mappings only), and the invariant the scenarios rely on: every SHMEM_MAP has had its
SHMEM_UNMAP by DESTROY or close()."""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_guest import DESTROY, LINUX_6_12, MAP_ALIGNMENT, O_RDWR, FakeMapper, Guest, MiB, fd_count
from hypothesis import given
from hypothesis import strategies as st
from test_fuse_server import WINDOW

from testbed.errors import StateError
from testbed.fuse import FuseServer, LiveMapping
from testbed.fuse.dax import DaxWindow, MappingTable

R, W = os.O_RDONLY, os.O_RDWR
LINUX_6_12_DAX = LINUX_6_12 | MAP_ALIGNMENT  # mounted dax=always, with a window


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    (root / "a").write_bytes(b"A" * (3 * MiB))  # two 2 MiB ranges
    (root / "b").write_bytes(b"B" * 10)  # mapped 2 MiB all the same
    return root


@pytest.fixture
def mapper() -> FakeMapper:
    return FakeMapper()


@pytest.fixture
def server(share: Path, mapper: FakeMapper) -> Iterator[FuseServer]:
    before = fd_count()
    with FuseServer(share, mapper, tag="dax", window_size=WINDOW, map_alignment=12) as srv:
        yield srv
    assert fd_count() == before
    assert mapper.live() == {}, "a SHMEM_MAP without its SHMEM_UNMAP"


@pytest.fixture
def guest(server: FuseServer) -> Guest:
    g = Guest(server)
    g.init(LINUX_6_12_DAX)
    return g


def test_read_mapping_as_linux_asks(guest: Guest, server: FuseServer, mapper: FakeMapper) -> None:
    a = guest.lookup(1, b"a")
    assert guest.setupmapping(a.nodeid, 2 * MiB, 0) == 0
    # A read-only mapping of a file we may write: an O_RDWR fd all the same (QEMU 11.1.3
    # maps every fd writable, readonly-map-writable).
    assert mapper.calls == [("map", 0, 2 * MiB, 2 * MiB, False, W, b"A" * 8, 0)]
    assert server.mappings == {0: LiveMapping(0, 2 * MiB, a.nodeid, 2 * MiB, False)}
    b = guest.lookup(1, b"b")
    assert guest.setupmapping(b.nodeid, 0, 6 * MiB) == 0  # past EOF: Linux maps 2 MiB
    assert mapper.calls[-1] == ("map", 6 * MiB, 2 * MiB, 0, False, W, b"B" * 8, 0)
    stats = server.stats
    assert (stats.maps, stats.bytes_mapped, stats.live_mappings) == (2, 4 * MiB, 2)


def test_a_file_we_may_not_write_is_mapped_from_a_read_only_fd(
    guest: Guest, share: Path, mapper: FakeMapper
) -> None:
    """chmod a-w on the host: the server honours it even as root (which could open the
    file for writing anyway) and maps a read-only range of it from an O_RDONLY fd."""
    (share / "a").chmod(0o444)
    a = guest.lookup(1, b"a")
    assert guest.setupmapping(a.nodeid, 0, 0) == 0
    assert mapper.calls == [("map", 0, 2 * MiB, 0, False, R, b"A" * 8, 0)]


def test_upgrade_to_writable_replaces_the_live_range(guest: Guest, mapper: FakeMapper) -> None:
    # fuse_upgrade_dax_mapping(): the same moffset again, FLAG_WRITE, no REMOVEMAPPING.
    a = guest.lookup(1, b"a")
    assert guest.setupmapping(a.nodeid, 0, 2 * MiB) == 0
    assert guest.setupmapping(a.nodeid, 0, 2 * MiB, write=True) == 0
    assert mapper.calls[1:] == [
        ("unmap", 2 * MiB, 2 * MiB, 0),
        ("map", 2 * MiB, 2 * MiB, 0, True, W, b"A" * 8, 0),
    ]
    assert mapper.live() == {2 * MiB: 2 * MiB}


def test_a_failed_upgrade_restores_the_read_only_mapping(
    guest: Guest, server: FuseServer, mapper: FakeMapper
) -> None:
    a = guest.lookup(1, b"a")
    assert guest.setupmapping(a.nodeid, 0, 0) == 0
    mapper.map_results = [errno.ENOMEM]
    assert guest.setupmapping(a.nodeid, 0, 0, write=True) == errno.ENOMEM
    assert [c[0] for c in mapper.calls] == ["map", "unmap", "map", "map"]
    assert mapper.calls[-1] == ("map", 0, 2 * MiB, 0, False, W, b"A" * 8, 0)  # the old one
    assert server.mappings[0].writable is False and mapper.live() == {0: 2 * MiB}
    assert server.stats.mapper_failures == 1


def test_removemapping(guest: Guest, server: FuseServer, mapper: FakeMapper) -> None:
    a = guest.lookup(1, b"a")
    for moffset in (0, 2 * MiB, 4 * MiB):
        assert guest.setupmapping(a.nodeid, 0, moffset) == 0
    assert guest.removemapping(a.nodeid, (2 * MiB, 2 * MiB), (0, 2 * MiB)) == 0
    assert mapper.live() == {4 * MiB: 2 * MiB} and list(server.mappings) == [4 * MiB]
    assert guest.removemapping(a.nodeid, (0, 4 * MiB)) == 0  # covers nothing live: fine
    assert server.stats.removals_of_nothing == 1
    assert guest.removemapping(a.nodeid, (4 * MiB, MiB)) == errno.EINVAL  # splits a mapping
    assert guest.removemapping(a.nodeid, (8 * MiB, 2 * MiB)) == errno.EINVAL  # past the window
    assert guest.removemapping(a.nodeid) == 0  # count 0
    assert list(server.mappings) == [4 * MiB]


def test_release_leaves_the_mappings(guest: Guest, server: FuseServer) -> None:
    # The ranges belong to the inode: a later open reuses them without SETUPMAPPING.
    a = guest.lookup(1, b"a")
    fh = guest.open(a.nodeid)
    assert guest.setupmapping(a.nodeid, 0, 0) == 0
    guest.release(a.nodeid, fh)
    assert list(server.mappings) == [0]


def test_destroy_unmaps_everything(guest: Guest, server: FuseServer, mapper: FakeMapper) -> None:
    # Unmount sends DESTROY and nothing else: no REMOVEMAPPING, no FORGET.
    a, b = guest.lookup(1, b"a"), guest.lookup(1, b"b")
    guest.setupmapping(a.nodeid, 0, 0, write=True)
    guest.setupmapping(b.nodeid, 0, 4 * MiB)
    guest.ok(DESTROY, 0)
    assert mapper.live() == {} and server.mappings == {}
    assert server.stats.unmaps == 2 and server.stats.bytes_unmapped == 4 * MiB


def test_close_unmaps_and_reset_forgets(share: Path) -> None:
    mapper = FakeMapper()
    server = FuseServer(share, mapper, tag="t", window_size=WINDOW)
    guest = Guest(server)
    guest.init(LINUX_6_12_DAX)
    guest.setupmapping(guest.lookup(1, b"a").nodeid, 0, 0)
    server.reset(unmap=False)  # a device reset: QEMU dropped the mappings itself
    assert mapper.calls[-1][0] == "map" and server.mappings == {}
    guest.init(LINUX_6_12_DAX)
    guest.setupmapping(guest.lookup(1, b"b").nodeid, 0, 0)
    server.close()
    assert mapper.calls[-1] == ("unmap", 0, 2 * MiB, 0)


@pytest.mark.parametrize(
    ("foffset", "moffset", "length", "flags", "code"),
    [
        (4096 + 512, 0, 2 * MiB, 2, errno.EINVAL),  # foffset not 4 KiB-aligned
        (0, 512, 2 * MiB, 2, errno.EINVAL),  # moffset misaligned
        (0, 0, 2 * MiB + 1, 2, errno.EINVAL),  # length misaligned
        (0, 0, 0, 2, errno.EINVAL),  # empty
        (0, 7 * MiB, 2 * MiB, 2, errno.EINVAL),  # moffset + len past the window
        (0, 2**64 - 4096, 8192, 2, errno.EINVAL),  # wraps around
        (2**63 - 4096, 0, 8192, 2, errno.EINVAL),  # beyond off_t
        (0, 0, 2 * MiB, 0, errno.EINVAL),  # neither READ nor WRITE
        (0, 0, 2 * MiB, 4 | 2, errno.EINVAL),  # an unknown flag
    ],
)
def test_setupmapping_checks(
    guest: Guest, mapper: FakeMapper, foffset: int, moffset: int, length: int, flags: int, code: int
) -> None:
    a = guest.lookup(1, b"a")
    got = guest.setupmapping(a.nodeid, foffset, moffset, length=length, flags=flags)
    assert got == code and mapper.calls == []


def test_setupmapping_with_a_file_handle(guest: Guest, mapper: FakeMapper) -> None:
    a = guest.lookup(1, b"a")
    ro = guest.open(a.nodeid)
    assert guest.setupmapping(a.nodeid, 0, 0, write=True, fh=ro) == errno.EACCES
    assert guest.setupmapping(a.nodeid, 0, 0, fh=12345) == errno.EBADF
    b = guest.lookup(1, b"b")
    assert guest.setupmapping(b.nodeid, 0, 0, fh=ro) == errno.EBADF  # another node's handle
    rw = guest.open(a.nodeid, O_RDWR)
    assert guest.setupmapping(a.nodeid, 0, 0, write=True, fh=rw) == 0
    assert mapper.calls == [("map", 0, 2 * MiB, 0, True, W, b"A" * 8, 0)]
    assert guest.setupmapping(1, 0, 0) == errno.EINVAL  # the root directory
    assert guest.setupmapping(999, 0, 0) == errno.ESTALE


def test_mapper_failures_become_errnos(
    guest: Guest, server: FuseServer, mapper: FakeMapper
) -> None:
    a = guest.lookup(1, b"a")
    mapper.map_results = [errno.ENOSPC]
    assert guest.setupmapping(a.nodeid, 0, 0) == errno.ENOSPC and server.mappings == {}
    assert guest.setupmapping(a.nodeid, 0, 0) == 0
    mapper.unmap_results = [errno.EIO]
    assert guest.removemapping(a.nodeid, (0, 2 * MiB)) == errno.EIO
    assert list(server.mappings) == [0]  # still mapped, as far as anyone knows
    assert server.stats.mapper_failures == 2


def test_map_alignment_of_2_mib_still_mounts(share: Path) -> None:
    with FuseServer(share, FakeMapper(), tag="t", window_size=WINDOW, map_alignment=21) as s:
        out = Guest(s).init(LINUX_6_12_DAX)
        assert out["map_alignment"] == 21 and out["all_flags"] & MAP_ALIGNMENT


# --- the pure model --------------------------------------------------------------------------


def test_window_and_table() -> None:
    window = DaxWindow(WINDOW, 12)
    assert window.check_range(0, 4096) == 0 and window.check_range(WINDOW - 4096, 4096) == 0
    assert window.check_range(WINDOW, 4096) == errno.EINVAL
    table = MappingTable()
    table.add(LiveMapping(0, 2 * MiB, 5, 0, False))
    with pytest.raises(StateError):
        table.add(LiveMapping(MiB, 2 * MiB, 5, 0, False))
    assert table.covered(0, MiB) is None and table.covered(0, 4 * MiB) == [table.snapshot()[0]]


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 2)), max_size=30))
def test_table_never_overlaps(ops: list[tuple[int, int]]) -> None:
    """Random SETUPMAPPING-like replacements keep the model free of overlaps."""
    table = MappingTable()
    for slot, size in ops:
        moffset, length = slot * MiB, size * MiB
        for live in table.overlapping(moffset, length):
            table.remove(live.moffset)
        table.add(LiveMapping(moffset, length, 2, 0, True))
        spans = sorted((m.moffset, m.end) for m in table.snapshot().values())
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert len(table.clear()) >= 0 and len(table) == 0


def test_fd_use_is_bounded(guest: Guest, server: FuseServer) -> None:
    a = guest.lookup(1, b"a")
    held = server.held_fds
    for i in range(20):
        assert guest.setupmapping(a.nodeid, 0, (i % 4) * 2 * MiB, write=bool(i % 2)) == 0
    assert server.held_fds == held  # the fds opened for fh=-1 are closed after map()
