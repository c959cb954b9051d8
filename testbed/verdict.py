"""What the guest should see for a region layout, and where it differs (pure, no I/O).

The rule QEMU 11.1 follows (testbed.limits, the one home of the packing rule): one BAR 4,
64-bit prefetchable memory, whose size is the total of the regions; regions packed back to
back in ascending shmid order; one virtio vendor capability of cfg_type 8 per region naming
BAR 4, the region's offset and length and its shmid. No regions: no BAR 4 and no cfg_type 8
capability. The scenarios compare that against two independent readings of the guest: our
own parse of config space + sysfs, and `lspci -vv` (pciutils >= 3.15).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

from testbed import limits
from testbed.device import DEFAULT_VIRTIO_ID, ShmemLayout
from testbed.guest.inspect import DeviceNotFound, GuestPciDevice, GuestPciView
from testbed.guest.lspci import LspciDevice
from testbed.guest.pci import VirtioShmCap

SHM_BAR = limits.SHM_BAR
# Lines of dmesg that explain why the kernel left a BAR without an address.
_BAR_DMESG = re.compile(
    r"(BAR 4|bridge window|no space for|failed to assign|can't assign|64bit mmio)", re.IGNORECASE
)


def expected_caps(layout: Mapping[int, int]) -> list[VirtioShmCap]:
    """The cfg_type 8 capabilities QEMU 11.1 builds for {shmid: size}, sorted by shmid."""
    return [VirtioShmCap(p.shmid, SHM_BAR, p.offset, p.size) for p in limits.pack(layout)]


@dataclass(frozen=True)
class LayoutVerdict:
    """The differences between a served layout and one guest device; empty = exact match."""

    bdf: str
    mismatches: tuple[str, ...]
    bar4_unassigned: bool = False
    dmesg_lines: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def explain(self) -> str:
        lines = [f"guest device {self.bdf} does not show the served layout:"]
        lines += [f"  - {m}" for m in self.mismatches]
        if self.dmesg_lines:
            lines.append("  guest dmesg:")
            lines += [f"    {d}" for d in self.dmesg_lines]
        return "\n".join(lines)


def _fmt(caps: list[VirtioShmCap]) -> str:
    if not caps:
        return "none"
    return ", ".join(f"shmid {c.shmid}: BAR {c.bar} +{c.offset:#x} len {c.length:#x}" for c in caps)


def compare_layout(
    layout: ShmemLayout | Mapping[int, int],
    device: GuestPciDevice,
    lspci: LspciDevice | None = None,
    dmesg: str = "",
) -> LayoutVerdict:
    """Compare one guest device with the layout its back-end served."""
    if isinstance(layout, ShmemLayout):
        layout = layout.regions
    want = expected_caps(layout)
    total = sum(layout.values())
    mismatches: list[str] = []

    have = device.function.virtio_shm_caps
    if have != want:
        mismatches.append(f"config space capabilities: want [{_fmt(want)}], have [{_fmt(have)}]")

    bar = device.resources.bar(SHM_BAR)
    unassigned = False
    if not layout:
        if bar is not None:
            mismatches.append(f"BAR 4 exists (size {bar.size:#x}) though no region was served")
    elif bar is None:
        # The kernel clears a BAR it could not place: sysfs then shows zeros, and only
        # dmesg ("BAR 4 [mem size ...]: failed to assign") tells it apart from no BAR.
        if _failed_to_assign(dmesg, device.bdf):
            unassigned = True
            mismatches.append("BAR 4 not assigned by the guest (no address in its window)")
        else:
            mismatches.append(f"BAR 4 missing: want a 64-bit prefetchable BAR of {total:#x} bytes")
    else:
        if bar.size != total:
            mismatches.append(f"BAR 4 size {bar.size:#x}, want the regions' total {total:#x}")
        if not (bar.is_memory and bar.is_64bit and bar.prefetchable):
            mismatches.append(f"BAR 4 flags {bar.flags:#x}: want 64-bit prefetchable memory")
        if not bar.assigned:
            unassigned = True
            mismatches.append("BAR 4 not assigned by the guest (no address in its window)")

    if lspci is not None:
        lspci_caps = sorted(lspci.virtio_shm_caps, key=lambda c: c.shmid)
        if lspci_caps != want:
            mismatches.append(f"lspci capabilities: want [{_fmt(want)}], have [{_fmt(lspci_caps)}]")
        region = lspci.regions.get(SHM_BAR)
        if layout and not unassigned and (region is None or region.size != total):
            got = "none" if region is None else f"{region.size}"
            mismatches.append(f"lspci Region 4 size {got}, want {total:#x}")
        if not layout and region is not None:
            mismatches.append("lspci shows a Region 4 though no region was served")

    dmesg_lines: tuple[str, ...] = ()
    if unassigned:
        dmesg_lines = (
            tuple(
                line.strip()
                for line in dmesg.splitlines()
                if device.bdf in line and _BAR_DMESG.search(line)
            )
            or tuple(line.strip() for line in dmesg.splitlines() if _BAR_DMESG.search(line))[-8:]
        )
    return LayoutVerdict(device.bdf, tuple(mismatches), unassigned, dmesg_lines)


def _failed_to_assign(dmesg: str, bdf: str) -> bool:
    pattern = re.compile(rf"{re.escape(bdf)}: BAR 4 .*(failed to assign|can't assign)")
    return any(pattern.search(line) for line in dmesg.splitlines())


def verdict_for(
    view: GuestPciView,
    layout: ShmemLayout | Mapping[int, int],
    bdf: str | None = None,
    virtio_id: int = DEFAULT_VIRTIO_ID,
) -> LayoutVerdict:
    """The verdict on the test device at ``bdf``, or on the guest's only test device."""
    try:
        device = view.our_device(virtio_id, bdf)
    except DeviceNotFound as not_found:
        return LayoutVerdict(bdf or "-", (str(not_found),))
    verdict = compare_layout(layout, device, view.lspci_for(device), view.dmesg)
    if view.lspci is None:
        missing = "the guest image has no lspci: the second opinion is missing"
        return dataclasses.replace(verdict, mismatches=(*verdict.mismatches, missing))
    return verdict
