"""Which accelerator to run guests with: KVM only where it really works, else TCG.

/dev/kvm existing is not enough: some machines expose kvm_pvm, a paravirtual nested KVM that
runs only PVM-enabled guest kernels (stock kernels never reach the console). So auto needs:
guest arch == host arch, /dev/kvm opens read-write, no kvm_pvm, and a functional probe (a
tiny payload that must run under -accel kvm and make QEMU exit with a known status: run by
testbed.machine.probe) whose verdict is cached per host kernel, KVM modules and QEMU binary.

decide_accel is pure over HostFacts; choose_accel gathers the facts.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path

from testbed.errors import ConfigError, HostCapabilityError
from testbed.host.qemu import read_json, write_json_atomic
from testbed.machine.probe import ProbeVerdict, run_kvm_probe
from testbed.paths import cache_dir

ACCELS = ("auto", "kvm", "tcg")
PARAVIRT_MODULES = ("kvm_pvm",)
PROBE_TIMEOUT = 5.0  # a working KVM runs the payload in milliseconds


@dataclass(frozen=True)
class HostFacts:
    """What decides KVM. ``probe`` is None when it has not been run (or need not be)."""

    host_arch: str
    kvm_device_exists: bool
    kvm_device_usable: bool  # opens read-write
    kvm_device_error: str = ""
    kvm_modules: tuple[str, ...] = ()
    probe: ProbeVerdict | None = None


@dataclass(frozen=True)
class AccelChoice:
    name: str  # "kvm" or "tcg"
    reason: str


def normalize_arch(machine: str) -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def kvm_obstacle(arch: str, facts: HostFacts) -> str | None:
    """Why KVM cannot run ``arch`` guests here, judged without the probe; None: try it."""
    if arch != facts.host_arch:
        return f"guest {arch} differs from host {facts.host_arch}, KVM needs the same arch"
    if not facts.kvm_device_exists:
        return "/dev/kvm does not exist (no KVM module loaded, or not exposed to this host)"
    if not facts.kvm_device_usable:
        return f"/dev/kvm cannot be opened read-write ({facts.kvm_device_error or 'denied'})"
    paravirt = [m for m in facts.kvm_modules if m in PARAVIRT_MODULES]
    if paravirt:
        return f"/dev/kvm is {paravirt[0]} (paravirtual KVM), which cannot run stock kernels"
    return None


def decide_accel(requested: str, arch: str, facts: HostFacts) -> AccelChoice:
    """The accelerator for ``requested`` ("auto", "kvm", "tcg"); pure.

    Explicit kvm that cannot work raises HostCapabilityError with the reason. When the static
    facts allow KVM but ``facts.probe`` is None, auto and kvm need the probe first: the caller
    runs it (choose_accel does); here that counts as "not confirmed".
    """
    if requested not in ACCELS:
        raise ConfigError(f"unknown accelerator {requested!r}; use one of {', '.join(ACCELS)}")
    if requested == "tcg":
        return AccelChoice("tcg", "TCG: requested")
    why = kvm_obstacle(arch, facts)
    if why is None:
        if facts.probe is None:
            why = "KVM was not confirmed by the functional probe"
        elif facts.probe.works:
            return AccelChoice("kvm", f"KVM: /dev/kvm works ({facts.probe.detail})")
        else:
            why = f"the KVM probe failed: {facts.probe.detail}"
    if requested == "kvm":
        raise HostCapabilityError(f"--accel kvm cannot work here: {why}; use --accel tcg or auto")
    return AccelChoice("tcg", f"TCG: {why}")


# --------------------------------------------------------------------------- I/O: facts


def kvm_modules() -> tuple[str, ...]:
    try:
        modules = Path("/sys/module").iterdir()
        return tuple(sorted(p.name for p in modules if p.name.startswith("kvm")))
    except OSError:
        return ()


def gather_facts() -> HostFacts:
    device = Path("/dev/kvm")
    exists = device.exists()
    usable, error = False, ""
    if exists:
        try:
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            error = exc.strerror or str(exc)
        else:
            os.close(fd)
            usable = True
    return HostFacts(
        host_arch=normalize_arch(platform.machine()),
        kvm_device_exists=exists,
        kvm_device_usable=usable,
        kvm_device_error=error,
        kvm_modules=kvm_modules(),
    )


def _probe_cache() -> Path:
    return cache_dir() / "host" / "kvm-probe.json"


def probe_cache_key(kernel_release: str, modules: tuple[str, ...], qemu: Path) -> str:
    return f"{kernel_release}|{','.join(modules)}|{qemu}"


def cached_probe(arch: str, qemu: Path, facts: HostFacts) -> ProbeVerdict:
    """The KVM probe verdict, run once per (kernel release, KVM modules, QEMU path)."""
    key = probe_cache_key(platform.release(), facts.kvm_modules, qemu.resolve())
    cache = read_json(_probe_cache())
    hit = cache.get(key)
    if isinstance(hit, dict) and "works" in hit:
        return ProbeVerdict(bool(hit["works"]), str(hit.get("detail", "")))
    verdict = run_kvm_probe(arch, qemu, "kvm", PROBE_TIMEOUT)
    cache[key] = {"works": verdict.works, "detail": verdict.detail}
    with contextlib.suppress(OSError):  # an unwritable cache only costs a re-probe
        write_json_atomic(_probe_cache(), cache)
    return verdict


def choose_accel(requested: str, arch: str, qemu: Path) -> AccelChoice:
    """The accelerator for a guest of ``arch`` run by ``qemu``; see decide_accel."""
    facts = gather_facts()
    if requested != "tcg" and kvm_obstacle(arch, facts) is None:
        facts = replace(facts, probe=cached_probe(arch, qemu, facts))
    return decide_accel(requested, arch, facts)
