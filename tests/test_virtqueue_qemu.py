"""Our back-end's virtqueues against real QEMU 11.1.3, no guest: vhost-user-test-device
configured as virtio-pmem (virtio-id 27, one queue, 16 bytes of config space), served by the
pmem device model. Over qtest we play the guest's virtio driver: negotiate features, place
the queue in guest RAM, reach DRIVER_OK, put requests in the ring and notify the queue."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from driver_ring import DriverQueue, Used

from testbed.device import VhostUserDevice
from testbed.errors import TestbedError
from testbed.host.qemu import resolve_qemu
from testbed.machine import QtestConfig, QtestMachine
from testbed.machine.qtest import PciFunctionDriver
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.codes import Request
from testbed.vhost_user.devices import PmemDevice
from testbed.vhost_user.devices.pmem import F_SHMEM_REGION, VIRTIO_ID_PMEM
from testbed.vhost_user.trace import (
    CHANNEL_FROM_QEMU,
    CHANNEL_TO_QEMU,
    QUEUE_REPLY,
    QUEUE_REQUEST,
    TO_QEMU,
)
from testbed.vhost_user.virtqueue import F_EVENT_IDX, F_INDIRECT_DESC, Descriptor, RingLayout
from testbed.virtio import DEVICE_STATUS, F_VERSION_1, QueueSetup

pytestmark = pytest.mark.qemu

M = 1 << 20
TIMEOUT = 20.0
QUEUE_SIZE = 16
FLUSH = struct.pack("<I", 0)
PATTERN = bytes(range(256)) * 16
ARCHES = ["x86_64", "aarch64"]


def _qemu(arch: str) -> Path:
    try:
        return resolve_qemu(arch).path
    except TestbedError as exc:
        pytest.skip(f"no QEMU 11.1 for {arch}: {exc}")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = make_private_dir("test-vq")
    yield path
    remove_tree(path)


@dataclass
class Rig:
    """QEMU with the pmem device started by our qtest driver, the back-end serving it."""

    qemu: QtestMachine
    backend: Backend
    pmem: PmemDevice
    pci: PciFunctionDriver
    ring: DriverQueue
    features: int
    base: int  # a scratch area in guest RAM for requests, responses and tables

    def flush(self, *, indirect: bool = False) -> int:
        """A FLUSH as Linux's driver makes it; returns the head."""
        req, resp = self.base, self.base + 0x100
        self.ring.memory.write(req, FLUSH)
        self.ring.memory.write(resp, b"\xee" * 4)
        table = self.base + 0x200 if indirect else None
        head = self.ring.add([(req, 4)], [(resp, 4)], indirect_table=table)
        self.ring.expose(head)
        self.pci.notify(0)
        return head

    def answered(self, count: int) -> list[Used]:
        """Wait until the back-end has answered ``count`` chains in all; the completions."""
        self.backend.wait_until(
            lambda: len(self.backend.trace.names(QUEUE_REPLY)) >= count,
            TIMEOUT,
            f"{count} chain(s) answered on queue 0",
        )
        return self.ring.take_used()

    def ret(self) -> int:
        return int(struct.unpack("<I", self.ring.memory.read(self.base + 0x100, 4))[0])


@pytest.fixture(params=ARCHES)
def rig(request: pytest.FixtureRequest, sockdir: Path, tmp_path: Path) -> Iterator[Rig]:
    """The trace stays in tmp_path (pytest --basetemp=DIR keeps it where you want it)."""
    arch: str = request.param
    sock = sockdir / "pmem.sock"
    with PmemDevice(2 * M) as pmem:
        pmem.write(0, PATTERN)
        device = VhostUserDevice(
            "vu0", sock, pmem.layout, virtio_id=VIRTIO_ID_PMEM, num_vqs=1, config_size=16
        )
        config = QtestConfig(arch, _qemu(arch), (device,), qtest=True)
        with (
            Backend(sock, device=pmem, trace_path=tmp_path / "trace.jsonl") as backend,
            QtestMachine(config).start() as qemu,
        ):
            backend.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
            base = qemu.ram_base + 0x10_0000
            layout = RingLayout(QUEUE_SIZE, desc=base, avail=base + 0x1000, used=base + 0x2000)
            ring = DriverQueue(qemu.memory(), layout)
            ring.reset()
            pci = qemu.pci()
            features = pci.start_device(
                features=F_VERSION_1 | pmem.features,
                queues=[QueueSetup(0, QUEUE_SIZE, layout.desc, layout.avail, layout.used)],
            )
            backend.wait_driver_ok(TIMEOUT)
            yield Rig(qemu, backend, pmem, pci, ring, features, base + 0x3000)
            assert qemu.returncode is None, "QEMU died under the test"


