"""The split virtqueue's device side and guest memory, on memory images (no QEMU, no fds
except the memfd of the mapped-memory test)."""

from __future__ import annotations

import os
import struct

import pytest
from driver_ring import DriverQueue, Used
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from testbed.errors import GuestMemoryError, RingError
from testbed.vhost_user.memory import MappedMemory, MemoryImage, RegionTable
from testbed.vhost_user.protocol import MemoryRegion
from testbed.vhost_user.virtqueue import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    Buffer,
    Chain,
    Descriptor,
    RingLayout,
    SplitQueue,
    need_event,
)

SIZE = 8
RAM = 0x10000
LAYOUT = RingLayout(SIZE, desc=0x1000, avail=0x2000, used=0x3000)
DATA = 0x8000  # buffers from here on
RULES = {
    "vring-desc-range",
    "vring-loop",
    "vring-direction",
    "vring-indirect",
    "vring-index",
    "vring-addr",
}


def ring(
    *, indirect: bool = False, event_idx: bool = False, start: int = 0
) -> tuple[MemoryImage, DriverQueue, SplitQueue]:
    memory = MemoryImage(RAM)
    driver = DriverQueue(memory, LAYOUT)
    driver.reset()
    driver.avail_idx = driver.last_used = start
    memory.write(LAYOUT.avail + 2, struct.pack("<H", start))
    memory.write(LAYOUT.used + 2, struct.pack("<H", start))
    device = SplitQueue(LAYOUT, indirect=indirect, event_idx=event_idx, last_avail_idx=start)
    return memory, driver, device


def rule_of(device: SplitQueue, memory: MemoryImage) -> RingError:
    with pytest.raises(RingError) as info:
        device.pop(memory)
    return info.value


# --- guest memory ------------------------------------------------------------------------


def test_region_table_locates_and_translates() -> None:
    table = RegionTable(
        [MemoryRegion(0x100000, 0x1000, 0x7F00_0000_0000, 0), MemoryRegion(0, 0xA0000, 0x7E00, 0)]
    )
    assert table.locate(0x100010, 16) == (1, 0x10)
    assert table.locate(0x9FFF0, 16) == (0, 0x9FFF0)
    assert table.user_to_guest(0x7F00_0000_0010, 16) == 0x100010
    with pytest.raises(GuestMemoryError, match="outside every region"):
        table.locate(0xA0000, 1)
    with pytest.raises(GuestMemoryError, match="runs past the end of region 0x0-0x9ffff by 8"):
        table.locate(0x9FFFC, 12)
    with pytest.raises(GuestMemoryError, match="in no region"):
        table.user_to_guest(0x1234, 4)
    with pytest.raises(GuestMemoryError, match="runs past the end"):
        table.user_to_guest(0x7F00_0000_0FF8, 16)
    assert table.locate(0xDEAD_0000, 0) == (-1, 0)  # touches nothing


def test_overlapping_regions_are_refused() -> None:
    with pytest.raises(GuestMemoryError, match="overlap"):
        RegionTable([MemoryRegion(0, 0x2000, 0, 0), MemoryRegion(0x1000, 0x1000, 0x5000, 0)])


def test_mapped_memory_maps_each_region_at_its_offset() -> None:
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4 * 4096)
        os.pwrite(fd, b"second", 2 * 4096 + 100)
        regions = [
            (MemoryRegion(0x0, 0x1000, 0x10_0000, 0), fd),
            # An mmap_offset off a page boundary: mapped from the page below.
            (MemoryRegion(0x4000, 0x1000, 0x20_0000, 2 * 4096 + 100), fd),
        ]
        with MappedMemory(regions) as memory:
            assert memory.read(0x4000, 6) == b"second"
            memory.write(0x10, b"first")
            assert os.pread(fd, 5, 0x10) == b"first"
            assert memory.user_to_guest(0x20_0008, 8) == 0x4008
            with pytest.raises(GuestMemoryError):
                memory.read(0x1000, 1)
        memory.close()  # idempotent
    finally:
        os.close(fd)


