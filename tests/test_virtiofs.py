"""The virtio-fs device model alone: FUSE requests laid into virtqueues over a MemoryImage as
Linux's driver lays them, the device's side of the rings played by hand, and a fake host
that plays QEMU's side of the back-end channel (SHMEM_MAP/UNMAP recorded, verdicts
scripted) and the back-end's deferred worker (actions run when the test says)."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fuse_guest import ENTRY_OUT, LINUX_6_12, OPEN_OUT, MiB, fd_count
from virtiofs_driver import FsQueue, Reply, Requests, make_share

from testbed.errors import ConfigError, PeerClosed, RingError, StateError
from testbed.fuse.server import SessionState
from testbed.vhost_user.devices import (
    Completion,
    Later,
    PmemSpec,
    VirtioFsDevice,
    VirtioFsSpec,
)
from testbed.vhost_user.devices.fsdax import REFUSED_ERRNO, verdict_errno
from testbed.vhost_user.memory import MemoryImage
from testbed.vhost_user.virtqueue import F_EVENT_IDX, F_INDIRECT_DESC, RingLayout, SplitQueue

WINDOW = 16 * MiB
SIZE = 16
LAYOUTS = (
    RingLayout(SIZE, desc=0x1000, avail=0x2000, used=0x3000),  # hiprio
    RingLayout(SIZE, desc=0x4000, avail=0x5000, used=0x6000),  # requests.0
)
AREAS = (0x10000, 0x60000)
CONTENT = bytes(range(256)) * (3 * MiB // 256)  # a 3 MiB file: one whole 2 MiB range


class FakeHost:
    """QEMU's side of the back-end channel and the back-end's deferred worker."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.verdicts: list[int | Exception] = []
        self.deferred: list[tuple[str, Callable[[], None]]] = []

    def _verdict(self) -> int:
        verdict = self.verdicts.pop(0) if self.verdicts else 0
        if isinstance(verdict, Exception):
            raise verdict
        return verdict

    def map(
        self,
        shmid: int,
        shm_offset: int,
        length: int,
        fd: int,
        fd_offset: int = 0,
        writable: bool = True,
    ) -> int:
        head = os.pread(fd, 4, fd_offset)
        self.calls.append(("map", shmid, shm_offset, length, fd_offset, writable, head))
        return self._verdict()

    def unmap(self, shmid: int, shm_offset: int, length: int) -> int:
        self.calls.append(("unmap", shmid, shm_offset, length))
        return self._verdict()

    def defer(self, what: str, action: Callable[[], None]) -> None:
        self.deferred.append((what, action))

    def run(self) -> None:
        """The worker: every deferred action, in order."""
        while self.deferred:
            self.deferred.pop(0)[1]()


@dataclass
class Rig:
    """Both queues of one device: the driver's side (FsQueue) and the device's side
    (SplitQueue + the model), over one MemoryImage."""

    fs: VirtioFsDevice
    host: FakeHost
    memory: MemoryImage = field(default_factory=lambda: MemoryImage(0x100000))
    requests: Requests = field(default_factory=Requests)
    delivered: list[Later] = field(default_factory=list)

    def __post_init__(self) -> None:
        pairs = zip(LAYOUTS, AREAS, strict=True)
        self.drivers = [FsQueue(self.memory, layout, area) for layout, area in pairs]
        for driver in self.drivers:
            driver.reset()
        self.devices = [SplitQueue(lay) for lay in LAYOUTS]

    def serve(self, queue: int) -> list[Later]:
        """Pop every available chain of ``queue`` and let the model answer it, as the
        back-end's RingService does; the Laters are begun, not finished."""
        laters = []
        while (chain := self.devices[queue].pop(self.memory)) is not None:
            done = self.fs.handle(queue, chain, self.memory)
            if isinstance(done, Later):
                done.begin(queue, chain.head, self.delivered.append)
                laters.append(done)
            else:
                self.devices[queue].push(self.memory, chain.head, done.written)
        return laters

    def finish(self) -> list[Completion]:
        """The serving thread's side of delivered answers: write them, complete."""
        out = []
        for later in self.delivered:
            done = later.finish(self.memory)
            self.devices[later.queue].push(self.memory, later.head, done.written)
            out.append(done)
        self.delivered.clear()
        return out

    def replies(self, queue: int = 1) -> list[Reply]:
        driver = self.drivers[queue]
        return [driver.reply(used) for used in driver.ring.take_used()]

    def call(self, request: object, queue: int = 1) -> Reply:
        """One request answered inline (no Later): its reply."""
        self.drivers[queue].send(request)  # type: ignore[arg-type]
        assert self.serve(queue) == []
        (reply,) = self.replies(queue)
        return reply

    def mount(self) -> tuple[int, int]:
        """INIT (a 6.12 guest with a window), LOOKUP of "data", OPEN: (nodeid, fh)."""
        init = self.call(self.requests.init())
        assert init.error == 0
        entry = self.call(self.requests.lookup(1, b"data"))
        nodeid = ENTRY_OUT.unpack(entry.payload)[0]
        opened = self.call(self.requests.open(nodeid))
        return nodeid, OPEN_OUT.unpack(opened.payload)[0]


