"""What QEMU 11.1.3 accepts for a shared-memory layout, and how it packs BAR 4 (pure).

The one home of these rules: the device model validates with them before anything starts,
the verdict computes what the guest should see with them, and the fuzzer judges the configs
it serves with them. Each rule is a measured fact
(platform facts; hw/virtio/vhost-user-base.c and hw/virtio/virtio-pci.c):

- BAR 4 is one 64-bit prefetchable memory BAR whose size is the sum of the regions; the
  regions are packed back to back in ascending shmid order from offset 0.
- The sum must be a power of two: otherwise pci_register_bar asserts and QEMU aborts.
- Region sizes are page multiples (QEMU refuses others at realize), shmids 0..255.
- Each region costs a 24-byte vendor capability in the 256-byte config space: 3 fit on the
  root bus, 1 behind a pcie-root-port (whose PCIe capability takes the room). One more
  aborts QEMU in pci_add_capability, cold- or hot-plugged.
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping
from dataclasses import dataclass

PAGE_SIZE = mmap.PAGESIZE
MAX_SHMEM_REGIONS = 256
"""VIRTIO_MAX_SHMEM_REGIONS: the reply's sizes[] has 256 slots, index = shmid."""
SHM_BAR = 4
ROOT_BUS_REGIONS = 3
ROOT_PORT_REGIONS = 1


@dataclass(frozen=True)
class PackedRegion:
    """One region where QEMU puts it in BAR 4."""

    shmid: int
    offset: int
    size: int


def pack(regions: Mapping[int, int]) -> list[PackedRegion]:
    """The BAR 4 packing rule: ascending shmid, back to back from offset 0."""
    packed: list[PackedRegion] = []
    offset = 0
    for shmid in sorted(regions):
        packed.append(PackedRegion(shmid, offset, regions[shmid]))
        offset += regions[shmid]
    return packed


def is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def is_page_multiple(size: int) -> bool:
    """A region size QEMU takes: a whole number of pages."""
    return size % PAGE_SIZE == 0


def region_problems(regions: Mapping[int, int]) -> list[str]:
    """What QEMU 11.1.3 would refuse or abort on in a layout, one sentence each; [] = fine."""
    problems: list[str] = []
    if len(regions) > MAX_SHMEM_REGIONS:
        problems.append(f"{len(regions)} regions: at most {MAX_SHMEM_REGIONS}")
    for shmid, size in sorted(regions.items()):
        if not 0 <= shmid < MAX_SHMEM_REGIONS:
            problems.append(f"shmid {shmid} out of range 0..{MAX_SHMEM_REGIONS - 1}")
        if size <= 0:
            problems.append(f"region {shmid}: size {size} must be > 0")
        elif not is_page_multiple(size):
            problems.append(
                f"region {shmid}: size {size} is not a multiple of the page size "
                f"({PAGE_SIZE}); QEMU refuses it"
            )
    total = sum(regions.values())
    if regions and not problems and not is_power_of_2(total):
        problems.append(
            f"total {total} bytes is not a power of two; QEMU 11.1.3 aborts on that "
            "(pci_register_bar assertion): adjust the sizes so they add up to a power of two"
        )
    return problems


def max_regions(behind_root_port: bool) -> int:
    """How many shared-memory capabilities fit in the device's config space."""
    return ROOT_PORT_REGIONS if behind_root_port else ROOT_BUS_REGIONS


def capacity_problem(count: int, behind_root_port: bool) -> str | None:
    """Why ``count`` regions do not fit at that bus position, or None."""
    fits = max_regions(behind_root_port)
    if count <= fits:
        return None
    where = "behind a root port" if behind_root_port else "on the root bus"
    return (
        f"{count} regions: QEMU 11.1.3 fits {fits} {where} (one more aborts it in "
        "pci_add_capability); pass allow_overfull=True to reproduce that on purpose"
    )
