"""Capability probes: run a QEMU binary briefly to learn what it can do.

- version_output / query_qmp: `-version`, then QMP queries of a machine-less QEMU (the facts
  testbed.host.qemu decides suitability from);
- run_kvm_probe: a tiny payload that must run under an accelerator and make QEMU exit with
  a known status (testbed.host.accel decides KVM from it);
- probe_shmem_support: a guest-less QEMU with our back-end attached: does it ask for the
  shared-memory regions and build BAR 4 of their size?
and the pure helpers to read QEMU's answers (parse_mtree_shmem, pci_bar).

Every process goes through testbed.machine.qemu; the decisions stay in testbed.host.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.device import ShmemLayout, VhostUserDevice
from testbed.errors import ConfigError, QemuExited, WaitTimeout
from testbed.machine.cmdline import QtestConfig, bare_command
from testbed.machine.qemu import QemuMachine, QemuRun, run_to_exit
from testbed.machine.qtest import QtestMachine
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.codes import Request
from testbed.vhost_user.faults import Faults

# -- the binary: version and device types -----------------------------------------------------


def version_output(qemu: Path, timeout: float) -> QemuRun:
    """`qemu -version` (cheap: no machine is created). OSError if it cannot start."""
    return run_to_exit([str(qemu), "-version"], timeout)


class _BareMachine(QemuMachine):
    """A QEMU without any machine (-machine none): only there to answer QMP."""

    def __init__(self, qemu: Path, qmp_timeout: float) -> None:
        super().__init__(qmp_timeout=qmp_timeout)
        self.qemu = qemu

    def _command(self) -> list[str]:
        return bare_command(self.qemu, self.qmp_socket)


def query_qmp(qemu: Path, commands: Sequence[str], timeout: float) -> list[Any]:
    """Start ``qemu -machine none``, run each QMP command, quit; the replies. TestbedError
    (QemuExited, WaitTimeout, ...) when QEMU dies or does not answer in time; nothing
    outlives the call."""
    with _BareMachine(qemu, timeout) as machine:
        machine.start(timeout)
        replies = [machine.qmp(name) for name in commands]
        machine.shutdown(timeout)
    return replies


def device_types(qemu: Path, timeout: float = 20.0) -> set[str]:
    """Every QOM type ``qemu`` has (qom-list-types): which devices it can make."""
    (types,) = query_qmp(qemu, ("qom-list-types",), timeout)
    return {t.get("name") for t in types} if isinstance(types, list) else set()


# -- the KVM functional probe -----------------------------------------------------------------

# x86: isa-debug-exit turns a guest write of v to its port into QEMU exit status (v << 1) | 1.
X86_EXIT_PORT = 0xF4
X86_EXIT_VALUE = 0x21
X86_PROBE_EXIT = (X86_EXIT_VALUE << 1) | 1  # 67


@dataclass(frozen=True)
class ProbeVerdict:
    works: bool
    detail: str


def x86_probe_bios() -> bytes:
    """A 64 KiB BIOS image whose reset vector writes X86_EXIT_VALUE to the debug-exit port.

    The CPU starts in real mode at F000:FFF0, the image's last 16 bytes; `pc` needs a BIOS
    size that is a multiple of 64 KiB.
    """
    code = bytes([0xB0, X86_EXIT_VALUE, 0xE6, X86_EXIT_PORT, 0xF4, 0xEB, 0xFD])
    # mov al, v; out port, al; hlt; jmp $-1 (hlt again if woken)
    image = bytearray(b"\xf4" * 0x10000)
    image[0xFFF0 : 0xFFF0 + len(code)] = code
    return bytes(image)


def aarch64_probe_bios() -> bytes:
    """virt flash at 0: PSCI SYSTEM_OFF over HVC, which makes QEMU exit 0."""
    words = (
        0xD2800100,  # movz x0, #0x0008
        0xF2B08000,  # movk x0, #0x8400, lsl #16  -> 0x84000008 = PSCI SYSTEM_OFF
        0xD4000002,  # hvc #0
        0x14000000,  # b .
    )
    return struct.pack("<4I", *words)


def kvm_probe_command(arch: str, qemu: Path, payload: Path, accel: str) -> tuple[list[str], int]:
    """(QEMU command line, the exit status that proves the payload ran); pure."""
    common = ["-nodefaults", "-display", "none", "-no-reboot", "-m", "64", "-accel", accel]
    if arch == "x86_64":
        return [
            str(qemu), "-M", "pc", *common, "-bios", str(payload),
            "-device", f"isa-debug-exit,iobase={X86_EXIT_PORT:#x},iosize=1",
        ], X86_PROBE_EXIT  # fmt: skip
    if arch == "aarch64":
        cpu = "host" if accel == "kvm" else "max"
        return [
            str(qemu), "-M", "virt", "-cpu", cpu, *common, "-bios", str(payload),
        ], 0  # fmt: skip
    raise ConfigError(f"no KVM probe for {arch}")


def run_kvm_probe(arch: str, qemu: Path, accel: str, timeout: float) -> ProbeVerdict:
    """Run the payload under ``accel``; works when QEMU exits with the payload's status."""
    workdir = make_private_dir("kvm-probe")
    try:
        payload = workdir / "probe.bin"
        payload.write_bytes(x86_probe_bios() if arch == "x86_64" else aarch64_probe_bios())
        command, expected = kvm_probe_command(arch, qemu, payload, accel)
        try:
            done = run_to_exit(command, timeout)
        except WaitTimeout:
            return ProbeVerdict(False, f"a tiny {accel} guest did not run within {timeout:.0f} s")
        except OSError as exc:
            return ProbeVerdict(False, f"{qemu} cannot be started: {exc}")
        if done.returncode == expected:
            return ProbeVerdict(True, f"a {accel} probe guest ran and exited")
        err = done.stderr.strip().splitlines()
        return ProbeVerdict(
            False,
            f"probe exited {done.returncode}, expected {expected}"
            + (f": {err[-1]}" if err else ""),
        )
    finally:
        remove_tree(workdir)