@pytest.fixture
def share(tmp_path: Path) -> Path:
    return make_share(tmp_path, {"data": CONTENT})


@pytest.fixture
def rig(share: Path) -> Iterator[Rig]:
    before = fd_count()
    with VirtioFsDevice(share, tag="testfs", window_size=WINDOW, map_alignment=12) as fs:
        host = FakeHost()
        fs.start(host)
        yield Rig(fs, host)
    assert fd_count() == before


def test_config_queues_features_and_window(share: Path) -> None:
    with VirtioFsDevice(share, tag="testfs", window_size=WINDOW, num_request_queues=3) as fs:
        assert fs.config() == b"testfs".ljust(36, b"\0") + struct.pack("<I", 3)
        assert (fs.config_size, fs.num_queues) == (40, 4)
        assert fs.features == F_INDIRECT_DESC | F_EVENT_IDX
        assert dict(fs.layout.regions) == {0: WINDOW}
    with VirtioFsDevice(share, tag="x" * 36) as fs:  # 36 bytes: no NUL at all
        assert fs.config()[:36] == b"x" * 36 and not fs.layout
        assert fs.mapper is None and fs.live_mappings == {}
    with pytest.raises(ConfigError, match="request queues"):
        VirtioFsDevice(share, tag="t", num_request_queues=0)


def test_a_session_served_inline(rig: Rig) -> None:
    nodeid, fh = rig.mount()
    reply = rig.call(rig.requests.read(nodeid, fh, 4096, 100))
    assert (reply.error, reply.payload, reply.used) == (0, CONTENT[4096:4196], 116)
    # FORGET on hiprio: one readable buffer, given back with used length 0.
    rig.drivers[0].send(rig.requests.forget(nodeid, 1))
    assert rig.serve(0) == []
    assert [r.used for r in rig.replies(0)] == [0]
    assert rig.fs.requests == {"INIT": 1, "LOOKUP": 1, "OPEN": 1, "READ": 1, "FORGET": 1}
    assert rig.fs.error_replies == {} and rig.host.calls == []
    assert rig.fs.server.negotiated is not None and rig.fs.server.negotiated.dax


def test_setupmapping_is_answered_later_through_shmem_map(rig: Rig) -> None:
    nodeid, _ = rig.mount()
    rig.drivers[1].send(rig.requests.setupmapping(nodeid, 0, 2 * MiB, write=True))
    (later,) = rig.serve(1)
    assert (later.name, later.code, later.request["moffset"]) == ("SETUPMAPPING", 48, 2 * MiB)
    # Off the ring, not yet served: the work waits for the worker.
    assert rig.host.calls == [] and rig.replies() == []
    rig.host.run()
    assert rig.host.calls == [("map", 0, 2 * MiB, 2 * MiB, 0, True, CONTENT[:4])]
    assert rig.delivered == [later] and rig.replies() == []
    (done,) = rig.finish()
    assert (done.name, done.reply) == ("SETUPMAPPING", {"unique": later.request["unique"],
                                                         "error": 0, "len": 16})  # fmt: skip
    (reply,) = rig.replies()
    assert (reply.error, reply.used) == (0, 16)
    assert rig.fs.live_mappings == {2 * MiB: 2 * MiB}
    assert list(rig.fs.server_mappings) == [2 * MiB]
    stats = rig.fs.mapper_stats
    assert stats is not None and (stats.maps_sent, stats.maps_acked) == (1, 1)


