"""The guest side of the SHMEM_MAP/UNMAP data path, driven over SSH with busybox devmem.

The guest has no driver for vhost-user-test-device-pci: virtio-pci binds to it and leaves
it at ACKNOWLEDGE. So the guest plays the virtio driver by hand (measured recipe, see the
platform facts): unbind the function from its driver, enable it (on aarch64 nothing else
turns memory decoding on, and BAR reads return 0xffffffff), then walk device_status in the
common config to DRIVER_OK with only VIRTIO_F_VERSION_1 negotiated. Shared memory is then
read and written at BAR 4 + region offset + shm_offset; `iomem=relaxed` on the kernel
command line lets devmem reach a BAR even while a driver owns it.

Where things are is computed (pure) from the function's config space and sysfs resources:
the common config from the cfg_type 1 capability (bar, offset), the regions from the
cfg_type 8 ones. Nothing is hard-coded but the register offsets of the virtio spec.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from testbed.errors import ConfigError, GuestCommandFailed, ParseError, StateError
from testbed.guest.inspect import inspect_pci
from testbed.guest.pci import PciFunction, ResourceTable
from testbed.guest.ssh import CommandResult
from testbed.virtio import (
    DRIVER_OK_PROGRAM,
    RESET_PROGRAM,
    VIRTIO_PCI_CAP_COMMON_CFG,
    Expect,
    Step,
    Write,
    check,
)

WORD = 4  # devmem accesses are 32-bit: BAR 4 is memory, any aligned width works
_DEVMEM_VALUE = re.compile(r"^0x[0-9a-fA-F]+$")


# What the guest reads where nothing is mapped in BAR 4 (measured, QEMU 11.1.3 TCG): zeros
# on x86_64 q35, all-ones on aarch64 virt (its PCI window answers unbacked reads like a
# master abort). Either is "no mapping"; the pattern a test maps is random.
UNMAPPED_FILL = (0x00, 0xFF)


def looks_unmapped(data: bytes) -> bool:
    """True when ``data`` is what an unmapped part of a region reads as. Pure."""
    return bool(data) and data[0] in UNMAPPED_FILL and data == bytes([data[0]]) * len(data)


class _Runner(Protocol):
    def run(self, command: str, *, check: bool = False, timeout: float = 60.0) -> CommandResult: ...


@dataclass(frozen=True)
class ShmWindow:
    """One shared-memory region as the guest addresses it (physical addresses)."""

    shmid: int
    address: int
    """BAR 4 start + the capability's offset."""
    length: int


@dataclass(frozen=True)
class DeviceWindows:
    """Where one test device's registers and regions are in guest physical memory."""

    bdf: str
    common_cfg: int
    """Physical address of struct virtio_pci_common_cfg."""
    regions: Mapping[int, ShmWindow]

    def address(self, shmid: int, shm_offset: int, length: int) -> int:
        """The physical address of ``length`` bytes at ``shm_offset`` of region ``shmid``."""
        window = self.regions.get(shmid)
        if window is None:
            raise ConfigError(
                f"{self.bdf}: no shared-memory region {shmid}; "
                f"the device has {sorted(self.regions) or 'none'}"
            )
        if shm_offset < 0 or length < 0 or shm_offset + length > window.length:
            raise ConfigError(
                f"{self.bdf}: {shm_offset:#x}+{length:#x} lies outside region {shmid} "
                f"({window.length:#x} bytes)"
            )
        return window.address + shm_offset


def locate(bdf: str, function: PciFunction, resources: ResourceTable) -> DeviceWindows:
    """Compute the common config and region addresses from config space and sysfs. Pure."""
    common = [c for c in function.virtio_caps if c.cfg_type == VIRTIO_PCI_CAP_COMMON_CFG]
    if not common:
        raise ParseError(f"{bdf}: no virtio common config capability (cfg_type 1)")
    cap = common[0]
    bar = resources.bar(cap.bar)
    if bar is None or not bar.assigned:
        raise StateError(
            "unassigned", "assigned", f"{bdf}: BAR {cap.bar} holding the virtio common config"
        )
    regions: dict[int, ShmWindow] = {}
    for shm in function.virtio_shm_caps:
        shm_bar = resources.bar(shm.bar)
        if shm_bar is None or not shm_bar.assigned:
            raise StateError(
                "unassigned",
                "assigned",
                f"{bdf}: BAR {shm.bar} of shared-memory region {shm.shmid} (see guest dmesg)",
            )
        regions[shm.shmid] = ShmWindow(shm.shmid, shm_bar.start + shm.offset, shm.length)
    return DeviceWindows(bdf, bar.start + cap.offset, regions)


def _check_words(address: int, length: int) -> None:
    if address % WORD or length % WORD:
        raise ConfigError(
            f"devmem access at {address:#x}+{length}: address and length must be multiples "
            f"of {WORD} (32-bit accesses)"
        )


def devmem_read_script(address: int, length: int) -> str:
    """A sh script printing ``length`` bytes at ``address`` as one devmem word per line."""
    _check_words(address, length)
    return "\n".join(f"devmem {address + i:#x} 32" for i in range(0, length, WORD)) + "\n"


