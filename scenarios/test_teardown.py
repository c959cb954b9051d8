"""Teardown: QMP quit ends QEMU with status 0, the back-end sees a clean disconnect, and
nothing is left -- no QEMU process, no socket, no run dir. Asserted, not assumed."""

from __future__ import annotations

import os

from testbed.device import VhostUserDevice
from testbed.pytest_plugin import Boot
from testbed.vhost_user.backend import DisconnectKind


def _alive(pid: int) -> bool:
    # A zombie still has /proc/<pid>; only a reaped process is really gone.
    return os.path.exists(f"/proc/{pid}")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()  # noqa: SIM115 - tiny read
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def test_quit_leaves_nothing(boot: Boot) -> None:
    vm = boot(VhostUserDevice.of({0: 4 << 20}))
    assert vm.machine is not None and vm.run_dir is not None
    pid = vm.machine.pid
    assert pid is not None and _alive(pid)
    socket_path = vm.backend.socket_path
    run_dir = vm.run_dir
    assert socket_path.exists() and run_dir.exists()

    vm.ssh.close()
    status = vm.machine.shutdown(timeout=30)
    assert status == 0, f"QEMU exited {status} on QMP quit"
    kind = vm.backend.wait_disconnected(timeout=10)
    assert kind is DisconnectKind.CLEAN, f"back-end saw a {kind.value} disconnect, want clean"

    vm.close()
    assert not _alive(pid), f"QEMU pid {pid} still exists after teardown"
    assert not socket_path.exists(), f"back-end socket {socket_path} left behind"
    assert not run_dir.exists(), f"run dir {run_dir} left behind"
    assert not vm.backend.running, "back-end thread still running"
    assert _children(os.getpid()) == [], "child processes left behind"
