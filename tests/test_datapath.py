"""Pure parts of the guest-side data path: where registers and regions are, devmem scripts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.errors import ConfigError, ParseError, StateError
from testbed.guest.datapath import (
    DeviceWindows,
    ShmWindow,
    devmem_read_script,
    devmem_write_script,
    locate,
    looks_unmapped,
    parse_devmem_words,
    parse_status_lines,
    program_script,
)
from testbed.guest.inspect import GuestPciDevice, parse_inspection
from testbed.guest.pci import ResourceTable
from testbed.virtio import (
    DEVICE_STATUS,
    DRIVER_OK_PROGRAM,
    RESET_PROGRAM,
    Expect,
    check,
    run_program,
)

DATA = Path(__file__).parent / "data"
M = 1 << 20


def captured_device(arch: str) -> GuestPciDevice:
    """The test device of a real guest dump ({0: 4M, 1: 4M} on the root bus)."""
    text = (DATA / f"{arch}-two-regions.inspect.txt").read_bytes().decode(errors="replace")
    (device,) = parse_inspection(text).virtio_devices_of(26)
    return device


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_locate_real_dump(arch: str) -> None:
    device = captured_device(arch)
    windows = locate(device.bdf, device.function, device.resources)
    bar2 = device.resources.bar(2)
    bar4 = device.resources.bar(4)
    assert bar2 is not None and bar4 is not None
    # The cfg_type 1 capability of QEMU 11.1.3 says BAR 2 offset 0.
    assert windows.common_cfg == bar2.start
    assert windows.regions == {
        0: ShmWindow(0, bar4.start, 4 * M),
        1: ShmWindow(1, bar4.start + 4 * M, 4 * M),
    }
    assert windows.address(1, 0x1000, 64) == bar4.start + 4 * M + 0x1000


def test_locate_needs_assigned_bars() -> None:
    device = captured_device("x86_64")
    with pytest.raises(StateError, match="BAR 2"):
        locate(device.bdf, device.function, ResourceTable())


def test_address_bounds() -> None:
    windows = DeviceWindows("0000:00:10.0", 0x1000, {1: ShmWindow(1, 0x10000000, 2 * M)})
    assert windows.address(1, 2 * M - 4, 4) == 0x10000000 + 2 * M - 4
    with pytest.raises(ConfigError, match="outside region 1"):
        windows.address(1, 2 * M - 4, 8)
    with pytest.raises(ConfigError, match="no shared-memory region 7"):
        windows.address(7, 0, 4)


@given(st.binary(min_size=1, max_size=64).map(lambda b: b * 4), st.integers(0, 1 << 20))
def test_devmem_write_then_read_round_trip(data: bytes, word: int) -> None:
    address = 0xFE000000 + 4 * word
    # What devmem would print back for each 32-bit write of the write script.
    printed = "\n".join(
        f"0x{line.split()[-1][2:].zfill(8).upper()}"
        for line in devmem_write_script(address, data).splitlines()
    )
    assert parse_devmem_words(printed, len(data)) == data
    reads = devmem_read_script(address, len(data)).splitlines()
    assert reads[0] == f"devmem {address:#x} 32"
    assert len(reads) == len(data) // 4


def test_devmem_rejects_unaligned() -> None:
    with pytest.raises(ConfigError, match="multiples of 4"):
        devmem_read_script(0x1002, 4)
    with pytest.raises(ConfigError, match="multiples of 4"):
        devmem_write_script(0x1000, b"abc")


def test_parse_devmem_words_errors() -> None:
    with pytest.raises(ParseError, match="2 words, want 1"):
        parse_devmem_words("0x1\n0x2\n", 4)
    with pytest.raises(ParseError, match="want a hex value"):
        parse_devmem_words("devmem: /dev/mem: Operation not permitted\n", 4)


def test_driver_ok_program_as_a_devmem_script() -> None:
    script = program_script(DRIVER_OK_PROGRAM, 0xFE808000)
    status = f"{0xFE808000 + DEVICE_STATUS:#x}"
    writes = [
        line.split()[3] for line in script.splitlines() if line.startswith(f"devmem {status} 8 ")
    ]
    assert writes == ["0x0", "0x1", "0x3", "0xb", "0xf"]
    assert "devmem 0xfe808008 32 0x1\ndevmem 0xfe80800c 32 0x1" in script  # VERSION_1
    reads = [line for line in script.splitlines() if line == f"devmem {status} 8"]
    assert len(reads) == 2  # one per Expect: after FEATURES_OK, after DRIVER_OK
    assert parse_status_lines("0x0B\n0x0F\n", 2) == [0xB, 0xF]


def test_the_program_checks_what_the_device_answers() -> None:
    """One program, any transport: a device that refuses FEATURES_OK or fails stops it."""
    log: list[tuple[int, int]] = []

    def play(status: int) -> None:
        run_program(DRIVER_OK_PROGRAM, lambda w: log.append((w.offset, w.value)),
                    lambda e: status, "dev")  # fmt: skip

    play(0xF)
    assert log[-1] == (DEVICE_STATUS, 0xF)
    with pytest.raises(StateError, match="FEATURES_OK"):
        play(0x3)
    with pytest.raises(StateError, match="DRIVER_OK"):
        play(0x8F)  # FAILED set
    (expect,) = [s for s in RESET_PROGRAM if isinstance(s, Expect)]
    check(expect, 0, "dev")
    with pytest.raises(StateError, match="after reset"):
        check(expect, 0x1, "dev")


def test_looks_unmapped() -> None:
    assert looks_unmapped(bytes(64))
    assert looks_unmapped(b"\xff" * 64)
    assert not looks_unmapped(b"\x00" * 63 + b"\x01")
    assert not looks_unmapped(b"\x5a" * 64)
    assert not looks_unmapped(b"")
