"""The back-end serving a virtqueue for a device model, against a scripted front-end (our
code only): a memfd plays guest RAM, eventfds play kick and call."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from driver_ring import DriverQueue, Used

from testbed.device import ShmemLayout
from testbed.errors import ConfigError
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.codes import ProtocolFeature, Request, VhostUserFeature
from testbed.vhost_user.connection import Connection, Message, connect
from testbed.vhost_user.devices import PmemDevice
from testbed.vhost_user.memory import MappedMemory
from testbed.vhost_user.protocol import (
    U64,
    ConfigSpace,
    Header,
    MemoryRegion,
    MemoryTable,
    VringAddr,
    VringFile,
    VringState,
)
from testbed.vhost_user.trace import QUEUE_REPLY, QUEUE_REQUEST
from testbed.vhost_user.virtqueue import RingLayout

M = 1 << 20
RAM = 1 * M
USER = 0x7F00_0000_0000  # where "QEMU" has guest RAM mapped: SET_VRING_ADDR speaks of it
LAYOUT = RingLayout(8, desc=0x1000, avail=0x2000, used=0x3000)
REQ, RESP = 0x8000, 0x8100


@pytest.fixture
def private_dir() -> Iterator[Path]:
    path = make_private_dir("test-vrings")
    yield path
    remove_tree(path)


def ask(conn: Connection, request: Request, body: bytes = b"") -> Message:
    conn.send(Header.make(request, len(body)), body)
    return conn.recv()


def tell(
    conn: Connection, request: Request, body: bytes = b"", fds: list[int] | None = None
) -> None:
    conn.send(Header.make(request, len(body)), body, fds or [])


def test_the_model_decides_features_config_and_queues(private_dir: Path) -> None:
    with PmemDevice(2 * M) as pmem, Backend(private_dir / "vu.sock", device=pmem) as backend:
        assert backend.layout == pmem.layout
        with connect(private_dir / "vu.sock", 5.0) as fe:
            features = U64.unpack(ask(fe, Request.GET_FEATURES).body).value
            assert features == pmem.features | VhostUserFeature.VERSION_1 | (
                VhostUserFeature.PROTOCOL_FEATURES
            )
            protocol = U64.unpack(ask(fe, Request.GET_PROTOCOL_FEATURES).body).value
            assert protocol & ProtocolFeature.CONFIG
            assert U64.unpack(ask(fe, Request.GET_QUEUE_NUM).body).value == 1
            body = ConfigSpace(0, 0, bytes(16)).pack()
            config = ConfigSpace.unpack(ask(fe, Request.GET_CONFIG, body).body)
            assert config.data == struct.pack("<QQ", 0, 2 * M)
            body = ConfigSpace(8, 0, bytes(16)).pack()  # past the end: zeros
            assert ConfigSpace.unpack(ask(fe, Request.GET_CONFIG, body).body).data == (
                struct.pack("<Q", 2 * M) + bytes(8)
            )


def test_the_plain_test_device_keeps_its_layout_and_queue_count(private_dir: Path) -> None:
    layout = ShmemLayout({0: 2 * M})
    with Backend(private_dir / "vu.sock", layout, num_queues=3) as backend:
        with connect(private_dir / "vu.sock", 5.0) as fe:
            assert U64.unpack(ask(fe, Request.GET_QUEUE_NUM).body).value == 3
            protocol = U64.unpack(ask(fe, Request.GET_PROTOCOL_FEATURES).body).value
            assert not protocol & ProtocolFeature.CONFIG
            tell(fe, Request.SET_VRING_BASE, VringState(0, 0x8000_0005).pack())
            reply = ask(fe, Request.GET_VRING_BASE, VringState(0, 0).pack())
            assert VringState.unpack(reply.body) == VringState(0, 0x8000_0005)  # as it came
        assert backend.device.name == "test"


def test_a_model_and_a_disagreeing_layout_or_queue_count_are_refused(private_dir: Path) -> None:
    with PmemDevice(2 * M) as pmem:
        with pytest.raises(ConfigError, match="the device decides"):
            Backend(private_dir / "a.sock", ShmemLayout({0: 4 * M}), device=pmem)
        with pytest.raises(ConfigError, match="has 1"):
            Backend(private_dir / "b.sock", device=pmem, num_queues=2)


class Front:
    """A scripted front-end that starts one ring of a pmem back-end over a memfd."""

    def __init__(self, conn: Connection, ram: int) -> None:
        self.conn = conn
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ram = ram

    def start(self, features: int) -> None:
        tell(self.conn, Request.SET_FEATURES, U64(features).pack())
        region = MemoryRegion(0, RAM, USER, 0)
        tell(self.conn, Request.SET_MEM_TABLE, MemoryTable((region,)).pack(), [self.ram])
        tell(self.conn, Request.SET_VRING_NUM, VringState(0, LAYOUT.size).pack())
        tell(self.conn, Request.SET_VRING_BASE, VringState(0, 0).pack())
        addr = VringAddr(0, 0, USER + LAYOUT.desc, USER + LAYOUT.used, USER + LAYOUT.avail, 0)
        tell(self.conn, Request.SET_VRING_ADDR, addr.pack())
        # Call and err first (QEMU sends them at realize): the kick may start the ring.
        for request, fd in (
            (Request.SET_VRING_ERR, self.err),
            (Request.SET_VRING_CALL, self.call),
            (Request.SET_VRING_KICK, self.kick),
        ):
            tell(self.conn, request, VringFile(0, nofd=False).pack(), [fd])
        tell(self.conn, Request.SET_VRING_ENABLE, VringState(0, 1).pack())

    def signalled(self, fd: int) -> int:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            os.close(fd)


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("test-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    yield fd
    os.close(fd)


def test_a_kicked_ring_is_served(private_dir: Path, ram: int) -> None:
    with (
        PmemDevice(2 * M, ring_features=0) as pmem,
        Backend(private_dir / "vu.sock", device=pmem) as backend,
        MappedMemory([(MemoryRegion(0, RAM, 0, 0), ram)]) as guest,
        connect(private_dir / "vu.sock", 5.0) as conn,
    ):
        front = Front(conn, ram)
        try:
            driver = DriverQueue(guest, LAYOUT)
            driver.reset()
            # A request already there before the ring starts: served when it becomes
            # servable, without a kick.
            guest.write(REQ, struct.pack("<I", 0))
            first = driver.add([(REQ, 4)], [(RESP, 4)])
            driver.expose(first)
            front.start(int(VhostUserFeature.VERSION_1 | VhostUserFeature.PROTOCOL_FEATURES))
            backend.wait_until(lambda: pmem.flushes == 1, 5.0, "the early FLUSH served")
            assert driver.take_used() == [Used(first, 4)]
            assert front.signalled(front.call) == 1
            # Then one that comes with a kick, and an unknown type.
            guest.write(REQ + 0x10, struct.pack("<I", 9))
            second = driver.add([(REQ + 0x10, 4)], [(RESP + 0x10, 4)])
            driver.expose(second)
            os.eventfd_write(front.kick, 1)
            backend.wait_until(
                lambda: len(backend.trace.names(QUEUE_REPLY)) == 2, 5.0, "the kick served"
            )
            assert driver.take_used() == [Used(second, 4)]
            assert struct.unpack("<I", guest.read(RESP + 0x10, 4)) == (1,)
            assert [(v.request, v.rule) for v in backend.violations] == [
                ("VRING_0", "device-request")
            ]
            assert backend.trace.names(QUEUE_REQUEST) == ["FLUSH", "UNKNOWN_9"]
            # GET_VRING_BASE stops the ring where it stands; the device model stops.
            reply = ask(conn, Request.GET_VRING_BASE, VringState(0, 0).pack())
            assert VringState.unpack(reply.body) == VringState(0, 2)
            backend.wait_until(lambda: not pmem.running, 5.0, "the model stopped")
            assert pmem.started == 1
        finally:
            front.close()


def test_a_broken_ring_signals_its_err_fd(private_dir: Path, ram: int) -> None:
    with (
        PmemDevice(2 * M) as pmem,
        Backend(private_dir / "vu.sock", device=pmem) as backend,
        MappedMemory([(MemoryRegion(0, RAM, 0, 0), ram)]) as guest,
        connect(private_dir / "vu.sock", 5.0) as conn,
    ):
        front = Front(conn, ram)
        try:
            DriverQueue(guest, LAYOUT).reset()
            # Without PROTOCOL_FEATURES a ring is enabled from the start (no ENABLE needed).
            front.start(int(VhostUserFeature.VERSION_1))
            guest.write(LAYOUT.avail + 2, struct.pack("<H", 100))  # 100 entries ahead
            os.eventfd_write(front.kick, 1)
            backend.wait_until(lambda: bool(backend.violations), 5.0, "the bad ring flagged")
            assert [v.rule for v in backend.violations] == ["vring-index"]
            assert front.signalled(front.err) == 1
            assert front.signalled(front.call) == 0
        finally:
            front.close()
