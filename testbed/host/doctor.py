"""`testbed doctor`: can this host run the suite, and what to do about each gap.

collect() gathers a Report (I/O); render_table() and Report.to_json() are pure. Every
kernel's guest image is named, with the kernel it holds (the default marked).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.host import accel as accel_mod
from testbed.host import debian
from testbed.host import qemu as qemu_mod
from testbed.images import DEFAULT_KERNEL, kernel_names, load_image
from testbed.machine.probe import probe_shmem_support
from testbed.paths import cache_dir

OK, WARN, FAIL = "ok", "warn", "FAIL"
SHMEM_PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class Check:
    """One line of the report. FAIL means the suite cannot run; WARN means slower or later."""

    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # the JSON form
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def add(self, check: Check) -> None:
        self.checks.append(check)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.data,
            "ok": self.ok,
            "checks": [c.__dict__ for c in self.checks],
            "seconds": round(self.seconds, 3),
        }


def render_table(report: Report) -> str:
    """A fixed-width table, then the fixes for every gap."""
    width = max((len(c.name) for c in report.checks), default=10)
    lines = [f"{c.status:<4}  {c.name:<{width}}  {c.detail}" for c in report.checks]
    fixes = [f"  - {c.name}: {c.fix}" for c in report.checks if c.fix and c.status != OK]
    if fixes:
        lines += ["", "to do:", *fixes]
    verdict = "this host can run the suite" if report.ok else "this host cannot run the suite"
    lines += ["", f"{verdict} (doctor took {report.seconds:.2f} s)"]
    return "\n".join(lines)


def tree_size(path: Path) -> int:
    """Bytes under ``path`` (files as stored; symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def collect(
    explicit: Mapping[str, str | None] | None = None, *, shmem_probe: bool = True
) -> Report:
    """Run every check. ``explicit``: arch -> --qemu-<arch> value (or None)."""
    started = time.monotonic()
    report = Report()
    data = report.data
    explicit = explicit or {}

    py = sys.version_info
    report.add(
        Check(
            "python",
            OK if py >= (3, 11) else FAIL,
            f"{py.major}.{py.minor}.{py.micro} ({sys.executable})",
            "" if py >= (3, 11) else "use Python >= 3.11",
        )
    )
    data["python"] = {"version": f"{py.major}.{py.minor}.{py.micro}"}

    data["qemu"] = {}
    resolved: dict[str, qemu_mod.QemuBinary] = {}
    for arch in qemu_mod.ARCHES:
        entry: dict[str, Any] = {"path": None, "version": None, "source": None}
        data["qemu"][arch] = entry
        try:
            binary = qemu_mod.resolve_qemu(arch, explicit.get(arch))
        except TestbedError as exc:
            entry["error"] = str(exc)
            report.add(
                Check(
                    f"qemu {arch}",
                    FAIL,
                    str(exc).split(". ")[0],
                    (
                        f"point --qemu-{arch} / ${qemu_mod.env_var(arch)} at a QEMU >= 11.1 "
                        "with vhost-user, or drop it to use the provisioned one"
                    )
                    if explicit.get(arch) or os.environ.get(qemu_mod.env_var(arch))
                    else "run `testbed qemu provision` (or `make setup`), or pass "
                    f"--qemu-{arch} / ${qemu_mod.env_var(arch)} with a QEMU >= 11.1 build",
                )
            )
            continue
        resolved[arch] = binary
        entry.update(
            path=str(binary.path),
            version=binary.version_str,
            source=binary.source,
            device=qemu_mod.REQUIRED_DEVICE,
        )
        report.add(
            Check(
                f"qemu {arch}",
                OK,
                f"{binary.version_str} [{binary.source}] {binary.path}; "
                f"{qemu_mod.REQUIRED_DEVICE} present",
            )
        )
        if shmem_probe:
            report.add(_shmem_probe_check(arch, binary, entry))

    data["accel"] = {"kvm": {}}
    facts = accel_mod.gather_facts()
    host_qemu = resolved.get(facts.host_arch)
    if host_qemu is None:
        why = accel_mod.kvm_obstacle(facts.host_arch, facts) or "no QEMU for the host arch to probe"
        usable = False
    else:
        choice = accel_mod.choose_accel("auto", facts.host_arch, host_qemu.path)
        usable = choice.name == "kvm"
        why = choice.reason
    data["accel"]["kvm"] = {"usable": usable, "reason": why, "modules": list(facts.kvm_modules)}
    report.add(
        Check(
            "kvm",
            OK if usable else WARN,
            why,
            "" if usable else "guests run under TCG (slower, still correct)",
        )
    )

    try:
        missing = debian.missing_packages()
        wanted = debian.required_packages()
    except TestbedError as exc:
        report.add(Check("debian packages", WARN, str(exc)))
        data["debian"] = {"error": str(exc)}
    else:
        names = [p.name for p in missing]
        data["debian"] = {"required": [p.name for p in wanted], "missing": names}
        # Missing tools only matter when something still has to be built with them.
        needed = bool(missing) and len(resolved) < len(qemu_mod.ARCHES)
        report.add(
            Check(
                "debian packages",
                OK if not missing else (FAIL if needed else WARN),
                "all present: " + ", ".join(p.name for p in wanted)
                if not missing
                else "missing: " + ", ".join(names),
                ""
                if not missing
                else "as root: testbed qemu provision --install-missing "
                f"(or {debian.install_hint(names)})",
            )
        )

    data["images"] = {}
    for arch in qemu_mod.ARCHES:
        for kernel in kernel_names(arch):
            report.add(_image_check(arch, kernel, data["images"]))

    root = cache_dir()
    size = tree_size(root) if root.exists() else 0
    stamp = qemu_mod.read_stamp()
    data["cache_dir"] = str(root)
    data["cache_size"] = size
    data["provisioned"] = None if stamp is None else {"packages": stamp.packages,
                                                       "created": stamp.created}  # fmt: skip
    report.add(Check("cache", OK, f"{root} ({human_size(size)})"))
    report.seconds = time.monotonic() - started
    return report


def _shmem_probe_check(arch: str, binary: qemu_mod.QemuBinary, entry: dict[str, Any]) -> Check:
    try:
        result = probe_shmem_support(binary.path, arch, SHMEM_PROBE_TIMEOUT)
    except TestbedError as exc:
        entry["shmem_probe"] = {"supported": False, "detail": str(exc), "requests_seen": []}
        return Check(f"shmem {arch}", FAIL, f"probe failed: {exc}", "see the error above")
    entry["shmem_probe"] = {
        "supported": result.supported,
        "detail": result.detail,
        "requests_seen": result.requests_seen,
    }
    return Check(
        f"shmem {arch}",
        OK if result.supported else FAIL,
        f"GET_SHMEM_CONFIG {'sent' if result.supported else 'not sent'}: {result.detail}",
        "" if result.supported else "this QEMU lacks vhost-user shared memory; use QEMU >= 11.1",
    )


def _image_check(arch: str, kernel: str, out: dict[str, Any]) -> Check:
    """One guest image: built or not, and which kernel it holds (the default marked)."""
    name = f"image {arch} {kernel}" + (" (default)" if kernel == DEFAULT_KERNEL else "")
    key = f"{arch}-{kernel}"
    try:
        image = load_image(arch, kernel=kernel)
    except TestbedError as exc:
        image, why = None, str(exc)
    else:
        why = "not built yet"
    if image is None:
        out[key] = {"present": False, "detail": why}
        return Check(
            name,
            WARN,
            why,
            f"`testbed images build --arch {arch} --kernel {kernel}` (or first use)",
        )
    out[key] = {
        "present": True,
        "hash": image.content_hash,
        "kernel": image.kernel_name,
        "kernel_release": image.kernel_release,
    }
    return Check(name, OK, f"built ({image.content_hash}): Linux {image.kernel_release}")