def test_mapping_a_bad_fd_says_which_region() -> None:
    with pytest.raises(GuestMemoryError, match="fd 987654"):
        MappedMemory([(MemoryRegion(0x1000, 0x1000, 0, 0), 987654)])
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(GuestMemoryError, match="guest address 0x1000"):
            MappedMemory([(MemoryRegion(0x1000, 0x1000, 0, 0), read_end)])
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_region_past_the_end_of_its_file_is_refused_not_mapped() -> None:
    fd = os.memfd_create("test-short", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 0x1000)
        # Mapped, its second page would raise SIGBUS at the first touch.
        with pytest.raises(GuestMemoryError, match="the file has 0x1000 bytes"):
            MappedMemory([(MemoryRegion(0, 0x2000, 0, 0), fd)])
    finally:
        os.close(fd)


# --- normal operation --------------------------------------------------------------------


def test_a_chain_is_popped_answered_and_published() -> None:
    memory, driver, device = ring()
    memory.write(DATA, b"hello, ")
    memory.write(DATA + 0x100, b"device")
    head = driver.add([(DATA, 7), (DATA + 0x100, 6)], [(DATA + 0x200, 4), (DATA + 0x300, 8)])
    driver.expose(head)
    assert device.pending(memory) == 1
    chain = device.pop(memory)
    assert chain == Chain(
        head,
        (Buffer(DATA, 7), Buffer(DATA + 0x100, 6)),
        (Buffer(DATA + 0x200, 4), Buffer(DATA + 0x300, 8)),
    )
    assert chain.read(memory) == b"hello, device"
    assert chain.read(memory, limit=9) == b"hello, de"
    assert chain.write(memory, b"0123456789abcdef") == 12  # short: 12 bytes of room
    assert memory.read(DATA + 0x200, 4) == b"0123"
    assert memory.read(DATA + 0x300, 8) == b"456789ab"
    assert device.pop(memory) is None
    device.push(memory, chain.head, 12)
    assert driver.take_used() == [Used(head, 12)]
    assert device.needs_interrupt(memory, old_used=0)
    driver.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    assert not device.needs_interrupt(memory, old_used=0)
    assert not device.needs_interrupt(memory, old_used=1)  # nothing new


def test_indirect_chain() -> None:
    memory, driver, device = ring(indirect=True)
    head = driver.add([(DATA, 4)], [(DATA + 0x10, 4), (DATA + 0x20, 4)], indirect_table=0x6000)
    driver.expose(head)
    chain = device.pop(memory)
    assert chain is not None and chain.indirect
    assert chain.readable == (Buffer(DATA, 4),)
    assert chain.writable == (Buffer(DATA + 0x10, 4), Buffer(DATA + 0x20, 4))


def test_indices_wrap_at_65536() -> None:
    memory, driver, device = ring(start=0xFFFE)
    for n in range(5):
        head = driver.add([(DATA, 4)], [(DATA + 0x10, 4)])
        driver.expose(head)
        chain = device.pop(memory)
        assert chain is not None and chain.head == head
        device.push(memory, head, n)
        assert driver.take_used() == [Used(head, n)]
    assert device.last_avail_idx == device.next_used == 3
    assert driver.used_idx() == 3


def test_several_pending_chains_come_in_order() -> None:
    memory, driver, device = ring()
    heads = [driver.add([(DATA + i * 0x10, 4)]) for i in range(3)]
    for head in heads:
        driver.expose(head)
    assert device.pending(memory) == 3
    popped = [device.pop(memory) for _ in heads]
    assert [c.head for c in popped if c] == heads


