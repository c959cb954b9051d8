"""Fuzzing both sides of the vhost-user channels, bounded to a few seconds each.

1. Our back-end's request handling: hypothesis writes arbitrary headers, payloads (random
   bytes and well-formed bodies with random fields) and fds (memfds, sockets, pipes) down a
   real socket into a running Backend. It must never die (only drop the connection, as
   ProtocolError / PeerClosed handling does), and every received fd must be closed when the
   connection ends: /proc/self/fd is counted before and after each example.
   (tests/test_protocol.py already proves the pure codecs total; this is the I/O layer.)
2. QEMU's side of the back-end channel: malformed SHMEM_MAP / SHMEM_UNMAP (bad shmid, zero
   length, overflowing or unaligned offsets, unknown flags, missing or extra or unmappable
   fd, wrong payload size) sent to a guest-less QEMU at DRIVER_OK (qtest plays the guest).
   Each must get an error reply (u64 != 0) and leave QEMU alive with a usable channel.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from testbed.bugs import KnownBugSeen
from testbed.bugs.marks import known_bug
from testbed.device import ShmemLayout, VhostUserDevice
from testbed.errors import PeerClosed, TestbedError
from testbed.fuzz.fdspec import FdKind, FdSpec
from testbed.fuzz.files import open_fd
from testbed.host.qemu import resolve_qemu
from testbed.machine import QtestConfig, QtestMachine
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.codes import BackendRequest, Request
from testbed.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    VERSION,
    MemoryRegion,
    MemoryTable,
    MMap,
    VringFile,
    VringState,
)
from testbed.vhost_user.shmem import Memfd

M = 1 << 20
U64_MAX = (1 << 64) - 1
TIMEOUT = 10.0


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fds_settle(expected: set[str], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while open_fds() != expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = make_private_dir("test-fuzz")
    yield path
    remove_tree(path)


# --- 1. the back-end under arbitrary input ------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, U64_MAX)
REGION = MemoryRegion(0, 4096, 0x7F0000000000, 0)
regions = st.builds(MemoryRegion, u64, st.integers(1, 1 << 40), u64, u64)
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.binary(min_size=2040, max_size=2100),
    u64.map(lambda v: struct.pack("<Q", v)),
    st.builds(VringState, u32, u32).map(lambda v: v.pack()),
    st.builds(VringFile, st.integers(0, 255), st.booleans()).map(lambda v: v.pack()),
    st.lists(regions, max_size=8).map(lambda rs: MemoryTable(tuple(rs)).pack()),
    st.builds(MMap, st.integers(0, 255), u64, u64, u64, st.integers(0, 3)).map(lambda m: m.pack()),
)
# The requests that carry fds or change state get extra weight: that is where fds leak.
FD_REQUESTS = [
    Request.SET_BACKEND_REQ_FD,
    Request.SET_VRING_KICK,
    Request.SET_VRING_CALL,
    Request.SET_VRING_ERR,
    Request.SET_MEM_TABLE,
    Request.ADD_MEM_REG,
    Request.REM_MEM_REG,
]
requests = st.one_of(st.sampled_from(FD_REQUESTS), st.sampled_from(list(Request)), u32)
flags = st.one_of(st.sampled_from([VERSION, VERSION | FLAG_NEED_REPLY]), u32)


@dataclass(frozen=True)
class Wire:
    request: int
    flags: int
    body: bytes
    size_delta: int  # header size minus real body size (0 = consistent)
    fds: tuple[str, ...]  # kinds of fd to attach


wires = st.builds(
    Wire,
    requests,
    flags,
    bodies,
    st.one_of(st.just(0), st.just(0), st.integers(-16, 16)),
    st.lists(st.sampled_from(["memfd", "socket", "pipe"]), max_size=3).map(tuple),
)


def _make_fd(kind: str, keep: list[int]) -> int:
    if kind == "memfd":
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4096)
        keep.append(fd)
        return fd
    if kind == "socket":
        a, b = socket.socketpair()
        keep += [a.detach(), b.detach()]
        return keep[-2]
    r, w = os.pipe()
    keep += [r, w]
    return w


def _send(sock: socket.socket, wire: Wire) -> None:
    size = max(0, len(wire.body) + wire.size_delta)
    data = struct.pack("<III", wire.request, wire.flags, size) + wire.body
    ours: list[int] = []
    try:
        fds = [_make_fd(kind, ours) for kind in wire.fds]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        sock.sendmsg([data], anc if fds else [])
    finally:
        for fd in ours:
            os.close(fd)


def test_backend_survives_arbitrary_input_without_leaking_fds(sockdir: Path) -> None:
    path = sockdir / "vu.sock"
    before_all = open_fds()
    with Backend(path, ShmemLayout({0: 2 * M, 7: 2 * M})) as backend:
        connections = 0

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(wires, min_size=1, max_size=6))
        # Found by this test: a pipe as the back-end channel killed the serving thread.
        @example([Wire(Request.SET_BACKEND_REQ_FD, VERSION, b"", 0, ("pipe",))])
        @example([Wire(Request.SET_BACKEND_REQ_FD, VERSION, b"", 0, ("memfd", "socket"))])
        @example([Wire(Request.SET_MEM_TABLE, VERSION, MemoryTable((REGION,) * 2).pack(), 0,
                       ("memfd",))])  # fmt: skip
        def feed(messages: list[Wire]) -> None:
            nonlocal connections
            before = open_fds()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
                for wire in messages:
                    try:
                        _send(sock, wire)
                    except (BrokenPipeError, ConnectionResetError):
                        break  # the back-end dropped us for an earlier message: fine
            connections += 1
            # Once the back-end has seen the connection end, it holds none of its fds.
            backend.wait_disconnected(TIMEOUT, count=connections)
            assert backend.running, "the back-end thread died"
            # The message's fds are closed just after the disconnect is recorded.
            assert fds_settle(before), f"fds leaked by the back-end: {open_fds() - before}"

        feed()
        assert backend.running
    assert fds_settle(before_all)


def test_backend_wrap_dispatcher_serves_every_request(sockdir: Path) -> None:
    """The public hook the fuzzer bends replies through (Dispatcher.build_like): the
    wrapped dispatcher answers."""
    from testbed.vhost_user.backend.dispatch import Dispatcher

    seen: list[Request] = []

    class Counting(Dispatcher):
        def dispatch(self, s, msg, request):  # type: ignore[no-untyped-def]
            seen.append(request)
            super().dispatch(s, msg, request)

    def wrap(base: Dispatcher) -> Dispatcher:
        return base.build_like(Counting)

    path = sockdir / "vu.sock"
    with Backend(path, ShmemLayout(), wrap_dispatcher=wrap) as backend:
        backend.start()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            sock.sendall(struct.pack("<III", Request.GET_FEATURES, VERSION, 0))
            reply = sock.recv(20, socket.MSG_WAITALL)
        assert struct.unpack("<III", reply[:12])[0] == Request.GET_FEATURES
        backend.wait_for_request(Request.GET_FEATURES, TIMEOUT)
    assert seen == [Request.GET_FEATURES]


# --- 2. QEMU's side of the back-end channel ------------------------------------------------


@dataclass(frozen=True)
class BadRequest:
    request: BackendRequest
    body: bytes
    fds: tuple[str, ...]  # testbed.fuzz.fdspec kinds: "memfd" is the 1 MiB memfd
    bug: str = ""  # the registry id of the known bug: QEMU 11.1.3 answers 0 (mapped)
    accepted: str = ""  # what QEMU accepted, in the registry's words


def _mmap(shmid: int, fd_offset: int, shm_offset: int, length: int, flags: int = 1) -> bytes:
    return MMap(shmid, fd_offset, shm_offset, length, flags).pack()


MAP, UNMAP = BackendRequest.SHMEM_MAP, BackendRequest.SHMEM_UNMAP
# Every request is the good one below with ONE thing changed (a field, the payload's size,
# the fds), so that a field QEMU refuses cannot hide another one it takes.
GOOD = {"shmid": 0, "fd_offset": 0, "shm_offset": 0, "length": M, "flags": 1}


def _bad(request: BackendRequest = MAP, fds: tuple[str, ...] = ("memfd",), **field: int) -> bytes:
    assert len(field) <= 1, "one thing at a time"
    f = {**GOOD, **({"flags": 0} if request is UNMAP else {}), **field}
    return _mmap(f["shmid"], f["fd_offset"], f["shm_offset"], f["length"], f["flags"])


BAD_REQUESTS = {
    "map-bad-shmid": BadRequest(MAP, _bad(shmid=200), ("memfd",)),
    "map-zero-length": BadRequest(MAP, _bad(length=0), ("memfd",)),
    "map-shm-offset-overflows": BadRequest(MAP, _bad(shm_offset=U64_MAX - 4095), ("memfd",)),
    "map-fd-offset-overflows": BadRequest(MAP, _bad(fd_offset=U64_MAX - 4095), ("memfd",)),
    "map-length-huge": BadRequest(MAP, _bad(length=1 << 63), ("memfd",)),
    "map-unaligned-fd-offset": BadRequest(MAP, _bad(fd_offset=1), ("memfd",)),
    "map-unaligned-shm-offset": BadRequest(
        MAP,
        _bad(shm_offset=0x800),
        ("memfd",),
        "shmem-map-unaligned-accepted",
        "SHMEM_MAP with shm_offset not a page multiple accepted",
    ),
    "map-unaligned-length": BadRequest(
        MAP,
        _bad(length=M - 0x800),
        ("memfd",),
        "shmem-map-unaligned-accepted",
        "SHMEM_MAP with length not a page multiple accepted",
    ),
    "map-unknown-flags": BadRequest(
        MAP,
        _bad(flags=0xF1),
        ("memfd",),
        "shmem-map-unknown-flags-accepted",
        "SHMEM_MAP ignores unknown flag bits (0xf1)",
    ),
    "map-missing-fd": BadRequest(MAP, _bad(), ()),
    "map-socket": BadRequest(MAP, _bad(), ("socket",)),
    "map-pipe": BadRequest(MAP, _bad(), ("pipe",)),
    "map-directory": BadRequest(MAP, _bad(), ("dir",)),
    "map-eventfd": BadRequest(MAP, _bad(), ("eventfd",)),
    "map-read-write-of-a-read-only-fd": BadRequest(MAP, _bad(), ("rofd",)),
    "map-opath-fd": BadRequest(
        MAP,
        _bad(),
        ("opath",),
        "backend-channel-opath-fd-closes-channel",
        "QEMU closed the back-end channel on SHMEM_MAP with an O_PATH fd",
    ),
    "map-short-payload": BadRequest(
        MAP,
        _bad()[:-8],
        ("memfd",),
        "shmem-map-payload-size-accepted",
        "SHMEM_MAP with a 32-byte payload is mapped",
    ),
    "map-long-payload": BadRequest(
        MAP,
        _bad() + bytes(8),
        ("memfd",),
        "shmem-map-payload-size-accepted",
        "SHMEM_MAP with a 48-byte payload is mapped",
    ),
    "unmap-zero-length": BadRequest(UNMAP, _bad(UNMAP, length=0), ()),
    "unmap-overflows": BadRequest(UNMAP, _bad(UNMAP, shm_offset=U64_MAX - 4095), ()),
    "unmap-bad-shmid": BadRequest(UNMAP, _bad(UNMAP, shmid=9), ()),
    "unmap-never-mapped": BadRequest(UNMAP, _bad(UNMAP), ()),
    "unmap-with-fd": BadRequest(UNMAP, _bad(UNMAP), ("memfd",)),
}


@pytest.fixture(scope="module")
def qemu_x86() -> Path:
    try:
        return resolve_qemu("x86_64").path
    except TestbedError as exc:
        pytest.skip(f"no QEMU 11.1 for x86_64: {exc}")


def _case(name: str) -> object:
    bug = BAD_REQUESTS[name].bug
    marks = [known_bug(bug)] if bug else []
    return pytest.param(name, id=name, marks=marks)


@contextlib.contextmanager
def _started(qemu_path: Path, sockdir: Path) -> Iterator[tuple[Backend, QtestMachine, Memfd]]:
    """Regions {0: 2M, 1: 2M} at DRIVER_OK (qtest plays the driver), and a 1 MiB memfd."""
    with (
        Backend(sockdir / "vu.sock", ShmemLayout({0: 2 * M, 1: 2 * M})) as backend,
        QtestMachine(
            QtestConfig("x86_64", qemu_path, (VhostUserDevice("vu0", sockdir / "vu.sock"),))
        ).start() as qemu,
        Memfd(M) as mem,
    ):
        qemu.pci().start_device()
        backend.wait_driver_ok(TIMEOUT)
        yield backend, qemu, mem


@pytest.mark.qemu
def test_the_good_request_the_bad_ones_start_from_is_mapped(qemu_x86: Path, sockdir: Path) -> None:
    with _started(qemu_x86, sockdir) as (backend, _, mem):
        assert backend.channel_request(MAP, _bad(), [mem.fileno()]) == 0
        assert backend.channel_request(UNMAP, _bad(UNMAP), []) == 0


@pytest.mark.qemu
@pytest.mark.parametrize("case", [_case(name) for name in BAD_REQUESTS])
def test_qemu_refuses_malformed_channel_requests(case: str, qemu_x86: Path, sockdir: Path) -> None:
    bad = BAD_REQUESTS[case]
    with _started(qemu_x86, sockdir) as (backend, qemu, mem):
        opened = [open_fd(FdSpec(FdKind(k), M), sockdir) for k in bad.fds if k != "memfd"]
        try:
            fds = [mem.fileno() if k == "memfd" else opened.pop(0).sent for k in bad.fds]
            try:
                verdict: int | str = backend.channel_request(bad.request, bad.body, fds)
            except PeerClosed as exc:
                verdict = f"channel closed: {exc}"
        finally:
            for made in opened:
                made.close()
        alive = qemu.returncode is None
        stderr = qemu.stderr_text()
        assert alive, f"QEMU died ({qemu.returncode}) on {case}:\n{stderr[-2000:]}"
        if isinstance(verdict, str) and bad.bug == "backend-channel-opath-fd-closes-channel":
            raise KnownBugSeen(bad.bug, bad.accepted)
        assert isinstance(verdict, int), f"{case}: {verdict}; stderr:\n{stderr}"
        # The channel still works: a good map and unmap succeed afterwards.
        assert backend.map(1, 0, M, mem.fileno()) == 0
        if verdict == 0 and bad.bug:
            raise KnownBugSeen(bad.bug, bad.accepted)
        assert verdict != 0, f"QEMU accepted {case} (u64 0); stderr:\n{stderr}"
        assert backend.unmap(1, 0, M) == 0
        assert qemu.qmp("query-status")["status"] == "running"
