"""PCI config space and sysfs `resource` parsing (pure: bytes and text in, dataclasses out).

Input is what the guest's sysfs gives: /sys/bus/pci/devices/<bdf>/config (256 bytes
without root, 4096 with) and .../resource (one "start end flags" line per resource).
What this checks for the test bed: every virtio vendor capability, and for cfg_type 8
(shared memory) the 64-bit offset and length, looked up by shmid, never by position
(QEMU chains them highest shmid first).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from testbed.errors import ParseError

PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_VNDR = 0x09
PCI_STD_HEADER_END = 0x40
VIRTIO_VENDOR = 0x1AF4
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8
VIRTIO_CAP_LEN = 16
VIRTIO_SHM_CAP_LEN = 24

CFG_TYPE_NAMES = {
    1: "CommonCfg",
    2: "Notify",
    3: "ISR",
    4: "DeviceCfg",
    5: "PciCfg",
    8: "SharedMemory",
    9: "Vendor",
}

# Linux IORESOURCE_* flags as printed in sysfs `resource`.
IORESOURCE_IO = 0x100
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000
IORESOURCE_MEM_64 = 0x100000
IORESOURCE_DISABLED = 0x10000000
IORESOURCE_UNSET = 0x20000000


@dataclass(frozen=True)
class Capability:
    """One entry of the standard capability list."""

    offset: int
    cap_id: int
    next_ptr: int


@dataclass(frozen=True)
class VirtioCap:
    """A virtio vendor capability (virtio spec: struct virtio_pci_cap / _cap64)."""

    position: int
    """Offset of the capability in config space."""
    cap_len: int
    cfg_type: int
    bar: int
    id: int
    offset: int
    length: int
    """For cfg_type 8, the full 64-bit values (low | high << 32)."""

    @property
    def type_name(self) -> str:
        return CFG_TYPE_NAMES.get(self.cfg_type, f"type{self.cfg_type}")


@dataclass(frozen=True)
class VirtioShmCap:
    """A VIRTIO shared memory region as the device advertises it."""

    shmid: int
    bar: int
    offset: int
    length: int


@dataclass(frozen=True)
class PciFunction:
    """The parts of a config space the test bed looks at."""

    vendor_id: int
    device_id: int
    revision: int
    class_code: int
    """24 bits: base class, sub class, programming interface."""
    header_type: int
    subsystem_vendor_id: int
    subsystem_id: int
    capabilities: tuple[Capability, ...]
    virtio_caps: tuple[VirtioCap, ...]
    problems: tuple[str, ...] = ()
    """What looked wrong (a loop in the list, a short capability): evidence, not fatal."""

    @property
    def is_virtio(self) -> bool:
        return self.vendor_id == VIRTIO_VENDOR and 0x1000 <= self.device_id <= 0x107F

    @property
    def virtio_device_type(self) -> int | None:
        """The virtio device id (modern: device_id - 0x1040; transitional: subsystem id)."""
        if not self.is_virtio:
            return None
        if self.device_id >= 0x1040:
            return self.device_id - 0x1040
        return self.subsystem_id

    @property
    def virtio_shm_caps(self) -> list[VirtioShmCap]:
        """The shared-memory capabilities, sorted by shmid (not list order)."""
        caps = [
            VirtioShmCap(shmid=c.id, bar=c.bar, offset=c.offset, length=c.length)
            for c in self.virtio_caps
            if c.cfg_type == VIRTIO_PCI_CAP_SHARED_MEMORY_CFG and c.cap_len >= VIRTIO_SHM_CAP_LEN
        ]
        return sorted(caps, key=lambda c: c.shmid)


def _u8(data: bytes, at: int) -> int:
    return data[at]


def _u16(data: bytes, at: int) -> int:
    value: int = struct.unpack_from("<H", data, at)[0]
    return value


def _u32(data: bytes, at: int) -> int:
    value: int = struct.unpack_from("<I", data, at)[0]
    return value


def parse_config_space(data: bytes) -> PciFunction:
    """Parse a type 0 or 1 config space dump (at least the 64-byte standard header)."""
    if len(data) < PCI_STD_HEADER_END:
        raise ParseError(
            f"PCI config space is {len(data)} bytes, needs at least 64: read the whole "
            "/sys/bus/pci/devices/<bdf>/config file"
        )
    vendor = _u16(data, 0x00)
    if vendor in (0xFFFF, 0x0000):
        raise ParseError(f"PCI config space has vendor id {vendor:#06x}: no device there")
    header_type = _u8(data, 0x0E) & 0x7F
    # Type 0 keeps the subsystem ids at 0x2c; bridges (type 1) have none there.
    sub_vendor, sub_id = (_u16(data, 0x2C), _u16(data, 0x2E)) if header_type == 0 else (0, 0)
    caps, problems = _walk_capabilities(data)
    virtio_caps: list[VirtioCap] = []
    if vendor == VIRTIO_VENDOR:
        for cap in caps:
            if cap.cap_id == PCI_CAP_ID_VNDR:
                parsed = _parse_virtio_cap(data, cap.offset, problems)
                if parsed is not None:
                    virtio_caps.append(parsed)
    return PciFunction(
        vendor_id=vendor,
        device_id=_u16(data, 0x02),
        revision=_u8(data, 0x08),
        class_code=_u32(data, 0x08) >> 8,
        header_type=header_type,
        subsystem_vendor_id=sub_vendor,
        subsystem_id=sub_id,
        capabilities=tuple(caps),
        virtio_caps=tuple(virtio_caps),
        problems=tuple(problems),
    )


def _walk_capabilities(data: bytes) -> tuple[list[Capability], list[str]]:
    caps: list[Capability] = []
    problems: list[str] = []
    if not _u16(data, PCI_STATUS) & PCI_STATUS_CAP_LIST:
        return caps, problems
    seen: set[int] = set()
    ptr = _u8(data, PCI_CAPABILITY_LIST) & 0xFC
    # 48 = (256 - 64) / 4: more entries than that can only be a loop.
    while ptr and len(caps) < 48:
        if ptr < PCI_STD_HEADER_END or ptr + 2 > min(len(data), 256):
            problems.append(f"capability pointer {ptr:#x} outside the capability area")
            break
        if ptr in seen:
            problems.append(f"capability list loops back to {ptr:#x}")
            break
        seen.add(ptr)
        next_ptr = _u8(data, ptr + 1) & 0xFC
        caps.append(Capability(offset=ptr, cap_id=_u8(data, ptr), next_ptr=next_ptr))
        ptr = next_ptr
    return caps, problems


def _parse_virtio_cap(data: bytes, at: int, problems: list[str]) -> VirtioCap | None:
    if at + VIRTIO_CAP_LEN > len(data):
        problems.append(f"virtio capability at {at:#x} runs past the end of the dump")
        return None
    cap_len = _u8(data, at + 2)
    cfg_type = _u8(data, at + 3)
    if cap_len < VIRTIO_CAP_LEN:
        problems.append(f"virtio capability at {at:#x} has cap_len {cap_len} < 16")
        return None
    offset = _u32(data, at + 8)
    length = _u32(data, at + 12)
    if cfg_type == VIRTIO_PCI_CAP_SHARED_MEMORY_CFG:
        if cap_len < VIRTIO_SHM_CAP_LEN or at + VIRTIO_SHM_CAP_LEN > len(data):
            problems.append(
                f"shared memory capability at {at:#x} has cap_len {cap_len}, needs 24 "
                "(struct virtio_pci_cap64)"
            )
        else:
            offset |= _u32(data, at + 16) << 32
            length |= _u32(data, at + 20) << 32
    return VirtioCap(
        position=at,
        cap_len=cap_len,
        cfg_type=cfg_type,
        bar=_u8(data, at + 4),
        id=_u8(data, at + 5),
        offset=offset,
        length=length,
    )


@dataclass(frozen=True)
class BarInfo:
    """One line of sysfs `resource`: a BAR (0-5), the ROM (6) or a bridge window."""

    index: int
    start: int
    size: int
    flags: int

    @property
    def is_memory(self) -> bool:
        return bool(self.flags & IORESOURCE_MEM)

    @property
    def is_64bit(self) -> bool:
        return bool(self.flags & IORESOURCE_MEM_64)

    @property
    def prefetchable(self) -> bool:
        return bool(self.flags & IORESOURCE_PREFETCH)

    @property
    def assigned(self) -> bool:
        """The kernel gave it an address (a BAR too big for its window is left unset)."""
        return (
            self.size > 0
            and self.start != 0
            and not self.flags & (IORESOURCE_UNSET | IORESOURCE_DISABLED)
        )


@dataclass(frozen=True)
class ResourceTable:
    bars: tuple[BarInfo, ...] = field(default_factory=tuple)

    def bar(self, index: int) -> BarInfo | None:
        for bar in self.bars:
            if bar.index == index and bar.size:
                return bar
        return None


def parse_resource(text: str) -> ResourceTable:
    """Parse sysfs `resource`: "0x<start> 0x<end> 0x<flags>" per line; size 0 = absent."""
    bars: list[BarInfo] = []
    for index, line in enumerate(text.splitlines()):
        words = line.split()
        if not words:
            continue
        if len(words) != 3:
            raise ParseError(f"sysfs resource line {index}: expected 'start end flags': {line!r}")
        try:
            start, end, flags = (int(w, 16) for w in words)
        except ValueError as exc:
            raise ParseError(f"sysfs resource line {index}: not hex numbers: {line!r}") from exc
        size = end - start + 1 if end else 0
        bars.append(BarInfo(index=index, start=start, size=size, flags=flags))
    return ResourceTable(tuple(bars))
