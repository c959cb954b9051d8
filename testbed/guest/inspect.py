"""THE guest reader: what the guest sees on PCI, collected over one SSH command and parsed
in one place.

The guest side is a busybox sh script (no Python there): for every PCI function (or the
ones asked for) it prints config space (od hex), sysfs `resource` and the bound driver;
then, when asked, `lspci -vv` (if the image has it) and `dmesg`. The verdict, hot-plug's
polling and the data path's register map all read the guest through `inspect_pci`;
parsing (`parse_inspection`) is pure and unit-tested.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from testbed.errors import ParseError
from testbed.guest.lspci import LspciDevice, parse_lspci
from testbed.guest.pci import (
    VIRTIO_VENDOR,
    PciFunction,
    ResourceTable,
    parse_config_space,
    parse_resource,
)
from testbed.guest.ssh import CommandResult

MARK = "@@testbed "


class DeviceNotFound(AssertionError):
    """The guest does not show the device a scenario expects (an assertion about the guest,
    hence an AssertionError: the scenario fails with what the guest has)."""


# Modern virtio-pci device ids are 0x1040 + the virtio device id.
VIRTIO_MODERN_BASE = 0x1040


def inspect_script(
    bdfs: Sequence[str] | None = None, *, lspci: bool = True, dmesg: bool = True
) -> str:
    """The guest-side script: every function (or ``bdfs``), then lspci and dmesg if asked.

    Three execs for all the functions together, not two per function (each exec costs
    ~10 ms under TCG): `stat` gives each config file's size (256 or 4096) in the order `od`
    then dumps them as one stream (`-An -v -tx1`: every byte, no addresses, no '*' for
    repeated lines), `grep -H` prefixes each resource line with its file; the driver's
    name comes from the shell's own `cd -P`."""
    where = " ".join(f"/sys/bus/pci/devices/{shlex.quote(b)}" for b in bdfs or ()) or (
        "/sys/bus/pci/devices/*"
    )
    lines = [
        f"set -- {where}",
        'c=""; r=""',
        'for d; do [ -e "$d/config" ] || continue; c="$c $d/config"; r="$r $d/resource"; done',
        f'echo "{MARK}sizes"; [ -z "$c" ] || stat -c "%n %s" $c',
        f'echo "{MARK}config"; [ -z "$c" ] || od -An -v -tx1 $c',
        f'echo "{MARK}resource"; [ -z "$r" ] || grep -H "" $r',
        f'echo "{MARK}drivers"',
        'for d; do [ -e "$d/config" ] || continue',
        '  if cd -P "$d/driver" 2>/dev/null; then echo "${d##*/} ${PWD##*/}"; cd /;',
        '  else echo "${d##*/}"; fi',
        "done",
    ]
    if lspci:
        lines += [
            f'echo "{MARK}lspci"',
            "if command -v lspci >/dev/null 2>&1; then lspci -vv -D 2>&1;",
            f'else echo "{MARK}no-lspci"; fi',
        ]
    if dmesg:
        lines.append(f'echo "{MARK}dmesg"; dmesg')
    return "\n".join(lines) + "\n"


class _Runner(Protocol):
    def run(self, command: str, *, check: bool = False, timeout: float = 60.0) -> CommandResult: ...


@dataclass(frozen=True)
class GuestPciDevice:
    bdf: str
    function: PciFunction
    resources: ResourceTable
    driver: str | None


