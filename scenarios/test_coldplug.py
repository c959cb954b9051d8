"""Cold-plugged layouts on the root bus: the guest sees exactly the regions served.

For each layout the back-end serves {shmid: size}; the guest must show one cfg_type 8
capability per region (same shmid and size, BAR 4, offsets packed in ascending shmid order),
BAR 4 64-bit prefetchable with size = total, and lspci (pciutils 3.15) must agree. No
regions: no BAR 4 and no cfg_type 8 capability.

The layouts share one boot (testbed.shared_boot): one guest with all eight devices on its
command line, each layout still its own test judging its own device (its PCI function, its
back-end). A shared boot that fails is rerun with each layout alone, so that a failure is
pinned to its layout; --isolated-boots (the nightly job) always boots them alone.
"""

from __future__ import annotations

import pytest

from testbed.device import VhostUserDevice
from testbed.pytest_plugin import Boot, Shared
from testbed.shared_boot import SharedGroup

M = 1 << 20
G = 1 << 30
T = 1 << 40

LAYOUTS: dict[str, dict[int, int]] = {
    "none": {},
    "one": {0: 4 * M},
    "two": {0: 2 * M, 1: 2 * M},
    "three": {0: 2 * M, 1: 2 * M, 2: 4 * M},
    "sparse-1": {1: 4 * M},
    "sparse-3-200": {3: 8 * M, 200: 8 * M},
    "uneven-4M-12M": {0: 4 * M, 1: 12 * M},
    "big-4G": {5: 4 * G},
}


LAYOUT_BOOT = SharedGroup(
    "coldplug-layouts", {n: VhostUserDevice.of(r) for n, r in LAYOUTS.items()}
)


@pytest.mark.foreign_backend
@pytest.mark.shared_boot(LAYOUT_BOOT.name)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout(shared: Shared, name: str) -> None:
    vm, device = shared.boot(LAYOUT_BOOT, name)
    vm.check_guest_sees(device)


def test_one_tib_region_needs_address_bits(boot: Boot, arch: str) -> None:
    """1 TiB does not fit TCG's default 40 physical address bits (x86) or virt's default
    512 GiB high PCI window (aarch64): the guest leaves BAR 4 unassigned and says why."""
    verdict = boot(VhostUserDevice.of({0: 1 * T})).verdict()
    assert verdict.bar4_unassigned, (
        f"want 'BAR 4 not assigned by the guest' for a 1 TiB region, got: {verdict.explain()}"
    )
    assert verdict.dmesg_lines, "the guest's dmesg should say why BAR 4 has no address"
    # Everything else (capabilities, BAR size, lspci) still matches the served layout.
    assert verdict.mismatches == ("BAR 4 not assigned by the guest (no address in its window)",)


def test_one_tib_region_fits_with_room(boot: Boot, arch: str) -> None:
    """With enough address space the same 1 TiB region is assigned and seen exactly:
    x86_64: a CPU with 44 physical address bits; aarch64: virt's high PCI MMIO window
    enlarged to 2 TiB (highmem-mmio-size)."""
    one_tib = VhostUserDevice.of({0: 1 * T})
    if arch == "x86_64":
        vm = boot(one_tib, phys_bits=44)
    else:
        # QEMU merges a second -machine option into the first.
        vm = boot(one_tib, extra_qemu_args=("-machine", "highmem-mmio-size=2T"))
    vm.check_guest_sees()