def test_event_idx_interrupts_and_avail_event() -> None:
    memory, driver, device = ring(event_idx=True)
    for _ in range(3):
        driver.expose(driver.add([(DATA, 4)]))
    old = device.next_used
    for _ in range(3):
        chain = device.pop(memory)
        assert chain is not None
        device.push(memory, chain.head, 0)
    driver.set_used_event(5)  # the driver wants to hear only after entry 5
    assert not device.needs_interrupt(memory, old)
    driver.set_used_event(1)
    assert device.needs_interrupt(memory, old)
    # NO_INTERRUPT is ignored with EVENT_IDX: used_event decides.
    driver.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    assert device.needs_interrupt(memory, old)
    device.publish_avail_event(memory)
    assert driver.avail_event() == 3


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [(0, 1, 0, True), (1, 1, 0, False), (0xFFFF, 0, 0xFFFF, True), (5, 10, 6, False)],
)
def test_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert need_event(event, new, old) is expected


# --- what the driver must not do ---------------------------------------------------------


def test_descriptor_outside_memory() -> None:
    memory, driver, device = ring()
    head = driver.add([(RAM - 2, 4)])
    driver.expose(head)
    err = rule_of(device, memory)
    assert (err.rule, err.head, err.broken) == ("vring-desc-range", head, False)
    assert "runs past the end" in err.detail
    assert device.last_avail_idx == 1  # consumed: the caller completes it with length 0


def test_chain_loop() -> None:
    memory, driver, device = ring()
    driver.write_descriptor(0, Descriptor(DATA, 4, DESC_F_NEXT, 1))
    driver.write_descriptor(1, Descriptor(DATA, 4, DESC_F_NEXT, 0))
    driver.expose(0)
    err = rule_of(device, memory)
    assert err.rule == "vring-loop" and "descriptor 0 comes round again" in err.detail


def test_indirect_chain_longer_than_the_queue() -> None:
    memory, driver, device = ring(indirect=True)
    count = SIZE + 1
    for i in range(count):
        flags = DESC_F_NEXT if i + 1 < count else 0
        driver.write_descriptor(i, Descriptor(DATA, 4, flags, i + 1), table=0x6000)
    driver.write_descriptor(0, Descriptor(0x6000, 16 * count, DESC_F_INDIRECT, 0))
    driver.expose(0)
    err = rule_of(device, memory)
    assert err.rule == "vring-loop" and "longer than the queue size" in err.detail


def test_readable_after_writable() -> None:
    memory, driver, device = ring()
    driver.write_descriptor(0, Descriptor(DATA, 4, DESC_F_WRITE | DESC_F_NEXT, 1))
    driver.write_descriptor(1, Descriptor(DATA, 4, 0, 0))
    driver.expose(0)
    assert rule_of(device, memory).rule == "vring-direction"


@pytest.mark.parametrize(
    ("negotiated", "outer", "inner", "length", "why"),
    [
        (False, DESC_F_INDIRECT, 0, 16, "not negotiated"),
        (True, DESC_F_INDIRECT, DESC_F_INDIRECT, 16, "inside an indirect table"),
        (True, DESC_F_INDIRECT | DESC_F_NEXT, 0, 16, "both INDIRECT and NEXT"),
        (True, DESC_F_INDIRECT, 0, 24, "not a non-zero multiple of 16"),
        (True, DESC_F_INDIRECT, 0, 0, "not a non-zero multiple of 16"),
    ],
)
def test_bad_indirect(negotiated: bool, outer: int, inner: int, length: int, why: str) -> None:
    memory, driver, device = ring(indirect=negotiated)
    driver.write_descriptor(0, Descriptor(DATA, 16, inner, 0), table=0x6000)
    driver.write_descriptor(0, Descriptor(0x6000, length, outer, 1))
    driver.expose(0)
    err = rule_of(device, memory)
    assert err.rule == "vring-indirect" and why in err.detail


