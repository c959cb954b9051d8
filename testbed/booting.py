"""From a started GuestMachine to an SSH session: the one boot sequence, for a VM and for
the boot that makes a snapshot (testbed.snapshot).

A booted guest prints the image's ready line on its console once init is done; a guest
restored from a snapshot has printed it long ago, so only SSH is waited for. Either way the
wait for SSH stops at once, with QEMU's own error, when QEMU dies.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from testbed.guest.ssh import SSHSession
from testbed.images import GuestImage
from testbed.machine.guest import GuestMachine
from testbed.profile import phase

MIN_SSH_TIMEOUT = 5.0


def boot_to_ssh(
    machine: GuestMachine,
    image: GuestImage,
    timeout: float,
    *,
    restored: bool = False,
    timings: dict[str, float] | None = None,
) -> SSHSession:
    """Wait for ``machine`` (started) to come up and log in; ``timeout`` covers both the
    ready line and SSH (SSH always gets at least a few seconds). ``timings`` gets the
    seconds of each: "ready_line" (booted guests only) and "ssh"."""
    started = time.monotonic()
    if not restored:
        with phase("boot (to the ready line)"):
            machine.wait_console(re.escape(image.ready_line), timeout)
    ready = time.monotonic()
    remaining = max(timeout - (ready - started), MIN_SSH_TIMEOUT)
    with phase("SSH connect"):
        session = SSHSession.connect(
            "127.0.0.1",
            machine.ssh_port,
            Path(image.client_key),
            image.host_key_line,
            time.monotonic() + remaining,
            check_alive=machine.check_alive,
        )
    if timings is not None:
        if not restored:
            timings["ready_line"] = round(ready - started, 3)
        timings["ssh"] = round(time.monotonic() - ready, 3)
    return session


def reboot(machine: GuestMachine, image: GuestImage, timeout: float) -> SSHSession:
    """Reset the machine (QMP system_reset, as a power cycle: the guest boots again, its
    devices stay) and log in again once the guest's new ready line shows. The guest runs
    with -no-reboot, where a reset quits QEMU: the reboot action is set to reset first."""
    machine.qmp("set-action", reboot="reset")
    machine.skip_console()
    machine.qmp("system_reset")
    return boot_to_ssh(machine, image, timeout)
