"""Real boots through GuestVM (TCG here): a command runs, and nothing is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testbed.device import VhostUserDevice
from testbed.guest.pci import VirtioShmCap
from testbed.vm import GuestVM

pytestmark = pytest.mark.e2e

UNAME = {"x86_64": "x86_64", "aarch64": "aarch64"}


def qemu_children() -> list[int]:
    """Our child processes that are QEMU."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = stat.rsplit(")", 1)[1].split()[1]
        if ppid == me and b"qemu-system" in cmd:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_boot_run_and_leave_nothing_behind(arch: str, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    device = VhostUserDevice.of({0: 4 << 20, 1: 4 << 20})
    with GuestVM(arch, device, artifacts_dir=artifacts) as vm:
        result = vm.run("uname -m")
        assert result.returncode == 0
        assert result.stdout.decode().strip() == UNAME[arch]
        assert vm.run(["sh", "-c", "exit 7"]).returncode == 7
        view = vm.inspect_pci()
        (dev,) = view.find(0x1AF4, 0x105A)
        assert dev.function.virtio_shm_caps == [
            VirtioShmCap(0, 4, 0, 4 << 20),
            VirtioShmCap(1, 4, 4 << 20, 4 << 20),
        ]
        run_dir = vm.run_dir
        assert run_dir is not None and run_dir.is_dir()
        assert oct(run_dir.stat().st_mode & 0o777) == "0o700"
        assert qemu_children()
    assert not run_dir.exists()
    assert qemu_children() == []
    for name in ("qemu-cmdline.txt", "console.log", "qmp.log", "qemu-by-hand.sh"):
        assert (artifacts / name).is_file(), name
    assert '"event": "SHUTDOWN"' in (artifacts / "qmp.log").read_text()