def test_removemapping_and_destroy_unmap_and_settle(rig: Rig) -> None:
    nodeid, _ = rig.mount()
    for moffset in (0, 4 * MiB):
        rig.drivers[1].send(rig.requests.setupmapping(nodeid, 0, moffset, write=False))
    assert len(rig.serve(1)) == 2
    rig.host.run()
    rig.finish()
    assert [r.error for r in rig.replies()] == [0, 0]
    rig.drivers[1].send(rig.requests.removemapping(nodeid, (0, 2 * MiB)))
    (later,) = rig.serve(1)
    assert later.request["ranges"] == [[0, 2 * MiB]]
    rig.host.run()
    rig.finish()
    assert [r.error for r in rig.replies()] == [0]
    assert rig.host.calls[-1] == ("unmap", 0, 0, 2 * MiB)
    assert rig.fs.live_mappings == {4 * MiB: 2 * MiB}
    assert rig.fs.held_fds > rig.fs.idle_fds  # the node and the open handle
    # DESTROY (unmount) unmaps what is left and drops every node and handle.
    rig.drivers[1].send(rig.requests.destroy())
    (later,) = rig.serve(1)
    rig.host.run()
    rig.finish()
    assert [r.error for r in rig.replies()] == [0]
    assert rig.host.calls[-1] == ("unmap", 0, 4 * MiB, 2 * MiB)
    assert rig.fs.unsettled() == []
    stats = rig.fs.mapper_stats
    assert stats is not None
    assert (stats.maps_acked, stats.unmaps_acked, stats.dropped_by_reset) == (2, 2, 0)


def test_chains_complete_out_of_order_and_once(rig: Rig) -> None:
    nodeid, fh = rig.mount()
    ring = rig.drivers[1]
    mapping = ring.send(rig.requests.setupmapping(nodeid, 0, 0))
    (later,) = rig.serve(1)
    # While the map waits for QEMU, the FUSE server is the worker's: a READ queues behind
    # it, and a chain too short to be a request is given back at once, before both.
    read = ring.send(rig.requests.read(nodeid, fh, 0, 8))
    head = ring.ring.add([(AREAS[1] + 0xF000, 8)], [(AREAS[1] + 0xF100, 16)])
    ring.ring.expose(head)
    (queued,) = rig.serve(1)
    assert queued.name == "READ"
    used = ring.ring.take_used()
    assert [(u.id, u.length) for u in used] == [(head, 0)]
    rig.host.run()
    assert [x.name for x in rig.delivered] == ["SETUPMAPPING", "READ"]
    rig.finish()
    assert [u.id for u in ring.ring.take_used()] == [mapping, read]
    assert rig.fs.requests["SHORT"] == 1
    # A Later is resolved once; finishing it again is the back-end's business (vrings.py
    # completes only what is still outstanding), resolving it again an error.
    with pytest.raises(StateError):
        later.resolve(lambda memory: Completion(0, "X"))


def test_a_map_qemu_refuses_is_a_fuse_error(rig: Rig) -> None:
    nodeid, _ = rig.mount()
    rig.host.verdicts = [1]  # QEMU's "!!ret"
    rig.drivers[1].send(rig.requests.setupmapping(nodeid, 2 * MiB, 0))
    rig.serve(1)
    rig.host.run()
    (done,) = rig.finish()
    (reply,) = rig.replies()
    assert reply.error == -errno.EIO and done.reply["error"] == -errno.EIO
    assert rig.fs.live_mappings == {} and rig.fs.server_mappings == {}
    stats = rig.fs.mapper_stats
    assert stats is not None and (stats.maps_sent, stats.maps_refused) == (1, 1)
    assert rig.fs.error_replies == {"SETUPMAPPING": 1}
    assert (verdict_errno(0), verdict_errno(1), verdict_errno(7)) == (0, REFUSED_ERRNO, errno.EIO)


def test_a_map_without_a_verdict_is_a_fuse_error(rig: Rig) -> None:
    nodeid, _ = rig.mount()
    rig.host.verdicts = [PeerClosed("back-end channel broke during SHMEM_MAP")]
    rig.drivers[1].send(rig.requests.setupmapping(nodeid, 0, 0))
    rig.serve(1)
    rig.host.run()
    rig.finish()
    assert [r.error for r in rig.replies()] == [-errno.EIO]
    stats = rig.fs.mapper_stats
    assert stats is not None and (stats.no_verdict, stats.maps_acked) == (1, 0)


