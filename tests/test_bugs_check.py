"""`testbed bugs check` and `export` against the provisioned QEMU: every registry entry's
guest-less reproducer must show its bug on both architectures (where the entry's arches
allow), and an exported repro.py must reproduce with the system Python, outside the venv."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed.bugs import lookup, registry
from testbed.bugs.export import export, recipe_arch
from testbed.bugs.runner import run_recipe
from testbed.cli import main
from testbed.errors import TestbedError
from testbed.host.qemu import QemuBinary, resolve_qemu
from testbed.machine.profiles import ARCHES

pytestmark = pytest.mark.qemu

SYSTEM_PYTHON = Path("/usr/bin/python3")


def _qemu(arch: str) -> QemuBinary:
    try:
        return resolve_qemu(arch)
    except TestbedError as exc:
        pytest.skip(f"no QEMU for {arch}: {exc}")


CASES = [
    pytest.param(bug_id, arch, id=f"{bug_id}-{arch}")
    for bug_id, bug in registry().items()
    for arch in ARCHES
    if arch in bug.arches
]


@pytest.mark.parametrize(("bug_id", "arch"), CASES)
def test_reproducer_shows_the_bug(bug_id: str, arch: str) -> None:
    qemu = _qemu(arch)
    bug = lookup(bug_id)
    if not bug.applies(qemu.version_str):
        pytest.skip(f"the registry does not list QEMU {qemu.version_str} for {bug_id}")
    outcome = run_recipe(bug_id, arch, qemu.path).outcome
    seen = outcome.evidence.headline() if outcome.evidence else "nothing"
    assert outcome.reproduced, f"{bug_id} on {arch}: {outcome.status}: {seen} ({outcome.detail})"


def test_check_command_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    _qemu("x86_64")
    assert main(["bugs", "check", "bar-not-power-of-two-abort", "--arch", "x86_64"]) == 0
    out = capsys.readouterr().out
    assert "reproduces" in out and "is_power_of_2" in out


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no /usr/bin/python3")
@pytest.mark.parametrize("bug_id", list(registry()))
def test_every_export_reproduces_with_the_system_python(bug_id: str, tmp_path: Path) -> None:
    """`testbed bugs export ID DIR` for every entry (fuzz-found ones included), then
    DIR/repro.py with the system python3, from another temp dir, in an empty environment."""
    bug = lookup(bug_id)
    arch = recipe_arch(bug, None)
    qemu = _qemu(arch)
    done = export(bug_id, tmp_path / "export", arch, qemu.path, qemu.version_str)
    names = {p.name for p in done.files}
    assert {"README.md", "qemu-cmdline.txt", "repro.py"} <= names
    assert bug.title in (done.directory / "README.md").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run(
        [str(SYSTEM_PYTHON), str(done.directory / "repro.py"), "--qemu", str(qemu.path)],
        env={}, cwd=elsewhere, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "REPRODUCED" in run.stdout


def test_report_is_upstream_ready(capsys: pytest.CaptureFixture[str]) -> None:
    _qemu("x86_64")
    assert main(["bugs", "report", "shmem-map-past-eof-refused", "--arch", "x86_64"]) == 0
    out = capsys.readouterr().out
    for heading in ("What happens", "What the spec says", "Reproducer", "Signature", "Root cause",
                    "Source"):  # fmt: skip
        assert f"## {heading}" in out
    assert "Seen on QEMU 11.1.3, x86_64, aarch64" in out
    assert "-device vhost-user-test-device-pci" in out  # the command line, inline
    assert "will mmap the given fd" in out and "backing store size" in out


def test_check_takes_the_device(capsys: pytest.CaptureFixture[str]) -> None:
    _qemu("x86_64")
    argv = ["bugs", "check", "vub-get-features-abort", "--arch", "x86_64"]
    assert main([*argv, "--device", "vhost-user-rng-pci"]) == 0
    out = capsys.readouterr().out
    assert "device vhost-user-rng-pci" in out and "reproduces" in out
