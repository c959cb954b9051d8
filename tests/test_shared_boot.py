"""Shared cold boots (testbed.shared_boot): the pool's bookkeeping, and that pytest-xdist
really keeps a group on one worker (with the pytest we install), since one boot per group
is the point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed.device import VhostUserDevice
from testbed.errors import ConfigError, QemuExited
from testbed.shared_boot import SharedGroup, SharedPool

GROUP = SharedGroup("g", {"a": VhostUserDevice.of({0: 1 << 20}), "b": VhostUserDevice.of({})})


class FakeVM:
    """Stands in for a GuestVM in the pool's bookkeeping (no guest is judged here)."""

    def __init__(self, devices: tuple[VhostUserDevice, ...]) -> None:
        self.plugged = [f"plugged-{i}" for i in range(len(devices))]
        self.closed = False

    def close(self, failed: bool = False) -> None:
        self.closed = True


def test_pool_boots_a_group_once_per_arch(tmp_path: Path) -> None:
    started: list[FakeVM] = []

    def start(devices: tuple[VhostUserDevice, ...], where: Path) -> FakeVM:
        started.append(FakeVM(devices))
        return started[-1]

    pool = SharedPool()
    first = pool.get(GROUP, "x86_64", tmp_path, start)  # type: ignore[arg-type]
    again = pool.get(GROUP, "x86_64", tmp_path, start)  # type: ignore[arg-type]
    assert first is again and len(started) == 1
    assert first is not None and first.by_name == {"a": "plugged-0", "b": "plugged-1"}
    pool.get(GROUP, "aarch64", tmp_path, start)  # type: ignore[arg-type]
    assert len(started) == 2 and started[0].closed, "one live shared boot at a time"
    pool.close()
    assert started[1].closed and pool.live is None


def test_a_failed_shared_boot_sends_the_group_alone(tmp_path: Path) -> None:
    calls = []

    def start(devices: tuple[VhostUserDevice, ...], where: Path) -> FakeVM:
        calls.append(devices)
        raise QemuExited("qemu-system-x86_64: vhost-user-test-device-pci: aborted\nmore")

    pool = SharedPool()
    assert pool.get(GROUP, "x86_64", tmp_path, start) is None  # type: ignore[arg-type]
    assert pool.get(GROUP, "x86_64", tmp_path, start) is None  # type: ignore[arg-type]
    assert len(calls) == 1, "a broken group is not booted again"
    assert pool.broken[("g", "x86_64")].startswith("QemuExited: qemu-system-x86_64")


def test_group_names_its_devices() -> None:
    with pytest.raises(ConfigError, match="no device 'c'"):
        GROUP.device("c")
    with pytest.raises(ConfigError, match="no devices"):
        SharedGroup("empty", {})


CHILD_TEST = """
import os
import pytest

pytest_plugins = ["testbed.pytest_plugin"]

@pytest.mark.shared_boot("g")
@pytest.mark.parametrize("n", range(6))
def test_member(arch, n):
    with open(f"ran-{arch}-{n}", "w") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"])

@pytest.mark.parametrize("n", range(6))
def test_other(n):
    pass
"""


def test_xdist_keeps_each_group_on_one_worker(tmp_path: Path) -> None:
    """pytest 9.2 + pytest-xdist 3.8 silently distribute grouped tests one by one
    (pytest-xdist issue 1386): then every worker boots the group. Our pin keeps grouping."""
    (tmp_path / "test_child.py").write_text(CHILD_TEST)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q",
         "-p", "no:cacheprovider", "--junit-xml", str(tmp_path / "j.xml"), "test_child.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    workers: dict[str, set[str]] = {}
    for ran in tmp_path.glob("ran-*"):
        workers.setdefault(ran.name.split("-")[1], set()).add(ran.read_text())
    assert set(workers) == {"x86_64", "aarch64"}, out.stdout
    assert all(len(w) == 1 for w in workers.values()), f"a group split across workers: {workers}"
    # The '@group' suffix xdist adds for its scheduler is gone from what the run reports.
    junit = (tmp_path / "j.xml").read_text()
    assert "test_member[x86_64-0]" in junit and "@" not in junit, junit[:2000]