def _poll(read: Callable[[], int], done: Callable[[int], bool], what: str) -> int:
    """Poll a guest-visible register over qtest (QEMU takes the call eventfd in its main
    loop, so there is no event of ours to wait on): every 10 ms, for up to TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value:#x} after {TIMEOUT} s")
        time.sleep(0.01)


def test_flush_over_a_real_ring(rig: Rig) -> None:
    backend, pmem, qemu = rig.backend, rig.pmem, rig.qemu
    assert rig.features == F_VERSION_1 | F_SHMEM_REGION | F_INDIRECT_DESC | F_EVENT_IDX
    seen = backend.trace.names()
    for name in ("SET_MEM_TABLE", "SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_KICK"):
        assert name in seen, f"QEMU sent no {name}: {seen}"
    assert seen.count("SET_VRING_CALL") >= 2  # realize, then the start's guest notifier
    assert seen.index("SET_FEATURES") < seen.index("SET_VRING_ADDR") < seen.index("SET_VRING_KICK")

    # The start mapped the backing over region 0 (deferred off the serving thread).
    backend.wait_until(
        lambda: bool(pmem.map_results or pmem.map_errors), TIMEOUT, "the SHMEM_MAP answered"
    )
    assert (pmem.map_results, pmem.map_errors) == ([0], [])
    assert backend.trace.names(CHANNEL_TO_QEMU) == ["SHMEM_MAP"]
    assert [e.payload for e in backend.trace.entries() if e.direction == CHANNEL_FROM_QEMU] == [
        {"value": 0}
    ]
    assert qemu.qtest is not None
    assert qemu.qtest.read(rig.pci.bars[4], len(PATTERN)) == PATTERN
    # QEMU asks us for the config space (GET_CONFIG) when the driver reads it.
    assert rig.pci.device_config(0, 16) == struct.pack("<QQ", 0, 2 * M)

    rig.pci.isr()  # clear
    head = rig.flush()
    assert rig.answered(1) == [Used(head, 4)]
    assert rig.ret() == 0 and pmem.flushes == 1
    # The call eventfd reached QEMU: it raised the queue interrupt (ISR bit 0).
    _poll(rig.pci.isr, lambda isr: bool(isr & 1), "ISR after the FLUSH")
    # EVENT_IDX: the device asks for the next kick at the next entry.
    assert rig.ring.avail_event() == 1

    head = rig.flush(indirect=True)
    assert rig.answered(2) == [Used(head, 4)]
    assert rig.ret() == 0 and pmem.flushes == 2

    requests = [e for e in backend.trace.entries() if e.direction == QUEUE_REQUEST]
    replies = [e for e in backend.trace.entries() if e.direction == QUEUE_REPLY]
    assert [(e.queue, e.name, e.request, e.size, e.payload) for e in requests] == [
        (0, "FLUSH", 0, 4, {"type": 0}),
    ] * 2
    assert [(e.queue, e.name, e.size, e.payload) for e in replies] == [
        (0, "FLUSH", 4, {"ret": 0}),
    ] * 2
    assert backend.violations == []
    assert backend.trace.path is not None
    lines = backend.trace.path.read_text().splitlines()
    assert sum('"direction": "queue:' in line for line in lines) == 4


def test_bad_descriptor_is_a_violation_and_serving_goes_on(rig: Rig) -> None:
    backend, pmem = rig.backend, rig.pmem
    outside = 0x7F_0000_0000  # no RAM there on either machine
    head = rig.ring.add([(outside, 4)], [(rig.base + 0x100, 4)])
    rig.ring.expose(head)
    rig.pci.notify(0)
    assert rig.answered(1) == [Used(head, 0)]
    (violation,) = backend.violations
    assert (violation.request, violation.rule) == ("VRING_0", "vring-desc-range")
    assert "outside every region" in violation.detail
    (entry,) = [e for e in backend.trace.entries() if e.violations]
    assert (entry.direction, entry.head, entry.name) == (QUEUE_REQUEST, head, "BAD_CHAIN")

    # A loop next: flagged the same way.
    loop = rig.ring.add([(rig.base, 4)])
    rig.ring.write_descriptor(loop, Descriptor(rig.base, 4, 1, loop))  # NEXT to itself
    rig.ring.expose(loop)
    rig.pci.notify(0)
    assert rig.answered(2) == [Used(loop, 0)]
    assert [v.rule for v in backend.violations] == ["vring-desc-range", "vring-loop"]

    # The queue, the back-end and QEMU still serve a good request.
    head = rig.flush()
    assert rig.answered(3) == [Used(head, 4)]
    assert rig.ret() == 0 and pmem.flushes == 1
    assert rig.qemu.qmp("query-status")["status"] == "running"
    assert backend.running and backend.connected


def test_reset_stops_the_device_and_a_new_start_maps_again(rig: Rig) -> None:
    backend, pmem, qemu = rig.backend, rig.pmem, rig.qemu
    backend.wait_until(lambda: bool(pmem.map_results), TIMEOUT, "the first SHMEM_MAP answered")
    head = rig.flush()
    assert rig.answered(1) == [Used(head, 4)]
    assert qemu.qtest is not None
    qemu.qtest.write_int(rig.pci.common_address(DEVICE_STATUS), 8, 0)  # the guest resets it
    backend.wait_until(lambda: not pmem.running, TIMEOUT, "the device model stopped")
    # GET_VRING_BASE stopped the ring and was told where it stood.
    stop = [e for e in backend.trace.entries() if e.direction == TO_QEMU][-1]
    assert (stop.name, stop.payload) == ("GET_VRING_BASE", {"index": 0, "num": 1})

    # A fresh driver: the ring from scratch, started again; the backing mapped again (QEMU
    # dropped the first mapping on the reset: the same map is not an overlap).
    rig.ring = DriverQueue(rig.ring.memory, rig.ring.layout)
    rig.ring.reset()
    layout = rig.ring.layout
    rig.pci.start_device(
        features=rig.features,
        queues=[QueueSetup(0, QUEUE_SIZE, layout.desc, layout.avail, layout.used)],
    )
    backend.wait_until(lambda: len(pmem.map_results) == 2, TIMEOUT, "the second SHMEM_MAP")
    assert (pmem.map_results, pmem.map_errors, pmem.started) == ([0, 0], [], 2)
    pmem.write(0, b"after the restart")
    assert qemu.qtest.read(rig.pci.bars[4], 17) == b"after the restart"
    head = rig.flush()
    assert rig.answered(2) == [Used(head, 4)]
    assert pmem.flushes == 2 and backend.violations == []


def test_a_head_beyond_the_queue_breaks_the_ring(rig: Rig) -> None:
    backend = rig.backend
    rig.ring.expose(QUEUE_SIZE + 3)
    rig.pci.notify(0)
    backend.wait_until(lambda: bool(backend.violations), TIMEOUT, "the bad head flagged")
    (violation,) = backend.violations
    assert (violation.request, violation.rule) == ("VRING_0", "vring-index")
    assert "queue no longer served" in violation.detail
    (entry,) = [e for e in backend.trace.entries() if e.violations]
    assert (entry.direction, entry.head, entry.name) == (QUEUE_REQUEST, None, "BROKEN")
    session = backend.session
    assert session is not None and session.rings[0].broken is not None
    assert rig.ring.used_idx() == 0  # no chain to give back
    # The err eventfd told QEMU, which says so and keeps running.
    rig.qemu.wait_stderr("vhost vring error in virtqueue 0", TIMEOUT)
    assert rig.qemu.qmp("query-status")["status"] == "running"
