"""`lspci -vv` output parsing (pure), for a second opinion next to our own config parser.

Formats, from pciutils 3.15 (ls-caps-vendor.c, lspci.c):
    00:10.0 Unclassified device [00ff]: Red Hat, Inc. Device 105a (rev 01)
            Region 4: Memory at 8000000000 (64-bit, prefetchable) [size=8M]
            Capabilities: [c4] Vendor Specific Information: VirtIO: SharedMemory
                    BAR=4 offset=0000000000000000 size=0000000000400000 id=1
Older pciutils (3.9, 3.13) print "VirtIO: <unknown>" for cfg_type 8 with the 32-bit
fields only; such capabilities are kept as virtio caps but are not shared-memory caps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from testbed.errors import ParseError
from testbed.guest.pci import VirtioShmCap

_DEVICE = re.compile(r"^(?P<bdf>(?:[0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\s+(?P<desc>.*)$")
_REGION = re.compile(
    r"^\s+Region (?P<index>\d+): (?P<kind>Memory|I/O ports) at (?P<addr><[a-z]+>|[0-9a-f]+)"
    r"(?: \((?P<attrs>[^)]*)\))?(?P<rest>.*?)(?:\[size=(?P<size>[0-9]+[KMGTPE]?)\])?\s*$"
)
_VIRTIO_CAP = re.compile(
    r"^\s+Capabilities: \[(?P<pos>[0-9a-f]+)\] Vendor Specific Information: "
    r"VirtIO: (?P<type>\S+)"
)
_VIRTIO_SHM_FIELDS = re.compile(
    r"^\s+BAR=(?P<bar>\d+) offset=(?P<offset>[0-9a-f]+) size=(?P<size>[0-9a-f]+)"
    r"(?: id=(?P<id>\d+))?"
)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}


@dataclass(frozen=True)
class LspciRegion:
    index: int
    kind: str
    """'Memory' or 'I/O ports'."""
    address: int | None
    """None when lspci prints <unassigned> or <ignored>."""
    size: int | None
    is_64bit: bool
    prefetchable: bool
    disabled: bool


@dataclass
class LspciDevice:
    bdf: str
    """Always with the domain, like sysfs: 0000:00:10.0."""
    description: str
    regions: dict[int, LspciRegion] = field(default_factory=dict)
    virtio_cap_types: list[str] = field(default_factory=list)
    virtio_shm_caps: list[VirtioShmCap] = field(default_factory=list)


def normalize_bdf(bdf: str) -> str:
    return bdf if bdf.count(":") == 2 else f"0000:{bdf}"


def parse_size(text: str) -> int:
    """lspci's "[size=8M]" number."""
    match = re.fullmatch(r"([0-9]+)([KMGTPE]?)", text)
    if not match:
        raise ParseError(f"lspci size {text!r} is not <number>[KMGTPE]")
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_lspci(text: str) -> dict[str, LspciDevice]:
    """Parse `lspci -vv` (with or without -D, -nn) into devices keyed by domain:bus:dev.fn."""
    devices: dict[str, LspciDevice] = {}
    current: LspciDevice | None = None
    pending_shm = False
    for line in text.splitlines():
        head = _DEVICE.match(line)
        if head:
            current = LspciDevice(bdf=normalize_bdf(head["bdf"]), description=head["desc"])
            devices[current.bdf] = current
            pending_shm = False
            continue
        if current is None:
            continue
        region = _REGION.match(line)
        if region:
            attrs = region["attrs"] or ""
            addr = region["addr"]
            current.regions[int(region["index"])] = LspciRegion(
                index=int(region["index"]),
                kind=region["kind"],
                address=None if addr.startswith("<") else int(addr, 16),
                size=parse_size(region["size"]) if region["size"] else None,
                is_64bit="64-bit" in attrs,
                prefetchable="non-prefetchable" not in attrs and "prefetchable" in attrs,
                disabled="[disabled]" in (region["rest"] or ""),
            )
            continue
        cap = _VIRTIO_CAP.match(line)
        if cap:
            current.virtio_cap_types.append(cap["type"])
            pending_shm = cap["type"] == "SharedMemory"
            continue
        if pending_shm:
            fields = _VIRTIO_SHM_FIELDS.match(line)
            pending_shm = False
            if fields is None or fields["id"] is None:
                raise ParseError(
                    f"{current.bdf}: lspci shows a SharedMemory capability without "
                    f"'BAR= offset= size= id=' after it (run lspci -vv): {line!r}"
                )
            current.virtio_shm_caps.append(
                VirtioShmCap(
                    shmid=int(fields["id"]),
                    bar=int(fields["bar"]),
                    offset=int(fields["offset"], 16),
                    length=int(fields["size"], 16),
                )
            )
    for device in devices.values():
        device.virtio_shm_caps.sort(key=lambda c: c.shmid)
    return devices
