"""The virtio-fs device behind our real back-end (serving thread, deferred worker, rings),
against a scripted front-end that also plays QEMU's side of the back-end channel: a memfd
is guest RAM, eventfds are kick and call, and the test answers each SHMEM_MAP/UNMAP by
hand -- after checking that the serving thread still answers QEMU while the map waits
(QEMU sends SET_MEM_TABLE before it answers a map)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_guest import ENTRY_OUT, MiB
from virtiofs_driver import FsQueue, Requests, make_share

from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user.backend import Backend, Violation
from testbed.vhost_user.codes import BackendRequest, ProtocolFeature, Request, VhostUserFeature
from testbed.vhost_user.connection import Connection, Message, connect
from testbed.vhost_user.devices import VirtioFsDevice
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.memory import MappedMemory
from testbed.vhost_user.protocol import (
    U64,
    Header,
    MemoryRegion,
    MemoryTable,
    MMap,
    VringAddr,
    VringFile,
    VringState,
)
from testbed.vhost_user.trace import (
    CHANNEL_FROM_QEMU,
    CHANNEL_TO_QEMU,
    QUEUE_REPLY,
    QUEUE_REQUEST,
)
from testbed.vhost_user.virtqueue import RingLayout

RAM = 4 * MiB
USER = 0x7F00_0000_0000  # where "QEMU" has guest RAM: SET_VRING_ADDR speaks of it
LAYOUTS = (
    RingLayout(16, desc=0x1000, avail=0x2000, used=0x3000),
    RingLayout(16, desc=0x4000, avail=0x5000, used=0x6000),
)
AREAS = (0x10000, 0x60000)
TIMEOUT = 5.0
CONTENT = bytes(range(256)) * (2 * MiB // 256)
PROTOCOL = (
    ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.BACKEND_SEND_FD
    | ProtocolFeature.CONFIG
    | (1 << 22)  # SHMEM
)


class FakeQemu:
    """The front-end on the main socket and QEMU's end of the back-end channel."""

    def __init__(self, conn: Connection, ram: int) -> None:
        self.conn = conn
        self.ram = ram
        ours, theirs = socket.socketpair()
        self.channel = Connection(ours, backend_channel=True)
        self._theirs = theirs
        self.fds = {
            (kind, i): os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            for kind in ("kick", "call", "err")
            for i in range(len(LAYOUTS))
        }
        self.channel.settimeout(TIMEOUT)
        conn.settimeout(TIMEOUT)

    def tell(self, request: Request, body: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        self.conn.send(Header.make(request, len(body)), body, fds)

    def ask(self, request: Request, body: bytes = b"", fds: tuple[int, ...] = ()) -> Message:
        """A request with a reply of its own, or NEED_REPLY (REPLY_ACK): the answer."""
        need = request not in (
            Request.GET_FEATURES,
            Request.GET_SHMEM_CONFIG,
            Request.GET_VRING_BASE,
        )
        self.conn.send(Header.make(request, len(body), need_reply=need), body, fds)
        return self.conn.recv()

    def start(self) -> None:
        """QEMU's realize and vhost_dev_start, in the order QEMU 11.1.3 sends them."""
        self.ask(Request.GET_FEATURES)
        self.tell(Request.SET_PROTOCOL_FEATURES, U64(PROTOCOL).pack())
        self.ask(Request.GET_SHMEM_CONFIG)
        self.tell(Request.SET_BACKEND_REQ_FD, b"", (self._theirs.fileno(),))
        self._theirs.close()
        features = VhostUserFeature.VERSION_1 | VhostUserFeature.PROTOCOL_FEATURES
        self.tell(Request.SET_FEATURES, U64(int(features)).pack())
        self.set_mem_table()
        for i, layout in enumerate(LAYOUTS):
            self.tell(Request.SET_VRING_NUM, VringState(i, layout.size).pack())
            self.tell(Request.SET_VRING_BASE, VringState(i, 0).pack())
            addr = VringAddr(i, 0, USER + layout.desc, USER + layout.used, USER + layout.avail, 0)
            self.tell(Request.SET_VRING_ADDR, addr.pack())
            for kind, request in (("err", Request.SET_VRING_ERR), ("call", Request.SET_VRING_CALL),
                                  ("kick", Request.SET_VRING_KICK)):  # fmt: skip
                self.tell(request, VringFile(i, nofd=False).pack(), (self.fds[(kind, i)],))
            self.tell(Request.SET_VRING_ENABLE, VringState(i, 1).pack())

    def set_mem_table(self, *, wait: bool = False) -> None:
        """SET_MEM_TABLE; ``wait``: with NEED_REPLY, and the REPLY_ACK read back -- what
        QEMU does while it handles a SHMEM_MAP (it waits for our answer)."""
        table = MemoryTable((MemoryRegion(0, RAM, USER, 0),)).pack()
        if not wait:
            self.tell(Request.SET_MEM_TABLE, table, (self.ram,))
            return
        with self.ask(Request.SET_MEM_TABLE, table, (self.ram,)) as ack:
            assert ack.header.is_reply and U64.unpack(ack.body).value == 0

    def kick(self, queue: int) -> None:
        os.eventfd_write(self.fds[("kick", queue)], 1)

    def called(self, queue: int) -> int:
        try:
            return os.eventfd_read(self.fds[("call", queue)])
        except BlockingIOError:
            return 0

    def channel_request(self) -> tuple[BackendRequest, MMap, bytes]:
        """The next SHMEM_MAP/UNMAP from the back-end: request, payload, first bytes of
        the fd's content at fd_offset (b"" without an fd)."""
        with self.channel.recv() as msg:
            mmap = MMap.unpack(msg.body)
            assert msg.header.need_reply
            head = os.pread(msg.fds[0].fileno(), 8, mmap.fd_offset) if msg.fds else b""
            return BackendRequest(msg.header.request), mmap, head

    def answer(self, request: BackendRequest, verdict: int) -> None:
        self.channel.send(Header.make(request, 8, reply=True), U64(verdict).pack())

    def close(self) -> None:
        self.channel.close()
        self._theirs.close()
        for fd in self.fds.values():
            os.close(fd)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    return make_share(tmp_path, {"data": CONTENT})


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("test-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    yield fd
    os.close(fd)


class Rig:
    def __init__(self, backend: Backend, fs: VirtioFsDevice, qemu: FakeQemu, guest: MappedMemory):
        self.backend, self.fs, self.qemu = backend, fs, qemu
        self.queues = [FsQueue(guest, lay, area) for lay, area in zip(LAYOUTS, AREAS, strict=True)]
        for queue in self.queues:
            queue.reset()
        self.requests = Requests()

    def replies(self, count: int) -> None:
        self.backend.wait_until(
            lambda: len(self.backend.trace.names(QUEUE_REPLY)) >= count, TIMEOUT,
            f"{count} chain(s) answered",
        )  # fmt: skip

    def call(self, request: object, total: int) -> bytes:
        self.queues[1].send(request)  # type: ignore[arg-type]
        self.qemu.kick(1)
        self.replies(total)
        (used,) = self.queues[1].ring.take_used()
        reply = self.queues[1].reply(used)
        assert reply.error == 0
        return reply.payload


@pytest.fixture
def make_rig(share: Path, ram: int, tmp_path: Path) -> Iterator[object]:
    sockdir = make_private_dir("test-vfs")
    opened: list[object] = []

    def make(window: int = 16 * MiB, faults: Faults | None = None) -> Rig:
        fs = VirtioFsDevice(share, tag="testfs", window_size=window, map_alignment=12)
        backend = Backend(sockdir / "vu.sock", device=fs, faults=faults).start()
        guest = MappedMemory([(MemoryRegion(0, RAM, 0, 0), ram)])
        conn = connect(sockdir / "vu.sock", TIMEOUT)
        qemu = FakeQemu(conn, ram)
        opened.extend([fs, guest, backend, conn, qemu])  # closed in reverse
        qemu.start()
        backend.wait_driver_ok(TIMEOUT)
        return Rig(backend, fs, qemu, guest)

    yield make
    for thing in reversed(opened):
        thing.close()  # type: ignore[attr-defined]
    remove_tree(sockdir)


def test_a_map_waits_while_the_serving_thread_answers_qemu(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = make_rig()
    backend, qemu, queue = rig.backend, rig.qemu, rig.queues[1]
    rig.call(rig.requests.init(), 1)
    nodeid = ENTRY_OUT.unpack(rig.call(rig.requests.lookup(1, b"data"), 2))[0]
    qemu.called(1)
    mapping = queue.send(rig.requests.setupmapping(nodeid, 0, 0))
    qemu.kick(1)
    request, mmap, head = qemu.channel_request()
    assert (request, mmap) == (BackendRequest.SHMEM_MAP, MMap(0, 0, 0, 2 * MiB, 1))
    assert head == CONTENT[:8]
    # QEMU, handling the map, sends a new memory table and waits for our answer: the
    # serving thread must give it while the map is outstanding.
    qemu.set_mem_table(wait=True)
    # More chains meanwhile: a LOOKUP queues behind the map (the FUSE server is busy), a
    # chain too short to be a request is given back at once -- out of order.
    lookup = queue.send(rig.requests.lookup(1, b"data"))
    short = queue.ring.add([(AREAS[1] + 0xF000, 8)], [(AREAS[1] + 0xF100, 16)])
    queue.ring.expose(short)
    qemu.kick(1)
    rig.replies(3)
    assert [u.id for u in queue.ring.take_used()] == [short]
    assert rig.fs.live_mappings == {}
    qemu.answer(request, 0)
    rig.replies(5)
    used = queue.ring.take_used()
    assert [u.id for u in used] == [mapping, lookup]
    assert [queue.reply(u).error for u in used] == [0, 0]
    assert qemu.called(1) >= 1
    assert rig.fs.live_mappings == {0: 2 * MiB}
    # The trace: the request, then its SHMEM_MAP and QEMU's verdict, then the reply.
    names = [
        (e.direction, e.name) for e in backend.trace.entries()
        if e.name in ("SETUPMAPPING", "SHMEM_MAP") or e.direction == CHANNEL_FROM_QEMU
    ]  # fmt: skip
    assert names == [
        (QUEUE_REQUEST, "SETUPMAPPING"),
        (CHANNEL_TO_QEMU, "SHMEM_MAP"),
        (CHANNEL_FROM_QEMU, "SHMEM_MAP"),
        (QUEUE_REPLY, "SETUPMAPPING"),
    ]
    assert [v.rule for v in backend.violations] == ["device-request"]  # the short chain

    # REMOVEMAPPING -> SHMEM_UNMAP; DESTROY with nothing mapped sends nothing.
    queue.send(rig.requests.removemapping(nodeid, (0, 2 * MiB)))
    qemu.kick(1)
    request, mmap, _ = qemu.channel_request()
    assert (request, mmap) == (BackendRequest.SHMEM_UNMAP, MMap(0, 0, 0, 2 * MiB, 0))
    qemu.answer(request, 0)
    rig.replies(6)
    (removed,) = queue.ring.take_used()
    assert queue.reply(removed).error == 0
    rig.call(rig.requests.destroy(), 7)
    assert rig.fs.unsettled() == []
    stats = rig.fs.mapper_stats
    assert stats is not None and (stats.maps_acked, stats.unmaps_acked) == (1, 1)


def test_a_stop_while_a_map_waits_drops_its_answer(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = make_rig()
    qemu, queue = rig.qemu, rig.queues[1]
    rig.call(rig.requests.init(), 1)
    nodeid = ENTRY_OUT.unpack(rig.call(rig.requests.lookup(1, b"data"), 2))[0]
    queue.send(rig.requests.setupmapping(nodeid, 0, 0))
    qemu.kick(1)
    request, _, _ = qemu.channel_request()
    # The guest resets the device: QEMU stops every ring (GET_VRING_BASE), then answers.
    for i in range(len(LAYOUTS)):
        with qemu.ask(Request.GET_VRING_BASE, VringState(i, 0).pack()) as reply:
            assert VringState.unpack(reply.body).index == i
    rig.backend.wait_until(lambda: not rig.fs.running, TIMEOUT, "the device stopped")
    qemu.answer(request, 0)
    rig.backend.wait_until(
        lambda: rig.fs.resets == 1 and rig.fs.unsettled() == [], TIMEOUT,
        "the reset after the map settled",
    )  # fmt: skip
    assert queue.ring.take_used() == []  # the chain was forgotten, its answer dropped
    stats = rig.fs.mapper_stats
    assert stats is not None and (stats.maps_acked, stats.dropped_by_reset) == (1, 1)
    assert rig.backend.trace.names(QUEUE_REPLY).count("SETUPMAPPING") == 0


def test_our_own_map_outside_the_served_region_is_a_violation(make_rig) -> None:  # type: ignore[no-untyped-def]
    # The back-end serves region 0 as 2 MiB (a fault) while the device's window is 4 MiB:
    # the guest's SETUPMAPPING at 2 MiB is inside the window, our SHMEM_MAP is not.
    rig: Rig = make_rig(window=4 * MiB, faults=Faults(shmem_raw_sizes={0: 2 * MiB}))
    qemu, queue = rig.qemu, rig.queues[1]
    rig.call(rig.requests.init(), 1)
    nodeid = ENTRY_OUT.unpack(rig.call(rig.requests.lookup(1, b"data"), 2))[0]
    queue.send(rig.requests.setupmapping(nodeid, 0, 2 * MiB))
    qemu.kick(1)
    request, mmap, _ = qemu.channel_request()
    assert mmap.shm_offset == 2 * MiB
    qemu.answer(request, 1)  # QEMU refuses what lies past the region
    rig.replies(3)
    (used,) = queue.ring.take_used()
    assert queue.reply(used).error == -5  # EIO
    assert rig.backend.violations == [
        Violation(
            "SHMEM_MAP",
            "shmem-map",
            "range 0x200000+0x200000 beyond region 0 of 0x200000 bytes",
        )
    ]
    (sent,) = [e for e in rig.backend.trace.entries() if e.direction == CHANNEL_TO_QEMU]
    assert [v["rule"] for v in sent.violations] == ["shmem-map"]
    # The same request sent on purpose (Backend.map, as scenarios do to see QEMU refuse
    # it) is traced with what it breaks, not counted against the back-end.
    verdicts: list[int] = []
    sender = threading.Thread(
        target=lambda: verdicts.append(rig.backend.map(0, 2 * MiB, 2 * MiB, qemu.ram, 0))
    )
    sender.start()
    request, _, _ = qemu.channel_request()
    qemu.answer(request, 1)
    sender.join(TIMEOUT)
    assert verdicts == [1] and len(rig.backend.violations) == 1
    sent = [e for e in rig.backend.trace.entries() if e.direction == CHANNEL_TO_QEMU][-1]
    assert [v["rule"] for v in sent.violations] == ["shmem-map"]