@dataclass(frozen=True)
class GuestPciView:
    devices: dict[str, GuestPciDevice]
    lspci: dict[str, LspciDevice] | None
    """None when the image has no lspci."""
    lspci_text: str = ""
    dmesg: str = ""
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def virtio_devices(self) -> dict[str, GuestPciDevice]:
        return {bdf: d for bdf, d in self.devices.items() if d.function.is_virtio}

    def find(self, vendor_id: int, device_id: int) -> list[GuestPciDevice]:
        """Functions with these ids, by BDF."""
        return sorted(
            (
                d
                for d in self.devices.values()
                if d.function.vendor_id == vendor_id and d.function.device_id == device_id
            ),
            key=lambda d: d.bdf,
        )

    def virtio_devices_of(self, virtio_id: int) -> list[GuestPciDevice]:
        """The modern virtio functions of device type ``virtio_id`` (the test devices)."""
        return self.find(VIRTIO_VENDOR, VIRTIO_MODERN_BASE + virtio_id)

    def our_device(self, virtio_id: int, bdf: str | None = None) -> GuestPciDevice:
        """Which PCI function is our device: the one at ``bdf`` (it must be a virtio-id
        ``virtio_id`` function), else the guest's only one of that type. The one place that
        chooses; DeviceNotFound says why none could be."""
        devices = {d.bdf: d for d in self.virtio_devices_of(virtio_id)}
        if bdf is not None:
            if bdf not in devices:
                where = (
                    "is missing from the guest's PCI view"
                    if bdf not in self.devices
                    else (f"is not a virtio-id {virtio_id} function")
                )
                raise DeviceNotFound(f"{bdf} {where}")
            return devices[bdf]
        if len(devices) != 1:
            raise DeviceNotFound(
                f"want one test device (virtio-id {virtio_id}) in the guest, have "
                f"{sorted(devices) or 'none'}"
            )
        return next(iter(devices.values()))

    def lspci_for(self, device: GuestPciDevice) -> LspciDevice | None:
        """lspci's reading of ``device``, or None when the image has no lspci."""
        return self.lspci.get(device.bdf) if self.lspci is not None else None


def _hex_bytes(text: str, what: str) -> bytes:
    try:
        return bytes(int(word, 16) for word in text.split())
    except ValueError as exc:
        raise ParseError(f"{what} is not od hex output: {text[:80]!r}") from exc


def _bdf_of(path: str) -> str:
    """'/sys/bus/pci/devices/0000:00:10.0/config' -> '0000:00:10.0'."""
    return path.rstrip("/").split("/")[-2]


def parse_inspection(text: str) -> GuestPciView:
    """Parse inspect_script's output. Pure."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(MARK):
            name = line[len(MARK) :].strip()
            current = sections.setdefault(name, [])
            continue
        if current is not None:
            current.append(line)
    sizes: list[tuple[str, int]] = []
    for line in sections.get("sizes", []):
        path, _, size_text = line.strip().rpartition(" ")
        if path:
            sizes.append((_bdf_of(path), int(size_text)))
    stream = _hex_bytes("\n".join(sections.get("config", [])), "config dump")
    if len(stream) != sum(size for _, size in sizes):
        raise ParseError(
            f"config dump has {len(stream)} bytes for sizes {sizes}: did a PCI function come "
            "or go while the guest was read? read again"
        )
    resources: dict[str, list[str]] = {}
    for line in sections.get("resource", []):
        path, sep, rest = line.partition(":0x")
        if sep:
            resources.setdefault(_bdf_of(path), []).append("0x" + rest)
    drivers: dict[str, str] = {}
    for line in sections.get("drivers", []):
        bdf, _, driver = line.strip().partition(" ")
        if bdf:
            drivers[bdf] = driver
    devices: dict[str, GuestPciDevice] = {}
    problems: list[str] = []
    offset = 0
    for bdf, size in sizes:
        function = parse_config_space(stream[offset : offset + size])
        offset += size
        problems.extend(f"{bdf}: {p}" for p in function.problems)
        devices[bdf] = GuestPciDevice(
            bdf=bdf,
            function=function,
            resources=parse_resource("\n".join(resources.get(bdf, []))),
            driver=drivers.get(bdf) or None,
        )
    lspci_text = "\n".join(sections.get("lspci", []))
    lspci = None if "no-lspci" in sections else parse_lspci(lspci_text)
    return GuestPciView(
        devices=devices,
        lspci=lspci,
        lspci_text=lspci_text,
        dmesg="\n".join(sections.get("dmesg", [])),
        problems=tuple(problems),
    )


def inspect_pci(
    ssh: _Runner,
    bdfs: Sequence[str] | None = None,
    *,
    lspci: bool = True,
    dmesg: bool = True,
    timeout: float = 30.0,
) -> GuestPciView:
    """Collect and parse the guest's PCI view over one SSH command."""
    result = ssh.run(inspect_script(bdfs, lspci=lspci, dmesg=dmesg), check=True, timeout=timeout)
    return parse_inspection(result.stdout.decode(errors="replace"))