# -- vhost-user shared memory -----------------------------------------------------------------

PROBE_LAYOUT = ShmemLayout({0: 2 << 20})


@dataclass(frozen=True)
class ProbeResult:
    supported: bool
    detail: str
    requests_seen: list[str]


def probe_shmem_support(qemu_path: Path | str, arch: str, timeout: float = 20.0) -> ProbeResult:
    """Start ``qemu_path`` guest-less (tcg -S) with our back-end attached and see whether
    it asks GET_SHMEM_CONFIG (VHOST_USER_PROTOCOL_F_SHMEM, bit 22 in QEMU 11.1) and builds
    BAR 4 of the served size. Never raises for an unsupported QEMU: the answer is in the
    result."""
    sockdir = make_private_dir("probe")
    try:
        socket_path = sockdir / "vu.sock"
        config = QtestConfig(
            arch, Path(qemu_path), (VhostUserDevice("vu0", socket_path),), qtest=False
        )
        with (
            Backend(socket_path, PROBE_LAYOUT, faults=Faults()) as backend,
            QtestMachine(config) as qemu,
        ):
            try:
                qemu.start(timeout)
                backend.wait_for_request(Request.GET_SHMEM_CONFIG, timeout)
                bar = pci_bar(qemu.pci_device(), 4)
            except QemuExited as exc:
                seen = [r.name for r in backend.requests_seen]
                return ProbeResult(False, f"QEMU could not start the device: {exc}", seen)
            except WaitTimeout:
                seen = [r.name for r in backend.requests_seen]
                stderr = qemu.stderr_text().strip()[-500:]
                why = "never connected" if not seen else "never asked GET_SHMEM_CONFIG"
                return ProbeResult(
                    False,
                    f"QEMU {why} within {timeout:.0f}s; it lacks vhost-user shared memory "
                    f"(needs QEMU 11.1){': ' + stderr if stderr else ''}",
                    seen,
                )
            seen = [r.name for r in backend.requests_seen]
            if bar is None or bar["size"] != PROBE_LAYOUT.total:
                return ProbeResult(
                    False,
                    f"GET_SHMEM_CONFIG was answered but BAR 4 is {bar}; expected "
                    f"{PROBE_LAYOUT.total} bytes",
                    seen,
                )
            return ProbeResult(
                True, "QEMU sent GET_SHMEM_CONFIG and exposed BAR 4 of the served size", seen
            )
    finally:
        remove_tree(sockdir)


_MTREE_LINE = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, [\w/-]+\): "
    r"(vhost-device-pci-shmembar|virtio-shmem-\d+(?:-\d+)?)\s*$"
)


def parse_mtree_shmem(text: str) -> dict[str, tuple[int, int]]:
    """From ``info mtree``: name -> (start, size) of the shared-memory BAR and its regions
    (``virtio-shmem-<shmid>``, mappings ``virtio-shmem-<shmid>-<offset>``). Pure."""
    found: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        match = _MTREE_LINE.match(line)
        if match:
            start, end = int(match.group(1), 16), int(match.group(2), 16)
            found.setdefault(match.group(3), (start, end - start + 1))
    return found


def pci_bar(device: dict[str, Any], index: int) -> dict[str, Any] | None:
    """query-pci region of BAR ``index`` (address, size, prefetch, mem_type_64), or None."""
    for region in device.get("regions", []):
        if region.get("bar") == index:
            return region
    return None
