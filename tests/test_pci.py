"""PCI config space and sysfs resource parsing."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.errors import ParseError
from testbed.guest.pci import VirtioShmCap, parse_config_space, parse_resource

DATA = Path(__file__).parent / "data"


def config_space(caps: list[bytes], vendor: int = 0x1AF4, device: int = 0x105A) -> bytes:
    """A type 0 config space with `caps` chained from 0x40 in the given order."""
    data = bytearray(256)
    struct.pack_into("<HH", data, 0, vendor, device)
    struct.pack_into("<H", data, 0x06, 0x10)  # status: capability list
    struct.pack_into("<HH", data, 0x2C, 0x1AF4, 0x1100)
    at = 0x40
    data[0x34] = at
    for i, body in enumerate(caps):
        nxt = at + ((len(body) + 3) & ~3) if i + 1 < len(caps) else 0
        data[at : at + len(body)] = body
        data[at + 1] = nxt
        at = nxt
    return bytes(data)


def virtio_cap(cfg_type: int, bar: int, cap_id: int, offset: int, length: int) -> bytes:
    if cfg_type == 8:
        return struct.pack(
            "<BBBBBBxxIIII", 0x09, 0, 24, 8, bar, cap_id,
            offset & 0xFFFFFFFF, length & 0xFFFFFFFF, offset >> 32, length >> 32,
        )  # fmt: skip
    return struct.pack("<BBBBBBxxII", 0x09, 0, 16, cfg_type, bar, cap_id, offset, length)


def test_shared_memory_caps_with_high_halves_sorted_by_shmid() -> None:
    # QEMU chains the shm caps highest shmid first; offsets follow ascending shmid.
    data = config_space(
        [
            virtio_cap(8, 4, 200, 8 << 20, 8 << 20),
            virtio_cap(8, 4, 3, 0, 8 << 20),
            virtio_cap(8, 4, 5, 1 << 32, 16 << 30),
            virtio_cap(1, 2, 0, 0, 0x38),
            virtio_cap(2, 2, 0, 0x3000, 4),
        ]
    )
    fn = parse_config_space(data)
    assert (fn.vendor_id, fn.device_id, fn.virtio_device_type) == (0x1AF4, 0x105A, 26)
    assert fn.subsystem_vendor_id == 0x1AF4
    assert [c.offset for c in fn.capabilities] == [0x40, 0x58, 0x70, 0x88, 0x98]
    assert [c.type_name for c in fn.virtio_caps][-2:] == ["CommonCfg", "Notify"]
    assert fn.virtio_shm_caps == [
        VirtioShmCap(shmid=3, bar=4, offset=0, length=8 << 20),
        VirtioShmCap(shmid=5, bar=4, offset=1 << 32, length=16 << 30),
        VirtioShmCap(shmid=200, bar=4, offset=8 << 20, length=8 << 20),
    ]
    assert fn.problems == ()


def test_capability_loop_is_reported_not_followed_forever() -> None:
    data = bytearray(config_space([virtio_cap(1, 2, 0, 0, 0x38), virtio_cap(3, 2, 0, 0, 1)]))
    data[0x51] = 0x40  # second cap points back to the first
    fn = parse_config_space(bytes(data))
    assert len(fn.capabilities) == 2
    assert fn.problems == ("capability list loops back to 0x40",)


def test_short_shared_memory_cap_is_a_problem_not_a_region() -> None:
    short = struct.pack("<BBBBBBxxII", 0x09, 0, 16, 8, 4, 0, 0, 4096)
    fn = parse_config_space(config_space([short]))
    assert fn.virtio_shm_caps == []
    assert "needs 24" in fn.problems[0]


def test_no_capability_list_and_non_virtio_vendor() -> None:
    data = bytearray(config_space([virtio_cap(8, 4, 0, 0, 4096)], vendor=0x8086))
    assert parse_config_space(bytes(data)).virtio_caps == ()  # vendor caps of Intel: not ours
    data[0x06] = 0
    assert parse_config_space(bytes(data)).capabilities == ()


def test_too_short_or_empty_config_is_an_error() -> None:
    with pytest.raises(ParseError, match="at least 64"):
        parse_config_space(b"\xf4\x1a" * 8)
    with pytest.raises(ParseError, match="no device"):
        parse_config_space(b"\xff" * 256)


@given(st.binary(min_size=64, max_size=4096))
def test_any_config_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    try:
        fn = parse_config_space(data)
    except ParseError:
        return
    assert len(fn.capabilities) <= 48


RESOURCE = """\
0x00000000fe800000 0x00000000fe800fff 0x0000000000040200
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000008000000000 0x00000080007fffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
"""


def test_resource_lines() -> None:
    table = parse_resource(RESOURCE)
    bar4 = table.bar(4)
    assert bar4 is not None
    assert (bar4.start, bar4.size) == (0x8000000000, 8 << 20)
    assert bar4.is_64bit and bar4.prefetchable and bar4.assigned and bar4.is_memory
    bar0 = table.bar(0)
    assert bar0 is not None and not bar0.is_64bit and not bar0.prefetchable
    assert table.bar(1) is None


def test_unassigned_bar_keeps_its_size() -> None:
    # The kernel could not place a 1 TiB BAR: start 0, end size-1, IORESOURCE_UNSET.
    table = parse_resource("0x0 0x000000ffffffffff 0x000000002014220c\n")
    bar = table.bar(0)
    assert bar is not None and bar.size == 1 << 40 and not bar.assigned


def test_bad_resource_line() -> None:
    with pytest.raises(ParseError, match="start end flags"):
        parse_resource("0x0 0x1\n")
