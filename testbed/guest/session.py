"""The guest as a scenario talks to it: commands over SSH, waits on what the guest does in
the background, and the guest's view of PCI.

``GuestSession`` wraps the SSH session (testbed.guest.ssh) with what the VM knows: a
command that fails because QEMU died under it raises QemuExited (exit status, stderr and
console tails), not an SSH error. Every wait is a guest-side loop (testbed.guest.waits):
one SSH round trip, with a deadline, and an error that says what it waited for and what
the guest showed at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from testbed.errors import QemuExited, TestbedError, WaitTimeout
from testbed.guest.inspect import VIRTIO_MODERN_BASE, GuestPciDevice, GuestPciView, inspect_pci
from testbed.guest.ssh import CommandResult, SSHSession
from testbed.guest.waits import (
    SYSFS_PCI_DEVICES,
    dmesg_condition,
    function_gone_condition,
    new_function_condition,
    virtio_driver_condition,
    virtio_driver_show,
    wait_script,
)
from testbed.images.extra import load_command
from testbed.profile import phase

# Seconds the SSH command of a guest-side wait may take beyond the wait's own timeout.
SSH_MARGIN = 15.0


class GuestSession:
    """Commands and waits in one guest. ``check_alive(doing)`` raises QemuExited when QEMU
    is gone; ``wait_exited(seconds)`` lets a dying QEMU be reaped first."""

    def __init__(
        self,
        ssh: SSHSession,
        check_alive: Callable[[str], None],
        wait_exited: Callable[[float], object],
    ) -> None:
        self.ssh = ssh
        self._check_alive = check_alive
        self._wait_exited = wait_exited

    def reconnected(self, ssh: SSHSession) -> None:
        """The guest rebooted: commands go over ``ssh`` from now on (the old one is closed)."""
        self.ssh.close()
        self.ssh = ssh

    def run(
        self,
        command: str | Sequence[str],
        *,
        check: bool = False,
        timeout: float = 60.0,
        stdin: bytes | None = None,
    ) -> CommandResult:
        """Run a command over SSH (``stdin``: bytes fed to it). If it fails because QEMU
        died under it, the error is QemuExited (exit status or signal, stderr and console
        tails), not an SSH error."""
        with phase("guest command"):
            return self._run(command, check, timeout, stdin)

    def _run(
        self, command: str | Sequence[str], check: bool, timeout: float, stdin: bytes | None
    ) -> CommandResult:
        """``run`` outside the "guest command" phase (a wait's command is the wait's)."""
        try:
            return self.ssh.run(command, check=check, timeout=timeout, stdin=stdin)
        except Exception as exc:
            self._wait_exited(1.0)  # the SSH EOF can beat QEMU's exit status
            try:
                self._check_alive("under a guest command")
            except QemuExited as dead:
                raise dead from exc
            raise

    def load_modules(
        self, *names: str, params: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> CommandResult:
        """insmod the image's optional modules (under /extra, with their dependencies, in
        order) for ``names`` (e.g. "virtiofs", "virtio_blk"), ``params`` by module name
        (e.g. {"virtiofs": "dyndbg=+p"}); see testbed.images.extra."""
        return self.run(load_command(names, dict(params or {})), check=True, timeout=timeout)

    # -- waits -------------------------------------------------------------------------------

    def wait_in_guest(
        self,
        condition: str,
        what: str,
        *,
        timeout: float = 30.0,
        show: str | None = None,
        then: str = "",
        kind: str = "a guest condition",
    ) -> str:
        """Until the guest-side ``condition`` (sh) holds, looked at every few tens of ms by
        a loop inside the guest (testbed.guest.waits): one SSH round trip. Returns what the
        script printed (the condition's or ``then``'s finding). On timeout, WaitTimeout
        naming ``what`` and what ``show`` (a guest command) prints at that moment. Its time
        is the profile's "wait: ``kind``"."""
        with phase(f"wait: {kind}"):
            script = wait_script(condition, timeout, then=then)
            result = self._run(script, False, timeout + SSH_MARGIN, None)
        if result.returncode == 0:
            return result.text
        seen = ""
        if show is not None:
            try:
                seen = self.run(show, timeout=20).text.strip()
            except TestbedError as exc:
                seen = f"(could not look: {exc})"
        tail = f"; last seen in the guest:\n{seen[-2000:]}" if seen else ""
        raise WaitTimeout(f"{what} did not happen in the guest within {timeout:.0f} s{tail}")

    def wait_dmesg(self, pattern: str, *, timeout: float = 30.0) -> list[str]:
        """Until the kernel log has a line matching ``pattern`` (grep -E); every match."""
        found = self.wait_in_guest(
            dmesg_condition(pattern),
            f"a kernel log line matching {pattern!r}",
            timeout=timeout,
            show="dmesg | tail -n 25",
            kind="a kernel log line",
        )
        return [line for line in found.splitlines() if line.strip()]

    def wait_virtio_driver(self, bdf: str, driver: str, *, timeout: float = 30.0) -> None:
        """Until the virtio device under PCI function ``bdf`` is bound to ``driver`` and its
        probe is over (DRIVER_OK): what it printed while probing is in dmesg by then."""
        self.wait_in_guest(
            virtio_driver_condition(bdf, driver),
            f"{driver} bound to the virtio device at {bdf}, probe done (DRIVER_OK)",
            timeout=timeout,
            show=virtio_driver_show(bdf),
            kind="a virtio driver's probe",
        )

    def wait_new_function(self, virtio_id: int, known: Sequence[str], timeout: float) -> str:
        """Until a PCI function not in ``known`` with ``virtio_id`` has a driver bound (a
        hot-added device's BARs are assigned by then: the bind comes after); its BDF."""
        found = self.wait_in_guest(
            new_function_condition(VIRTIO_MODERN_BASE + virtio_id, known, SYSFS_PCI_DEVICES),
            f"a new virtio-id {virtio_id} function with its driver bound",
            timeout=timeout,
            show=f"echo {SYSFS_PCI_DEVICES}/*",
            kind="the guest seeing a plugged device",
        )
        return found.strip()

    def wait_function_gone(self, bdf: str, timeout: float) -> None:
        self.wait_in_guest(
            function_gone_condition(bdf),
            f"{bdf} leaving the guest",
            timeout=timeout,
            show=f"echo {SYSFS_PCI_DEVICES}/*",
            kind="the guest dropping an unplugged device",
        )

    # -- the guest's view of PCI --------------------------------------------------------

    def inspect_pci(self) -> GuestPciView:
        with phase("guest PCI view"):
            return inspect_pci(self.ssh)

    def functions(self) -> set[str]:
        """Every PCI function the guest lists (BDFs), cheaply: the shell's own echo, no
        exec, where a full listing costs ~40 execs under TCG."""
        out = self.run(f"echo {SYSFS_PCI_DEVICES}/*", check=True, timeout=20).text
        return {word.rsplit("/", 1)[-1] for word in out.split() if "*" not in word}

    def _sysfs_view(self) -> GuestPciView:
        with phase("guest PCI view"):
            return inspect_pci(self.ssh, lspci=False, dmesg=False, timeout=20)

    def test_devices(self, virtio_id: int) -> dict[str, GuestPciDevice]:
        """The functions with ``virtio_id`` the guest lists right now, by BDF."""
        return {d.bdf: d for d in self._sysfs_view().virtio_devices_of(virtio_id)}

    def test_device(self, virtio_id: int, bdf: str | None = None) -> GuestPciDevice:
        """Our device as the guest lists it (GuestPciView.our_device chooses)."""
        return self._sysfs_view().our_device(virtio_id, bdf)
