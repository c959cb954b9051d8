"""GuestVM: a guest with its vhost-user devices, reachable over SSH; what scenarios use.

Composition only, in the order things come up: QEMU resolution and accelerator choice
(testbed.host), the guest image (testbed.images), the devices' back-ends
(testbed.plugging, testbed.serving), the QEMU driver (testbed.machine), restore from a
snapshot (testbed.snapshot), SSH (testbed.booting, testbed.guest). Every part is torn down
in reverse order on exit, also when start-up fails half-way, on Ctrl-C and on SIGTERM (the
CLI turns it into an exception; testbed.teardown defers signals until everything is down).

A scenario reads as its docstring: ``GuestVM(arch, device)`` or ``vm.plug(device)``,
``vm.unplug(plugged)``, ``vm.check_guest_sees(...)``. Artifacts (qemu-cmdline.txt,
console.log, qmp.log, qemu-stderr.log, the vhost-user traces, dmesg on failure,
qemu-by-hand.sh) go to ``artifacts_dir`` when given and stay there. Without one they live
in the private run dir and are copied under results/ only when the run fails.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from testbed import snapshot
from testbed.artifacts import keep_failed, write_by_hand
from testbed.booting import boot_to_ssh, reboot
from testbed.device import ShmemLayout, VhostUserDevice
from testbed.errors import ConfigError, StateError
from testbed.guest.inspect import GuestPciDevice, GuestPciView
from testbed.guest.session import GuestSession
from testbed.guest.ssh import CommandResult, SSHSession
from testbed.host.accel import AccelChoice, choose_accel
from testbed.host.qemu import QemuBinary, resolve_qemu
from testbed.images import GuestImage, ensure_image
from testbed.machine.cmdline import MachineConfig, root_slots
from testbed.machine.guest import GuestMachine
from testbed.machine.qemu import free_tcp_port
from testbed.paths import make_private_dir, remove_tree, sanitize
from testbed.plugging import Devices, PluggedDevice, UnplugResult
from testbed.profile import phase
from testbed.teardown import Teardown
from testbed.verdict import LayoutVerdict, verdict_for
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.endpoint import Endpoint

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GuestOptions:
    """How the guest machine looks, beyond its devices (MachineConfig's scenario-facing
    fields, same names)."""

    memory_mib: int = 512
    cpu: str | None = None
    phys_bits: int | None = None
    root_ports: int = 0
    root_port_pref64: int | None = None
    """None: MachineConfig's default (the window holds BAR 2 as well as BAR 4, and
    firmware aligns it only to 2 MiB: a 64M layout needs a 128M reserve)."""
    extra_kernel_args: tuple[str, ...] = ()
    extra_qemu_args: tuple[str, ...] = ()
    boot_timeout: float = 90.0
    kernel: str | None = None
    """The guest kernel by its recipe name ("6.1", "6.12"; None: the images' default)."""

    def machine(self, config: MachineConfig) -> MachineConfig:
        """``config`` with these options."""
        changes: dict[str, object] = {
            "memory_mib": self.memory_mib,
            "cpu": self.cpu,
            "phys_bits": self.phys_bits,
            "root_ports": self.root_ports,
            "extra_kernel_args": self.extra_kernel_args,
            "extra_args": self.extra_qemu_args,
        }
        if self.root_port_pref64 is not None:
            changes["root_port_pref64"] = self.root_port_pref64
        return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


class GuestVM:
    """A booted (or restored) guest with ``devices``; use as a context manager.

    ``plug``: "cold" puts the devices on QEMU's command line (the firmware's and the
    kernel's first enumeration); "hot" hot-plugs them into root ports once the guest is up,
    which lets the guest come from a snapshot. ``restore``: start from a saved, booted guest
    (testbed.snapshot; only without cold-plugged devices); None: whenever that holds.
    """

    def __init__(
        self,
        arch: str,
        *devices: VhostUserDevice,
        plug: str = "cold",
        options: GuestOptions | None = None,
        accel: str = "auto",
        qemu: str | None = None,
        artifacts_dir: Path | None = None,
        restore: bool | None = False,
    ) -> None:
        if plug not in ("cold", "hot"):
            raise ConfigError(f"plug={plug!r}: use 'cold' or 'hot'")
        if plug == "hot" and not devices:
            raise ConfigError("plug='hot' hot-plugs the devices given: give at least one")
        options = options or GuestOptions()
        if plug == "hot" and options.root_ports < len(devices):
            options = dataclasses.replace(options, root_ports=len(devices))
        cold = plug == "cold" and bool(devices)
        if restore and cold:
            raise ConfigError(
                "restore=True starts from a saved guest without devices: cold-plug needs "
                "a real boot (restore=False), or hot-plug the devices (plug='hot')"
            )
        self.arch = arch
        self.wanted = devices
        self.plug_mode = plug
        self.options = options
        self.restore = not cold if restore is None else restore
        self.accel_requested = accel
        self.qemu_explicit = qemu
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir else None
        self.snapshot: snapshot.Snapshot | None = None
        self.qemu_binary: QemuBinary | None = None
        self.accel: AccelChoice | None = None
        self.image: GuestImage | None = None
        self.run_dir: Path | None = None
        self.logdir: Path | None = None
        self.machine: GuestMachine | None = None
        self.devices: Devices | None = None
        self._guest: GuestSession | None = None
        self.timings: dict[str, float] = {}
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> GuestVM:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close(failed=exc is not None)

    def _step(self, name: str, started: float) -> float:
        now = time.monotonic()
        self.timings[name] = round(now - started, 3)
        return now

    def start(self) -> GuestVM:
        """Start QEMU and log in (``with GuestVM(...) as vm`` calls it). Once only: a second
        call would start a second QEMU and lose the first."""
        if self.machine is not None:
            raise StateError("started", "not started", "GuestVM.start (the with-block starts it)")
        with phase("VM start (harness)"):
            return self._start()

    def _start(self) -> GuestVM:
        t0 = t = time.monotonic()
        try:
            self.qemu_binary = resolve_qemu(self.arch, self.qemu_explicit)
            t = self._step("resolve_qemu", t)
            self.accel = choose_accel(self.accel_requested, self.arch, self.qemu_binary.path)
            log.info("accelerator %s: %s", self.accel.name, self.accel.reason)
            t = self._step("choose_accel", t)
            # Build progress to stderr: `testbed exec` keeps stdout for the guest's bytes.
            self.image = image = ensure_image(
                self.arch, log=lambda line: print(line, file=sys.stderr), kernel=self.options.kernel
            )
            t = self._step("ensure_image", t)
            self.run_dir = make_private_dir(f"vm-{sanitize(self.arch)}")
            self.logdir = self.artifacts_dir or self.run_dir / "logs"
            self.logdir.mkdir(parents=True, exist_ok=True)
            self.devices = Devices(self.arch, self.run_dir, self.logdir, self.options.root_ports)
            with phase("back-end start"):
                cold = self.devices.place_cold(self.wanted) if self.plug_mode == "cold" else ()
            t = self._step("backend", t)
            config = self.options.machine(
                MachineConfig(
                    arch=self.arch,
                    qemu=self.qemu_binary.path,
                    accel=self.accel.name,
                    kernel=Path(image.kernel),
                    initrd=Path(image.initrd) if image.initrd else None,
                    qmp_socket=self.run_dir / "qmp.sock",
                    console_log=self.logdir / "console.log",
                    ssh_port=free_tcp_port(),
                    kernel_cmdline=image.cmdline,
                    vhost_user_devices=cold,
                )
            )
            self.devices.found_at(root_slots(config))
            if self.restore:
                identity = snapshot.qemu_identity(
                    self.qemu_binary.path, self.qemu_binary.version_str
                )
                with phase("snapshot (made or waited for)"):
                    config, self.snapshot = snapshot.restored(
                        config, identity, image, self.options.boot_timeout
                    )
                (self.logdir / "restored-from.txt").write_text(
                    f"restored from {self.snapshot.state}\nthe boot that made it: "
                    f"{self.snapshot.logdir} (its console is the start of console.log here)\n"
                )
                t = self._step("snapshot", t)
            ours = [p.device for p in self.devices.plugged if p.device.ours]
            write_by_hand(config, self.run_dir, self.logdir, ours)
            load = snapshot.load if self.restore else None
            self.machine = GuestMachine(config, self.logdir, before_cont=load)
            with phase("restore" if self.restore else "QEMU start"):
                self.machine.start()
            t = self._step("restore" if self.restore else "qemu_start", t)
            ssh = boot_to_ssh(
                self.machine, image, self.options.boot_timeout, restored=self.restore,
                timings=self.timings,
            )  # fmt: skip
            t = time.monotonic()
            self._guest = GuestSession(ssh, self.machine.check_alive, self.machine.wait_exited)
            self.devices.attach(self.machine, self._guest)
            if self.plug_mode == "hot":
                for device in self.wanted:
                    self.devices.plug(device)
                self._step("hotplug", t)
            self.timings["total"] = round(time.monotonic() - t0, 3)
            log.info("guest %s up: %s", self.arch, self.timings)
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def close(self, failed: bool = False) -> None:
        """Idempotent teardown, in reverse order; keeps the evidence when ``failed``. A
        signal during it only cuts the graceful parts short (testbed.teardown)."""
        with Teardown(failed) as t, phase("teardown"):  # a signal from here on is deferred
            if self._closed:
                return
            self._closed = True
            log.info("tearing down %s guest (%s)", self.arch, "failed" if failed else "ok")
            if failed and self._guest is not None and self.logdir is not None:
                t.step("collecting dmesg", self._save_dmesg, graceful=True)
            if self._guest is not None:
                t.step("closing SSH", self._guest.ssh.close)
            if self.machine is not None:
                machine = self.machine
                if not t.failed:
                    t.step("QEMU shutdown", lambda: machine.shutdown(timeout=10), graceful=True)
                t.step("killing QEMU", machine.close)
            if self.devices is not None:
                t.step("closing the back-ends", self.devices.close)
            if t.failed and self.artifacts_dir is None and self.logdir is not None:
                logdir = self.logdir
                t.step("keeping artifacts", lambda: keep_failed(logdir, self.arch))
            if self.run_dir is not None:
                run_dir = self.run_dir
                t.step("removing the run dir", lambda: remove_tree(run_dir))

    def _save_dmesg(self) -> None:
        assert self.logdir is not None
        dmesg = self.guest.ssh.run("dmesg", timeout=10)
        (self.logdir / "guest-dmesg.txt").write_bytes(dmesg.stdout)

    def reboot(self) -> None:
        """Reset the machine and log in again once the guest is back (testbed.booting)."""
        assert self.machine is not None and self.image is not None
        self.guest.reconnected(reboot(self.machine, self.image, self.options.boot_timeout))

    # -- the guest -------------------------------------------------------------------------

    @property
    def guest(self) -> GuestSession:
        if self._guest is None:
            raise StateError("not started", "started", "GuestVM: use it as a context manager")
        return self._guest

    @property
    def ssh(self) -> SSHSession:
        return self.guest.ssh

    def run(
        self,
        command: str | Sequence[str],
        *,
        check: bool = False,
        timeout: float = 60.0,
        stdin: bytes | None = None,
    ) -> CommandResult:
        return self.guest.run(command, check=check, timeout=timeout, stdin=stdin)

    def inspect_pci(self) -> GuestPciView:
        return self.guest.inspect_pci()

    # -- devices ---------------------------------------------------------------------------

    def _devices(self) -> Devices:
        if self.devices is None:
            raise StateError("not started", "started", "GuestVM: use it as a context manager")
        return self.devices

    @property
    def plugged(self) -> list[PluggedDevice]:
        """The devices in the guest now, cold- and hot-plugged, in the order they came."""
        return list(self._devices().plugged)

    @property
    def served_by(self) -> list[Endpoint]:
        """Every back-end and relay that served this VM (restarted and unplugged ones too)."""
        return self.devices.served_by if self.devices is not None else []

    def _first(self) -> PluggedDevice:
        plugged = self._devices().plugged
        if not plugged:
            raise ConfigError("this GuestVM has no device")
        return plugged[0]

    @property
    def device(self) -> VhostUserDevice:
        """The first device (as placed: chardev id, socket, bus)."""
        return self._first().device

    @property
    def backend(self) -> Backend:
        """Our back-end behind the first device."""
        return self._first().backend

    def plug(self, device: VhostUserDevice) -> PluggedDevice:
        """Hot-plug ``device`` (testbed.plugging.Devices.plug)."""
        return self._devices().plug(device)

    def unplug(self, plugged: PluggedDevice, **options: object) -> UnplugResult:
        """Hot-unplug ``plugged`` (testbed.plugging.Devices.unplug)."""
        return self._devices().unplug(plugged, **options)  # type: ignore[arg-type]

    def restart_backend(
        self, plugged: PluggedDevice | None = None, layout: Mapping[int, int] | None = None
    ) -> Backend:
        """Restart the back-end of ``plugged`` (default: the first device), serving
        ``layout`` (default: the same)."""
        target = plugged or self._first()
        new = None if layout is None else ShmemLayout.of(layout)
        return self._devices().restart_backend(target, new)

    # -- the verdict -----------------------------------------------------------------------

    def test_device(self, virtio_id: int | None = None, bdf: str | None = None) -> GuestPciDevice:
        """Our device as the guest lists it (the first device's type by default)."""
        return self.guest.test_device(virtio_id or self.device.virtio_id, bdf)

    def verdict(
        self, expected: PluggedDevice | Mapping[int, int] | None = None, bdf: str | None = None
    ) -> LayoutVerdict:
        """How the guest's device differs from what was served: ``expected`` a plugged
        device (its layout, where the guest sees it), a layout, or None (the first
        device)."""
        if expected is None or isinstance(expected, PluggedDevice):
            target = expected or self._first()
            layout, virtio_id = target.device.layout, target.device.virtio_id
            bdf = bdf or target.bdf
        else:
            layout = ShmemLayout.of(expected)
            plugged = self._devices().plugged
            virtio_id = plugged[0].device.virtio_id if plugged else VhostUserDevice().virtio_id
        return verdict_for(self.inspect_pci(), layout, bdf, virtio_id)

    def check_guest_sees(
        self, expected: PluggedDevice | Mapping[int, int] | None = None, bdf: str | None = None
    ) -> None:
        """Fail (AssertionError, with the differences) unless the guest shows ``expected``."""
        with phase("check: the guest's view"):
            verdict = self.verdict(expected, bdf)
        if not verdict.ok:
            raise AssertionError(verdict.explain())
