"""vhost-user wire format (pure) and framing over a socketpair (fds via SCM_RIGHTS)."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.device import ShmemLayout
from testbed.errors import ConfigError, PeerClosed, ProtocolError, StateError, WaitTimeout
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user.backend import Backend, DisconnectKind
from testbed.vhost_user.codes import F_SHMEM, BackendRequest, ProtocolFeature, Request, request_name
from testbed.vhost_user.connection import Connection, Message, OwnedFd, connect
from testbed.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    U64,
    ConfigSpace,
    Header,
    MemoryRegion,
    MemoryTable,
    MMap,
    ShMemConfig,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
    decode_payload,
)
from testbed.vhost_user.trace import FROM_QEMU, Trace

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


# --- numbers that must match QEMU 11.1.3 -------------------------------------------------


def test_request_numbers_match_qemu() -> None:
    assert Request.GET_FEATURES == 1
    assert Request.SET_BACKEND_REQ_FD == 21
    assert Request.GET_MAX_MEM_SLOTS == 36
    assert Request.GET_SHMEM_CONFIG == 44
    assert len(Request) == 44
    assert BackendRequest.SHMEM_MAP == 9
    assert BackendRequest.SHMEM_UNMAP == 10
    assert len(BackendRequest) == 10


def test_shmem_feature_bit_is_22() -> None:
    assert F_SHMEM == 22
    assert ProtocolFeature.SHMEM == 1 << 22
    assert ProtocolFeature.GET_VRING_BASE_INFLIGHT == 1 << 20
    assert ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN == 1 << 23


def test_struct_sizes() -> None:
    assert ShMemConfig.FORMAT.size == 2056
    assert MMap.FORMAT.size == 40
    assert VringAddr.FORMAT.size == 40
    assert len(SingleMemRegion(MemoryRegion(0, 4096, 0, 0)).pack()) == 40


# --- header ------------------------------------------------------------------------------


def test_header_flags() -> None:
    header = Header.make(Request.GET_SHMEM_CONFIG, 2056, reply=True)
    assert header.flags == 0x5
    assert header.is_reply and not header.need_reply
    assert header.is_reply_for(Request.GET_SHMEM_CONFIG)
    assert not header.is_reply_for(Request.GET_FEATURES)
    need = Header.make(BackendRequest.SHMEM_MAP, 40, need_reply=True)
    assert need.flags == 1 | FLAG_NEED_REPLY
    assert Header.unpack(need.pack(), backend_channel=True) == need


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (struct.pack("<III", 1, 0, 0), "version 0"),
        (struct.pack("<III", 1, 2, 0), "version 2"),
        (struct.pack("<III", 1, 1 | 0x10, 0), "reserved flag bits"),
        (struct.pack("<III", 45, 1, 0), "unknown request 45"),
        (struct.pack("<III", 0, 1, 0), "unknown request 0"),
        (struct.pack("<III", 1, 1, 1 << 20), "exceeds"),
        (b"\x01\x00\x00", "expected 12 bytes"),
    ],
)
def test_header_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        Header.unpack(raw)
    assert info.value.data == raw


def test_header_backend_channel_numbers() -> None:
    raw = struct.pack("<III", 11, 1, 0)
    with pytest.raises(ProtocolError, match="back-end channel"):
        Header.unpack(raw, backend_channel=True)
    assert Header.unpack(raw).request == Request.GET_VRING_BASE
    assert request_name(9, backend_channel=True) == "SHMEM_MAP"
    assert request_name(99) == "UNKNOWN_99"


@given(st.binary(max_size=16), st.booleans())
def test_header_decodes_or_raises_protocol_error(data: bytes, backend: bool) -> None:
    try:
        header = Header.unpack(data, backend_channel=backend)
    except ProtocolError:
        return
    assert header.pack() == data


@given(st.sampled_from(list(Request)), u32, st.booleans(), st.booleans())
def test_header_round_trip(request: Request, size: int, reply: bool, need: bool) -> None:
    header = Header.make(request, size % 4097, reply=reply, need_reply=need)
    assert Header.unpack(header.pack()) == header
    assert bool(header.flags & FLAG_REPLY) == reply


# --- payloads ----------------------------------------------------------------------------


@given(u32, u32)
def test_vring_state_round_trip(index: int, num: int) -> None:
    assert VringState.unpack(VringState(index, num).pack()) == VringState(index, num)


@given(u32, st.integers(0, 1), u64, u64, u64, u64)
def test_vring_addr_round_trip(i: int, f: int, d: int, u: int, a: int, lg: int) -> None:
    value = VringAddr(i, f, d, u, a, lg)
    assert VringAddr.unpack(value.pack()) == value


def test_vring_addr_unknown_flag() -> None:
    with pytest.raises(ProtocolError, match="unknown flags"):
        VringAddr.unpack(struct.pack("<IIQQQQ", 0, 2, 0, 0, 0, 0))


def test_vring_file() -> None:
    assert VringFile.unpack(struct.pack("<Q", 0x100 | 3)) == VringFile(3, True)
    assert VringFile.unpack(VringFile(7, False).pack()) == VringFile(7, False)
    with pytest.raises(ProtocolError, match="reserved bits"):
        VringFile.unpack(struct.pack("<Q", 0x200))


regions = st.builds(
    MemoryRegion,
    st.integers(0, 2**48),
    st.integers(1, 2**40),
    u64,
    st.integers(0, 2**40),
)


@given(st.lists(regions, max_size=8))
def test_memory_table_round_trip(rs: list[MemoryRegion]) -> None:
    table = MemoryTable(tuple(rs))
    packed = table.pack()
    assert len(packed) == 8 + 32 * len(rs)
    assert MemoryTable.unpack(packed) == table


def test_memory_table_rejects() -> None:
    region = MemoryRegion(0, 4096, 0, 0).pack()
    with pytest.raises(ProtocolError, match="nregions 9"):
        MemoryTable.unpack(struct.pack("<II", 9, 0) + region * 9)
    with pytest.raises(ProtocolError, match="expected 40 bytes"):
        MemoryTable.unpack(struct.pack("<II", 1, 0) + region + b"\0")
    with pytest.raises(ProtocolError, match="padding"):
        MemoryTable.unpack(struct.pack("<II", 1, 7) + region)
    with pytest.raises(ProtocolError, match="size 0"):
        MemoryTable.unpack(struct.pack("<II", 1, 0) + MemoryRegion(0, 0, 0, 0).pack())
    with pytest.raises(ProtocolError):
        MemoryTable(tuple([MemoryRegion(0, 1, 0, 0)] * 9)).pack()


@given(regions)
def test_single_region_round_trip(region: MemoryRegion) -> None:
    assert SingleMemRegion.unpack(SingleMemRegion(region).pack()).region == region


@given(u32, u32, st.binary(max_size=256))
def test_config_round_trip(offset: int, flags: int, data: bytes) -> None:
    value = ConfigSpace(offset, flags, data)
    assert ConfigSpace.unpack(value.pack()) == value


def test_config_size_limit() -> None:
    with pytest.raises(ProtocolError, match="size 257"):
        ConfigSpace.unpack(struct.pack("<III", 0, 257, 0) + bytes(257))


@given(st.dictionaries(st.integers(0, 255), st.integers(1, 2**63), max_size=12))
def test_shmem_config_round_trip(rs: dict[int, int]) -> None:
    config = ShMemConfig.from_regions(rs)
    assert config.nregions == len(rs)
    packed = config.pack()
    assert len(packed) == 2056
    back = ShMemConfig.unpack(packed)
    assert back == config
    assert back.regions == rs


def test_shmem_config_layout_on_the_wire() -> None:
    packed = ShMemConfig.from_regions({3: 8 << 20, 200: 8 << 20}).pack()
    nregions, padding = struct.unpack_from("<II", packed)
    assert (nregions, padding) == (2, 0)
    sizes = struct.unpack_from("<256Q", packed, 8)
    assert sizes[3] == sizes[200] == 8 << 20
    assert sum(1 for s in sizes if s) == 2


def test_shmem_config_rejects() -> None:
    with pytest.raises(ProtocolError, match="nregions 257"):
        ShMemConfig.unpack(struct.pack("<II256Q", 257, 0, *([0] * 256)))
    with pytest.raises(ProtocolError, match="padding"):
        ShMemConfig.unpack(struct.pack("<II256Q", 0, 1, *([0] * 256)))
    with pytest.raises(ProtocolError, match="expected 2056 bytes"):
        ShMemConfig.unpack(bytes(2048))
    with pytest.raises(ProtocolError, match="shmid 256"):
        ShMemConfig.from_regions({256: 4096})
    # pack() keeps a disagreeing nregions: fault injection needs it.
    assert ShMemConfig.unpack(ShMemConfig(5, (4096,) + (0,) * 255).pack()).nregions == 5


mmaps = st.builds(
    MMap,
    st.integers(0, 255),
    st.integers(0, 2**62),
    st.integers(0, 2**62),
    st.integers(1, 2**62),
    st.integers(0, 1),
)


@given(mmaps)
def test_mmap_round_trip(value: MMap) -> None:
    packed = value.pack()
    assert len(packed) == 40
    assert packed[1:8] == bytes(7)
    assert MMap.unpack(packed) == value


def test_mmap_rejects() -> None:
    good = MMap(1, 0, 0, 4096, 1).pack()
    with pytest.raises(ProtocolError, match="padding"):
        MMap.unpack(good[:1] + b"\x01" + good[2:])
    with pytest.raises(ProtocolError, match="unknown flags"):
        MMap.unpack(MMap(1, 0, 0, 4096, 2).pack())
    with pytest.raises(ProtocolError, match="length 0"):
        MMap.unpack(MMap(1, 0, 0, 0, 0).pack())
    with pytest.raises(ProtocolError, match="overflows"):
        MMap.unpack(MMap(1, 0, 2**64 - 4096, 8192, 0).pack())
    with pytest.raises(ProtocolError):
        MMap(256, 0, 0, 1).pack()


@given(
    st.integers(0, 50),
    st.binary(max_size=2100),
    st.booleans(),
    st.booleans(),
)
# No per-example deadline: a pure function, but a loaded host (parallel QEMU runs) stalls it.
@settings(max_examples=500, deadline=None)
def test_decode_payload_total(request: int, body: bytes, reply: bool, backend: bool) -> None:
    """Any bytes for any request number decode or raise ProtocolError, nothing else."""
    try:
        decode_payload(request, body, reply=reply, backend_channel=backend)
    except ProtocolError as exc:
        assert exc.data is None or isinstance(exc.data, bytes)


def test_decode_payload_by_direction() -> None:
    assert decode_payload(Request.GET_FEATURES, b"") is None
    assert decode_payload(Request.GET_FEATURES, U64(7).pack(), reply=True) == U64(7)
    # A REPLY_ACK answer to a request without its own reply is a u64.
    assert decode_payload(Request.SET_MEM_TABLE, U64(0).pack(), reply=True) == U64(0)
    config = decode_payload(
        Request.GET_SHMEM_CONFIG, ShMemConfig.from_regions({0: 4096}).pack(), reply=True
    )
    assert isinstance(config, ShMemConfig) and config.regions == {0: 4096}
    with pytest.raises(ProtocolError, match="carries no payload"):
        decode_payload(Request.SET_OWNER, b"\0")
    mm = decode_payload(
        BackendRequest.SHMEM_MAP, MMap(2, 0, 0, 4096, 1).pack(), backend_channel=True
    )
    assert mm == MMap(2, 0, 0, 4096, 1)


def test_trace_records_malformed_payloads(tmp_path: object) -> None:
    trace = Trace()
    entry = trace.record(FROM_QEMU, Header.make(Request.SET_FEATURES, 3), b"abc", 0)
    assert entry.error and "expected 8 bytes" in entry.error
    assert entry.payload == {"raw": "616263"}
    assert trace.names() == ["SET_FEATURES"]
    assert "SET_FEATURES(2)" in entry.one_line()


# --- framing over a socketpair -----------------------------------------------------------


def _pair() -> tuple[Connection, Connection]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(a), Connection(b)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_send_recv_with_fds() -> None:
    left, right = _pair()
    with left, right:
        r, w = os.pipe()
        try:
            body = VringFile(0, False).pack()
            left.send(Header.make(Request.SET_VRING_CALL, len(body)), body, [w])
        finally:
            os.close(w)
        msg = right.recv()
        with msg:
            assert msg.header.request == Request.SET_VRING_CALL
            assert decode_payload(msg.header.request, msg.body) == VringFile(0, False)
            assert len(msg.fds) == 1
            os.write(msg.fds[0].fileno(), b"x")
            assert os.read(r, 1) == b"x"
        assert msg.fds[0].closed
        os.close(r)


def test_received_fds_closed_exactly_once() -> None:
    before = _open_fds()
    left, right = _pair()
    fds = [os.memfd_create("t") for _ in range(8)]
    table = MemoryTable(tuple(MemoryRegion(i << 20, 4096, 0, 0) for i in range(8)))
    body = table.pack()
    left.send(Header.make(Request.SET_MEM_TABLE, len(body)), body, fds)
    for fd in fds:
        os.close(fd)
    msg = right.recv()
    assert len(msg.fds) == 8
    kept: OwnedFd = msg.fds.pop()
    msg.close()
    msg.close()  # idempotent
    kept.close()
    kept.close()
    left.close()
    right.close()
    assert _open_fds() == before


def test_too_many_fds_rejected() -> None:
    with pytest.raises(ProtocolError, match="9 fds"):
        left, right = _pair()
        with left, right:
            left.send(Header.make(Request.SET_OWNER, 0), b"", [0] * 9)


def test_peer_closed_and_partial() -> None:
    left, right = _pair()
    left.close()
    with right, pytest.raises(PeerClosed):
        right.recv()
    a, b = socket.socketpair()
    a.sendall(Header.make(Request.SET_FEATURES, 8).pack() + b"\0\0")
    a.close()
    with Connection(b) as conn, pytest.raises(ProtocolError, match="middle of a payload"):
        conn.recv()


def test_recv_rejects_bad_header() -> None:
    a, b = socket.socketpair()
    a.sendall(struct.pack("<III", 1, 0x11, 0))
    a.close()
    with Connection(b) as conn, pytest.raises(ProtocolError, match="reserved flag bits"):
        conn.recv()


def test_header_size_must_match() -> None:
    left, right = _pair()
    with left, right, pytest.raises(ProtocolError, match="header says 8"):
        left.send(Header.make(Request.SET_FEATURES, 8), b"")
    assert HEADER_SIZE == 12


# --- the back-end's state machine against a scripted front-end (our code only) ----------


@pytest.fixture
def private_dir() -> Iterator[Path]:
    path = make_private_dir("test-proto")
    yield path
    remove_tree(path)


def _ask(conn: Connection, request: Request, body: bytes = b"", **flags: bool) -> Message:
    conn.send(Header.make(request, len(body), **flags), body)
    return conn.recv()


def test_backend_handshake_reply_ack_and_error_disconnect(private_dir: Path) -> None:
    path = private_dir / "vu.sock"
    before = _open_fds()
    with Backend(path, ShmemLayout({1: 4096 * 4})) as backend:
        with connect(path, 5.0) as fe:
            reply = _ask(fe, Request.GET_PROTOCOL_FEATURES)
            offered = U64.unpack(reply.body).value
            assert reply.header.is_reply_for(Request.GET_PROTOCOL_FEATURES)
            assert offered & ProtocolFeature.SHMEM and offered & ProtocolFeature.REPLY_ACK
            body = U64(int(ProtocolFeature.REPLY_ACK | ProtocolFeature.SHMEM)).pack()
            fe.send(Header.make(Request.SET_PROTOCOL_FEATURES, 8), body)
            # NEED_REPLY on a request without a reply of its own: a u64 ack, 0 = success.
            ack = _ask(fe, Request.SET_OWNER, need_reply=True)
            assert ack.header.is_reply_for(Request.SET_OWNER)
            assert U64.unpack(ack.body) == U64(0)
            # An unsupported request fails its ack instead of killing the connection.
            nack = _ask(fe, Request.SET_LOG_BASE, b"\0" * 16, need_reply=True)
            assert U64.unpack(nack.body).value != 0
            shm = _ask(fe, Request.GET_SHMEM_CONFIG)
            assert shm.header.flags == 0x5
            assert ShMemConfig.unpack(shm.body).regions == {1: 16384}
            # Vring fds are kept (and a replaced one closed).
            for _ in range(2):
                r, w = os.pipe()
                body = VringFile(0, False).pack()
                fe.send(Header.make(Request.SET_VRING_CALL, 8), body, [w])
                os.close(w)
                os.close(r)
            backend.wait_for_request(Request.SET_VRING_CALL, 5.0, count=2)
            session = backend.session
            assert session is not None and list(session.mappings.vring_fds) == [
                ("SET_VRING_CALL", 0)
            ]
            # A malformed message drops the connection as an error.
            fe.sock.sendall(struct.pack("<III", Request.SET_FEATURES, 0x1, 3) + b"abc")
            assert backend.wait_disconnected(5.0) is DisconnectKind.ERROR
        # A fresh connection on the same path gets a fresh session.
        with connect(path, 5.0) as fe2:
            assert U64.unpack(_ask(fe2, Request.GET_FEATURES).body).value >> 32 & 1
            backend.wait_connected(5.0, count=2)
            assert backend.session is not None and backend.session.protocol_features == 0
        assert backend.wait_disconnected(5.0, count=2) is DisconnectKind.CLEAN
    assert not path.exists()
    assert _open_fds() == before


def test_backend_refuses_map_without_a_session(private_dir: Path) -> None:
    with Backend(private_dir / "vu.sock", ShmemLayout()) as backend:
        with pytest.raises(StateError, match="disconnected"):
            backend.unmap(0, 0, 4096)
        backend.close()
        backend.close()  # idempotent
    with (
        Backend(private_dir / "other.sock", ShmemLayout()) as idle,
        pytest.raises(WaitTimeout, match="GET_FEATURES x1 did not happen"),
    ):
        idle.wait_for_request(Request.GET_FEATURES, 0.05)


def test_listener_requires_private_dir(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    with pytest.raises(ConfigError, match="0700"):
        Backend(tmp_path / "vu.sock", ShmemLayout()).start()
