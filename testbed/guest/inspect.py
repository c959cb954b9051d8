"""What the guest sees on PCI, collected over one SSH command and parsed in one place.

The guest side is a busybox sh script (no Python there): for every PCI function it prints
config space (od hex), sysfs `resource` and the bound driver; then `lspci -vv` when the
image has it, then `dmesg`. Parsing (`parse_inspection`) is pure and unit-tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from testbed.errors import ParseError
from testbed.guest.lspci import LspciDevice, parse_lspci
from testbed.guest.pci import PciFunction, ResourceTable, parse_config_space, parse_resource
from testbed.guest.ssh import CommandResult

MARK = "@@testbed "

# `od -An -v -tx1`: every byte, no addresses, no '*' for repeated lines.
INSPECT_SCRIPT = f"""
for d in /sys/bus/pci/devices/*; do
  echo "{MARK}device ${{d##*/}}"
  echo "{MARK}config"; od -An -v -tx1 "$d/config"
  echo "{MARK}resource"; cat "$d/resource"
  echo "{MARK}driver"; if [ -e "$d/driver" ]; then basename "$(readlink "$d/driver")"; fi
done
echo "{MARK}lspci"
if command -v lspci >/dev/null 2>&1; then lspci -vv -D 2>&1; else echo "{MARK}no-lspci"; fi
echo "{MARK}dmesg"; dmesg
"""


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
        return [
            d
            for d in self.devices.values()
            if d.function.vendor_id == vendor_id and d.function.device_id == device_id
        ]


def _hex_bytes(text: str, bdf: str) -> bytes:
    try:
        return bytes(int(word, 16) for word in text.split())
    except ValueError as exc:
        raise ParseError(f"{bdf}: config dump is not od hex output: {text[:80]!r}") from exc


def parse_inspection(text: str) -> GuestPciView:
    """Parse INSPECT_SCRIPT's output."""
    devices: dict[str, GuestPciDevice] = {}
    sections: dict[str, list[str]] = {}
    device_sections: list[tuple[str, dict[str, list[str]]]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(MARK):
            words = line[len(MARK) :].split()
            if not words:
                continue
            if words[0] == "device" and len(words) == 2:
                device_sections.append((words[1], {}))
                current = None
                continue
            if words[0] in ("config", "resource", "driver") and device_sections:
                current = device_sections[-1][1].setdefault(words[0], [])
                continue
            if words[0] in ("lspci", "dmesg"):
                current = sections.setdefault(words[0], [])
                continue
            if words[0] == "no-lspci":
                sections["no-lspci"] = []
                continue
        if current is not None:
            current.append(line)
    problems: list[str] = []
    for bdf, parts in device_sections:
        config = _hex_bytes("\n".join(parts.get("config", [])), bdf)
        function = parse_config_space(config)
        problems.extend(f"{bdf}: {p}" for p in function.problems)
        driver = "\n".join(parts.get("driver", [])).strip() or None
        devices[bdf] = GuestPciDevice(
            bdf=bdf,
            function=function,
            resources=parse_resource("\n".join(parts.get("resource", []))),
            driver=driver,
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


def inspect_pci(ssh: _Runner, timeout: float = 30.0) -> GuestPciView:
    """Collect and parse the guest's PCI view over one SSH command."""
    result = ssh.run(INSPECT_SCRIPT, check=True, timeout=timeout)
    return parse_inspection(result.stdout.decode(errors="replace"))
