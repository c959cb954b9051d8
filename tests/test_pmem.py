"""The virtio-pmem device model alone: requests on a memory image, its backing, its map."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from driver_ring import DriverQueue

from testbed.errors import ConfigError, PeerClosed, RingError
from testbed.vhost_user.devices import PmemDevice, Problem
from testbed.vhost_user.devices.pmem import F_SHMEM_REGION, RET_EIO
from testbed.vhost_user.memory import MemoryImage
from testbed.vhost_user.virtqueue import F_INDIRECT_DESC, Chain, RingLayout, SplitQueue

M = 1 << 20
REQ = 0x8000
RESP = 0x9000


class FakeSync:
    def __init__(self, error: OSError | None = None) -> None:
        self.calls: list[int] = []
        self.error = error

    def __call__(self, fd: int) -> None:
        self.calls.append(fd)
        if self.error is not None:
            raise self.error


@pytest.fixture
def sync() -> FakeSync:
    return FakeSync()


@pytest.fixture
def pmem(sync: FakeSync) -> Iterator[PmemDevice]:
    with PmemDevice(2 * M, sync=sync) as device:
        yield device


def chain_for(request: bytes, response_size: int = 4) -> tuple[MemoryImage, Chain]:
    """One request chain as Linux's driver makes it: the request readable, the response
    writable."""
    memory = MemoryImage(0x10000)
    layout = RingLayout(8, 0x1000, 0x2000, 0x3000)
    driver = DriverQueue(memory, layout)
    driver.reset()
    memory.write(REQ, request)
    memory.write(RESP, b"\xee" * 8)
    readable = [(REQ, len(request))] if request else []
    writable = [(RESP, response_size)] if response_size else []
    driver.expose(driver.add(readable, writable))
    chain = SplitQueue(layout).pop(memory)
    assert chain is not None
    return memory, chain


def ret(memory: MemoryImage) -> int:
    return int(struct.unpack("<I", memory.read(RESP, 4))[0])


def test_flush_syncs_the_backing_and_answers_0(pmem: PmemDevice, sync: FakeSync) -> None:
    memory, chain = chain_for(struct.pack("<I", 0))
    done = pmem.handle(0, chain, memory)
    assert sync.calls == [pmem.fd]
    assert (done.written, done.name, done.code, done.problems) == (4, "FLUSH", 0, ())
    assert (done.request, done.reply) == ({"type": 0}, {"ret": 0})
    assert ret(memory) == 0
    assert pmem.flushes == 1 and pmem.failed_flushes == 0


def test_a_failed_sync_answers_non_zero() -> None:
    sync = FakeSync(OSError(5, "Input/output error"))
    with PmemDevice(2 * M, sync=sync) as pmem:
        memory, chain = chain_for(struct.pack("<I", 0))
        done = pmem.handle(0, chain, memory)
        assert done.reply == {"ret": RET_EIO} and ret(memory) == RET_EIO
        assert pmem.flushes == 1 and pmem.failed_flushes == 1


def test_an_unknown_type_is_a_violation_answered_non_zero(pmem: PmemDevice) -> None:
    memory, chain = chain_for(struct.pack("<I", 7))
    done = pmem.handle(0, chain, memory)
    assert (done.name, done.code, done.written) == ("UNKNOWN_7", 7, 4)
    assert done.problems == (Problem("device-request", "unknown request type 7"),)
    assert ret(memory) == RET_EIO and pmem.flushes == 0


def test_a_short_request_is_a_violation_answered_non_zero(pmem: PmemDevice) -> None:
    memory, chain = chain_for(b"\0\0")
    done = pmem.handle(0, chain, memory)
    assert (done.name, done.code, done.written) == ("SHORT", -1, 4)
    assert [p.rule for p in done.problems] == ["device-request"]
    assert "request of 2 bytes" in done.problems[0].detail
    assert ret(memory) == RET_EIO and pmem.flushes == 0


def test_a_short_response_buffer_gets_nothing(pmem: PmemDevice, sync: FakeSync) -> None:
    memory, chain = chain_for(struct.pack("<I", 0), response_size=2)
    done = pmem.handle(0, chain, memory)
    assert done.written == 0 and done.reply == {}
    assert "response buffer of 2 bytes" in done.problems[0].detail
    assert memory.read(RESP, 4) == b"\xee" * 4  # untouched
    assert sync.calls == [pmem.fd]  # the flush itself happened


def test_no_response_buffer_and_no_request(pmem: PmemDevice) -> None:
    memory, chain = chain_for(b"", response_size=4)
    assert pmem.handle(0, chain, memory).written == 4
    memory, chain = chain_for(struct.pack("<I", 0), response_size=0)
    assert pmem.handle(0, chain, memory).written == 0


def test_a_chain_on_another_queue_cannot_be_answered(pmem: PmemDevice) -> None:
    memory, chain = chain_for(struct.pack("<I", 0))
    with pytest.raises(RingError) as info:
        pmem.handle(1, chain, memory)
    assert (info.value.rule, info.value.head) == ("device-request", chain.head)


def test_features_config_and_layout(pmem: PmemDevice) -> None:
    assert pmem.features & F_SHMEM_REGION and pmem.features & F_INDIRECT_DESC
    assert pmem.num_queues == 1 and pmem.config_size == 16
    assert pmem.config() == struct.pack("<QQ", 0, 2 * M)
    assert dict(pmem.layout.regions) == {0: 2 * M}
    with PmemDevice(2 * M, ring_features=0) as bare:
        assert bare.features == F_SHMEM_REGION


def test_backing_access(pmem: PmemDevice) -> None:
    pmem.write(4096, b"pattern")
    assert pmem.read(4096, 7) == b"pattern"
    assert os.pread(pmem.fd, 7, 4096) == b"pattern"
    with pytest.raises(ConfigError, match="size is"):
        pmem.read(2 * M - 2, 4)


def test_backing_from_a_path_or_an_fd(tmp_path: Path) -> None:
    path = tmp_path / "pmem.img"
    path.write_bytes(b"\x01" * (4 * M))
    with PmemDevice(path=path) as pmem:
        assert pmem.size == 4 * M and pmem.read(0, 1) == b"\x01"
        pmem.write(0, b"\x02")
    assert path.read_bytes()[:1] == b"\x02"
    fd = os.open(path, os.O_RDWR)
    try:
        with PmemDevice(2 * M, fd=fd) as pmem:
            assert pmem.read(0, 1) == b"\x02"
        os.fstat(fd)  # lent, not closed
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: PmemDevice(3 * M), "power of two"),
        (lambda p: PmemDevice(), "give a size"),
        (lambda p: PmemDevice(path=p / "missing"), "cannot open"),
        (lambda p: PmemDevice(path=p / "x", fd=0), "not both"),
    ],
)
def test_bad_backings(make: Callable[[Path], PmemDevice], match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        make(tmp_path)


class FakeHost:
    def __init__(self, verdict: int | Exception) -> None:
        self.verdict = verdict
        self.deferred: list[tuple[str, Callable[[], None]]] = []
        self.maps: list[tuple[int, int, int, int, int, bool]] = []

    def map(
        self,
        shmid: int,
        shm_offset: int,
        length: int,
        fd: int,
        fd_offset: int = 0,
        writable: bool = True,
    ) -> int:
        self.maps.append((shmid, shm_offset, length, fd, fd_offset, writable))
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return self.verdict

    def unmap(self, shmid: int, shm_offset: int, length: int) -> int:
        raise AssertionError("pmem never unmaps its backing: QEMU drops it on reset")

    def defer(self, what: str, action: Callable[[], None]) -> None:
        self.deferred.append((what, action))


def test_each_start_defers_a_map_of_region_0(pmem: PmemDevice) -> None:
    host = FakeHost(0)
    pmem.start(host)
    assert host.maps == []  # not on the caller's (the serving) thread
    ((what, action),) = host.deferred
    assert "SHMEM_MAP" in what
    action()
    assert host.maps == [(0, 0, 2 * M, pmem.fd, 0, True)]
    assert pmem.map_results == [0] and pmem.running
    pmem.stop()
    assert not pmem.running and len(host.maps) == 1  # stop unmaps nothing
    pmem.start(host)
    host.deferred[1][1]()
    assert len(host.maps) == 2 and pmem.started == 2


def test_a_map_without_a_verdict_is_kept(pmem: PmemDevice) -> None:
    host = FakeHost(PeerClosed("back-end channel broke during SHMEM_MAP"))
    pmem.start(host)
    host.deferred[0][1]()
    assert pmem.map_results == [] and "channel broke" in pmem.map_errors[0]