def test_a_stop_drops_the_mappings_without_unmapping(rig: Rig) -> None:
    nodeid, _ = rig.mount()
    rig.drivers[1].send(rig.requests.setupmapping(nodeid, 0, 0))
    rig.serve(1)
    rig.host.run()
    rig.finish()
    assert [r.error for r in rig.replies()] == [0]
    rig.fs.stop()  # a device reset: QEMU dropped the mapping itself
    assert [c[0] for c in rig.host.calls] == ["map"]
    assert rig.fs.unsettled() == [] and rig.fs.resets == 1
    assert rig.fs.server.state is SessionState.NEW
    stats = rig.fs.mapper_stats
    assert stats is not None and stats.dropped_by_reset == 1
    # A new start: the guest mounts again from scratch.
    rig.fs.start(rig.host)
    rig.requests.unique = 100
    assert rig.call(rig.requests.init()).error == 0


def test_a_stop_while_a_map_waits_takes_effect_after_it(rig: Rig) -> None:
    nodeid, _ = rig.mount()
    rig.drivers[1].send(rig.requests.setupmapping(nodeid, 0, 0))
    rig.serve(1)
    rig.fs.stop()
    assert rig.fs.server.state is SessionState.READY  # the reset waits its turn
    rig.host.run()
    # The map came from the run that ended: not served. Its answer is an error, which the
    # back-end drops (the stop forgot the chain with its ring).
    assert rig.host.calls == []
    (done,) = rig.finish()
    assert done.reply["error"] == -errno.EIO
    assert rig.fs.server.state is SessionState.NEW and rig.fs.unsettled() == []


def test_misplaced_and_oversized_requests_are_flagged(rig: Rig) -> None:
    nodeid, fh = rig.mount()
    # A request that wants a reply on hiprio: Linux frees hiprio buffers unread.
    rig.drivers[0].send(rig.requests.lookup(1, b"data"))
    rig.serve(0)
    (reply,) = rig.replies(0)
    assert reply.error == 0  # served all the same
    # A READ whose reply does not fit the buffer the driver gave: EIO, flagged.
    head = rig.drivers[1].send(rig.requests.read(nodeid, fh, 0, 4096), writable=64)
    chain = rig.devices[1].pop(rig.memory)
    assert chain is not None and chain.head == head
    done = rig.fs.handle(1, chain, rig.memory)
    assert isinstance(done, Completion) and done.written == 16
    assert done.reply["error"] == -errno.EIO
    assert "reply of 4112 bytes" in done.problems[0].detail
    with pytest.raises(RingError, match="virtio-fs has 2 queues"):
        rig.fs.handle(5, chain, rig.memory)


def test_without_a_window_nothing_waits_and_setupmapping_is_enosys(share: Path) -> None:
    with VirtioFsDevice(share, tag="plain") as fs:
        host = FakeHost()
        fs.start(host)
        rig = Rig(fs, host)
        init = rig.call(rig.requests.init(LINUX_6_12))
        assert init.error == 0
        assert rig.call(rig.requests.setupmapping(1, 0, 0)).error == -errno.ENOSYS
        assert host.calls == [] and host.deferred == []


def test_specs_describe_and_build(share: Path, tmp_path: Path) -> None:
    spec = VirtioFsSpec(share, "testfs", window_size=WINDOW, num_request_queues=2)
    assert (spec.virtio_id, spec.num_vqs, spec.config_size) == (26, 3, 40)
    assert dict(spec.layout.regions) == {0: WINDOW}
    with spec.build() as fs:
        assert fs.num_queues == 3 and fs.layout == spec.layout and fs.tag == "testfs"
    for bad in ("", "a\nb", "x" * 37):
        with pytest.raises(ConfigError, match="tag"):
            VirtioFsSpec(share, bad)
    with pytest.raises(ConfigError):
        VirtioFsSpec(share, "t", window_size=3 * MiB)  # not a power of two
    pmem = PmemSpec(2 * MiB)
    assert (pmem.virtio_id, pmem.num_vqs, pmem.config_size) == (27, 1, 16)
    with pmem.build() as device:
        assert device.size == 2 * MiB
    with pytest.raises(ConfigError):
        PmemSpec(3 * MiB)
