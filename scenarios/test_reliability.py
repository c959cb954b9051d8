"""Reliability: a QEMU that dies under a scenario is reported as that (signal, stderr and
console tails), promptly, never as a hang or a generic timeout; a back-end that dies makes
QEMU's side fail cleanly. The device is hot-plugged into a guest restored from its
snapshot: how it arrived does not matter here."""

from __future__ import annotations

import os
import signal
import time

import pytest

from testbed.bugs.marks import known_bug
from testbed.device import VhostUserDevice
from testbed.errors import QemuExited
from testbed.pytest_plugin import Boot

M = 1 << 20
PROMPT = 10.0  # seconds: far below every timeout involved (SSH command 60 s, QMP 10 s)


@pytest.mark.foreign_backend
def test_qemu_killed_is_reported_as_killed(boot: Boot) -> None:
    vm = boot(VhostUserDevice.of({0: 4 * M}), plug="hot")
    assert vm.machine is not None and vm.machine.pid is not None
    assert vm.run("echo up").returncode == 0
    os.kill(vm.machine.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(QemuExited) as caught:
        vm.run("sleep 30", timeout=60)
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT, f"QEMU's death took {elapsed:.1f} s to be noticed"
    exc = caught.value
    assert exc.returncode == -signal.SIGKILL
    assert "SIGKILL" in str(exc), str(exc)
    assert exc.console_tail, "the last console lines are missing"
    # QMP says the same, at once.
    with pytest.raises(QemuExited, match="SIGKILL"):
        vm.machine.qmp("query-status")


@known_bug("backend-hangup-del-eventfd-abort")
def test_backend_death_leaves_qemu_running(boot: Boot) -> None:
    vm = boot(VhostUserDevice.of({0: 4 * M}), plug="hot")
    assert vm.machine is not None
    vm.backend.close()  # the back-end process dies: its end of the socket closes
    # QEMU takes the hang-up in on its main loop, in the background: the verdict waits
    # for that (query-chardev says disconnected), or it could pass before QEMU noticed.
    vm.machine.wait_chardev(vm.device.id, connected=False, timeout=15.0)
    # QEMU should notice the disconnect, keep running and keep the guest usable.
    assert vm.run("echo alive").stdout.strip() == b"alive"
    assert vm.machine.qmp("query-status")["status"] == "running"
