"""lspci -vv parsing and the inspection parser, over real guest output (tests/data/).

The dumps were captured from guests booted by GuestVM with regions {0: 4M, 1: 4M}
(QEMU 11.1.3, TCG, pciutils 3.15 in the guest).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import ParseError
from testbed.guest.inspect import GuestPciView, parse_inspection
from testbed.guest.lspci import parse_lspci, parse_size
from testbed.guest.pci import VirtioShmCap

DATA = Path(__file__).parent / "data"
TWO_REGIONS = [VirtioShmCap(0, 4, 0, 4 << 20), VirtioShmCap(1, 4, 4 << 20, 4 << 20)]


def load(arch: str) -> GuestPciView:
    text = (DATA / f"{arch}-two-regions.inspect.txt").read_bytes().decode(errors="replace")
    return parse_inspection(text)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_real_dump_config_space_and_lspci_agree(arch: str) -> None:
    view = load(arch)
    assert view.problems == ()
    test_devices = view.find(0x1AF4, 0x105A)
    assert len(test_devices) == 1
    dev = test_devices[0]
    assert dev.bdf == "0000:00:10.0"
    assert dev.function.virtio_device_type == 26
    assert dev.driver == "virtio-pci"
    # Our parser of the raw config space...
    assert dev.function.virtio_shm_caps == TWO_REGIONS
    # ...and QEMU's reverse chaining: highest shmid first in the list.
    assert [c.id for c in dev.function.virtio_caps if c.cfg_type == 8] == [1, 0]
    bar4 = dev.resources.bar(4)
    assert bar4 is not None and bar4.size == 8 << 20
    assert bar4.is_64bit and bar4.prefetchable and bar4.assigned
    # ...agree with pciutils 3.15.
    assert view.lspci is not None
    listed = view.lspci[dev.bdf]
    assert listed.virtio_shm_caps == TWO_REGIONS
    region = listed.regions[4]
    assert (region.address, region.size) == (bar4.start, bar4.size)
    assert region.is_64bit and region.prefetchable
    # virtio-net and virtio-rng: no shared memory.
    others = [d for d in view.virtio_devices.values() if d.bdf != dev.bdf]
    assert {d.function.device_id for d in others} == {0x1000, 0x1005}
    assert all(d.function.virtio_shm_caps == [] for d in others)
    assert "virtio" in view.dmesg


LSPCI_OLD = """\
00:10.0 Unclassified device [00ff]: Red Hat, Inc. Device 105a (rev 01)
\tSubsystem: Red Hat, Inc. Device 1100
\tRegion 2: Memory at <unassigned> (64-bit, prefetchable) [disabled] [size=16K]
\tRegion 4: Memory at fe000000 (64-bit, non-prefetchable) [size=1G]
\tCapabilities: [a4] Vendor Specific Information: VirtIO: <unknown>
\t\tBAR=4 offset=00000000 size=00400000
"""


def test_old_pciutils_and_unassigned_regions() -> None:
    dev = parse_lspci(LSPCI_OLD)["0000:00:10.0"]
    assert dev.virtio_cap_types == ["<unknown>"]
    assert dev.virtio_shm_caps == []
    assert dev.regions[2].address is None and dev.regions[2].disabled
    assert dev.regions[4].size == 1 << 30 and not dev.regions[4].prefetchable


def test_shared_memory_line_without_fields_is_an_error() -> None:
    text = (
        "00:10.0 Device: x\n"
        "\tCapabilities: [a4] Vendor Specific Information: VirtIO: SharedMemory\n"
        "\tKernel driver in use: virtio-pci\n"
    )
    with pytest.raises(ParseError, match="SharedMemory"):
        parse_lspci(text)


def test_sizes() -> None:
    assert parse_size("16K") == 16384
    assert parse_size("64T") == 64 << 40
    assert parse_size("32") == 32
    with pytest.raises(ParseError):
        parse_size("4MiB")


def test_a_function_that_came_or_went_mid_read_is_an_error() -> None:
    """stat listed a function that od then did not dump (or the other way): the byte
    stream no longer lines up with the sizes, and nothing is guessed."""
    text = (DATA / "x86_64-two-regions.inspect.txt").read_bytes().decode(errors="replace")
    config = text.index("@@testbed config\n") + len("@@testbed config\n")
    short = text[:config] + text[config:].split("\n", 16)[16]  # 16 lines = 256 bytes fewer
    with pytest.raises(ParseError, match="come or go while the guest was read"):
        parse_inspection(short)