def test_indirect_table_outside_memory() -> None:
    memory, driver, device = ring(indirect=True)
    driver.write_descriptor(0, Descriptor(RAM - 16, 32, DESC_F_INDIRECT, 0))
    driver.expose(0)
    assert rule_of(device, memory).rule == "vring-desc-range"


def test_head_beyond_the_queue_breaks_the_ring() -> None:
    memory, driver, device = ring()
    driver.expose(SIZE)
    err = rule_of(device, memory)
    assert (err.rule, err.head, err.broken) == ("vring-index", None, True)


def test_next_beyond_the_table() -> None:
    memory, driver, device = ring()
    driver.write_descriptor(0, Descriptor(DATA, 4, DESC_F_NEXT, SIZE))
    driver.expose(0)
    err = rule_of(device, memory)
    assert (err.rule, err.head, err.broken) == ("vring-index", 0, False)


def test_available_index_too_far_ahead_breaks_the_ring() -> None:
    memory, _, device = ring()
    memory.write(LAYOUT.avail + 2, struct.pack("<H", SIZE + 1))
    err = rule_of(device, memory)
    assert (err.rule, err.broken) == ("vring-index", True)


@pytest.mark.parametrize(
    ("layout", "rule"),
    [
        (RingLayout(SIZE, desc=0x1008, avail=0x2000, used=0x3000), "vring-addr"),
        (RingLayout(SIZE, desc=0x1000, avail=0x2000, used=RAM - 8), "vring-addr"),
        (RingLayout(6, desc=0x1000, avail=0x2000, used=0x3000), "vring-num"),
        (RingLayout(0, desc=0x1000, avail=0x2000, used=0x3000), "vring-num"),
    ],
)
def test_unusable_rings(layout: RingLayout, rule: str) -> None:
    with pytest.raises(RingError) as info:
        layout.check(MemoryImage(RAM))
    assert (info.value.rule, info.value.broken) == (rule, True)


# --- whatever the driver writes: a chain or a precise error ------------------------------

descriptors = st.builds(
    Descriptor,
    # Often the indirect table at 0x6000 or a buffer near the end of RAM.
    addr=st.one_of(
        st.sampled_from([0x6000, DATA, RAM - 16]),
        st.integers(0, RAM + 64),
        st.integers(0, 2**64 - 1),
    ),
    length=st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48]), st.integers(0, 2**32 - 1)),
    flags=st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF)),
    next=st.one_of(st.integers(0, SIZE + 1), st.integers(0, 0xFFFF)),
)


@settings(max_examples=400, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(descriptors, min_size=SIZE, max_size=SIZE),
    indirect_table=st.lists(descriptors, min_size=4, max_size=4),
    heads=st.lists(st.integers(0, SIZE + 2), min_size=1, max_size=SIZE),
    indirect=st.booleans(),
)
def test_any_descriptor_table_gives_a_chain_or_a_precise_error(
    table: list[Descriptor], indirect_table: list[Descriptor], heads: list[int], indirect: bool
) -> None:
    memory, driver, device = ring(indirect=indirect)
    for i, desc in enumerate(table):
        driver.write_descriptor(i, desc)
    for i, desc in enumerate(indirect_table):
        # An indirect table some descriptors may point at (addr 0x6000, length 64).
        driver.write_descriptor(i, desc, table=0x6000)
    for head in heads:
        driver.expose(head)
    for _ in heads:
        try:
            chain = device.pop(memory)
        except RingError as exc:
            event(exc.rule)
            assert exc.rule in RULES, exc
            assert exc.detail
            if exc.broken:
                return
            assert exc.head is not None and exc.head < SIZE
            device.push(memory, exc.head, 0)
            continue
        assert chain is not None
        event("chain" + (" indirect" if chain.indirect else ""))
        assert len(chain.readable) + len(chain.writable) <= SIZE
        for buf in (*chain.readable, *chain.writable):
            memory.check(buf.addr, buf.length)
        device.push(memory, chain.head, chain.writable_bytes)
    assert device.pop(memory) is None