def parse_devmem_words(text: str, length: int) -> bytes:
    """The bytes of devmem_read_script's output (little-endian words). Pure."""
    words = [line.strip() for line in text.splitlines() if line.strip()]
    if len(words) != length // WORD:
        raise ParseError(f"devmem printed {len(words)} words, want {length // WORD}: {text!r}")
    out = bytearray()
    for word in words:
        if not _DEVMEM_VALUE.match(word):
            raise ParseError(f"devmem printed {word!r}, want a hex value like 0x0000abcd")
        out += int(word, 16).to_bytes(WORD, "little")
    return bytes(out)


def devmem_write_script(address: int, data: bytes) -> str:
    """A sh script writing ``data`` at ``address`` with 32-bit devmem writes."""
    _check_words(address, len(data))
    lines = [
        f"devmem {address + i:#x} 32 {int.from_bytes(data[i : i + WORD], 'little'):#x}"
        for i in range(0, len(data), WORD)
    ]
    return "\n".join(lines) + "\n"


def program_script(program: tuple[Step, ...], common_cfg: int) -> str:
    """A virtio register program (testbed.virtio) as one devmem script: a write per Write,
    a read (one printed value) per Expect; set -e, so a failing devmem stops it."""
    lines = ["set -e"]
    for step in program:
        address = common_cfg + step.offset
        if isinstance(step, Write):
            lines.append(f"devmem {address:#x} {step.width} {step.value:#x}")
        else:
            lines.append(f"devmem {address:#x} {step.width}")
    return "\n".join(lines) + "\n"


def parse_status_lines(text: str, count: int) -> list[int]:
    """The ``count`` device_status values a script printed (devmem 8-bit reads). Pure."""
    values = [line.strip() for line in text.splitlines() if line.strip()]
    if len(values) != count or not all(_DEVMEM_VALUE.match(v) for v in values):
        raise ParseError(f"want {count} devmem values, got {text!r}")
    return [int(v, 16) for v in values]


class GuestDevice:
    """A vhost-user test device in the guest, driven by hand over SSH.

    Holds no guest resources of its own (every call is one SSH command), so there is
    nothing to close; ``reset()`` returns the device to status 0.
    """

    def __init__(self, ssh: _Runner, bdf: str, *, timeout: float = 30.0) -> None:
        if not re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", bdf):
            raise ConfigError(f"{bdf!r} is not a PCI address like 0000:00:10.0")
        self.ssh = ssh
        self.bdf = bdf
        self.sysfs = f"/sys/bus/pci/devices/{bdf}"
        self.timeout = timeout
        self._windows: DeviceWindows | None = None

    def _run(self, script: str) -> CommandResult:
        result = self.ssh.run(script, timeout=self.timeout)
        if result.returncode != 0:
            raise GuestCommandFailed(script[:200], result.returncode, result.stdout, result.stderr)
        return result

    def detach(self) -> None:
        """Unbind from whatever driver holds it (virtio-pci), then enable memory decoding."""
        sysfs = shlex.quote(self.sysfs)
        bdf = shlex.quote(self.bdf)
        self._run(
            f"set -e\n"
            f"if [ -e {sysfs}/driver ]; then echo {bdf} > {sysfs}/driver/unbind; fi\n"
            f"echo 1 > {sysfs}/enable\n"
        )

    def windows(self) -> DeviceWindows:
        """Where the registers and regions are (read once: BARs do not move while bound)."""
        if self._windows is None:
            view = inspect_pci(self.ssh, [self.bdf], lspci=False, dmesg=False, timeout=self.timeout)
            device = view.devices.get(self.bdf)
            if device is None:
                raise ParseError(f"{self.bdf}: the guest does not list this function")
            self._windows = locate(self.bdf, device.function, device.resources)
        return self._windows

    def _play(self, program: tuple[Step, ...]) -> None:
        out = self._run(program_script(program, self.windows().common_cfg))
        expects = [step for step in program if isinstance(step, Expect)]
        for step, value in zip(expects, parse_status_lines(out.text, len(expects)), strict=True):
            check(step, value, self.bdf)

    def start(self) -> None:
        """Detach, then negotiate VERSION_1 and set DRIVER_OK; checks each step took."""
        self.detach()
        self._play(DRIVER_OK_PROGRAM)

    def reset(self) -> None:
        """Write 0 to device_status (a virtio reset); checks it reads back 0."""
        self._play(RESET_PROGRAM)

    def read(self, shmid: int, shm_offset: int, length: int) -> bytes:
        """``length`` bytes of region ``shmid`` at ``shm_offset``, through BAR 4."""
        address = self.windows().address(shmid, shm_offset, length)
        out = self._run(devmem_read_script(address, length))
        return parse_devmem_words(out.text, length)

    def write(self, shmid: int, shm_offset: int, data: bytes) -> None:
        """Write ``data`` to region ``shmid`` at ``shm_offset``, through BAR 4."""
        address = self.windows().address(shmid, shm_offset, len(data))
        self._run(devmem_write_script(address, data))
