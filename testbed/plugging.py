"""A VM's vhost-user devices: placed, served, plugged and unplugged, one path for all.

A scenario hands the VM a VhostUserDevice (testbed.device) that says what it is and what
serves it. Here it is placed (chardev id, socket in the VM's 0700 run dir, bus), its
back-end is started (testbed.serving: ours, or a foreign one behind the relay), and it
reaches QEMU one of two ways:

- cold: on the command line (``place_cold``), seen by the firmware and the kernel's first
  enumeration;
- hot: chardev-add -> device_add into a free root port -> wait, inside the guest (one SSH
  command looping on shell built-ins), until the new function has its driver (``plug``).
  ``unplug`` walks it back: device_del -> DEVICE_DELETED -> the guest no longer lists it ->
  chardev-remove -> the back-end sees the disconnect, is closed, and a foreign process is
  stopped and reaped (its socket and pid file removed).

Every back-end and relay that served the VM stays in ``served_by`` (restarted ones too):
their violations are the scenario's.

Timing facts this allows for (platform facts): q35 uses ACPI hot-plug, the guest sees a
device ~0.15 s after device_add and DEVICE_DELETED follows device_del in ~15 ms. aarch64
virt uses native PCIe hot-plug: device_del presses the slot's attention button, and Linux's
pciehp waits 5 s (the operator's chance to cancel) before it powers the slot off. A guest
that ejects the device itself powers the slot off at once (`echo 0 > .../power`, what an OS
does for a software eject): that is the default here (``guest_ejects=True``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.device import ShmemLayout, VhostUserDevice
from testbed.errors import ConfigError, QemuExited, StateError, TestbedError
from testbed.guest.session import GuestSession
from testbed.host.foreign import ForeignBackend
from testbed.machine.cmdline import root_port_id
from testbed.machine.guest import GuestMachine
from testbed.machine.profiles import profile_for
from testbed.profile import phase
from testbed.resource import Closeable
from testbed.serving import Serving, restart, serve
from testbed.vhost_user.backend import Backend, DisconnectKind
from testbed.vhost_user.endpoint import Endpoint
from testbed.vhost_user.relay import Relay

log = logging.getLogger(__name__)

SEE_TIMEOUT = 30.0
# aarch64 pciehp: ~6 s by design, under TCG and with another VM on the same 2 cores.
UNPLUG_TIMEOUT = 45.0
DISCONNECT_TIMEOUT = 15.0
CONNECT_TIMEOUT = 15.0


def slot_power_off_script(bdf: str) -> str:
    """A guest script powering off the hot-plug slot that holds ``bdf`` (pciehp's software
    eject); fails when no slot has that address."""
    address = bdf.rsplit(".", 1)[0]  # slots are named by domain:bus:device
    return (
        "for s in /sys/bus/pci/slots/*; do "
        f'if [ "$(cat "$s/address")" = {address} ]; then echo 0 > "$s/power"; exit 0; fi; '
        f'done; echo "no hot-plug slot at {address}" >&2; exit 1'
    )


@dataclass
class PluggedDevice:
    """One device in the VM and what serves it; ``bdf`` is where the guest sees it (for a
    cold-plugged one, None until it is looked up)."""

    serving: Serving
    bdf: str | None = None
    hot: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def device(self) -> VhostUserDevice:
        return self.serving.device

    @property
    def endpoint(self) -> Endpoint:
        return self.serving.endpoint

    @property
    def backend(self) -> Backend:
        return self.serving.backend

    @property
    def foreign(self) -> ForeignBackend | None:
        return self.serving.process

    @property
    def model(self) -> Any:
        """The device model our back-end serves (a PmemDevice, a VirtioFsDevice), if any."""
        return self.serving.model

    @property
    def relayed(self) -> bool:
        return isinstance(self.endpoint, Relay)


@dataclass(frozen=True)
class UnplugResult:
    disconnect: DisconnectKind
    """How the back-end (or the relay) saw QEMU go."""
    deleted_after: float
    """Seconds from device_del to DEVICE_DELETED."""
    gone_after: float
    """Seconds from device_del until the guest no longer listed the function."""


class Devices(Closeable):
    """The devices of one VM (its run dir holds their sockets, its logdir their traces)."""

    def __init__(self, arch: str, run_dir: Path, logdir: Path, root_ports: int) -> None:
        self.arch = arch
        self.run_dir = run_dir
        self.logdir = logdir
        self.root_ports = root_ports
        self.plugged: list[PluggedDevice] = []
        self._servings: list[Serving] = []
        self._hot_count = 0
        self._machine: GuestMachine | None = None
        self._guest: GuestSession | None = None

    def attach(self, machine: GuestMachine, guest: GuestSession) -> None:
        """QEMU and the guest are up: hot-plugging is possible from now on."""
        self._machine, self._guest = machine, guest

    @property
    def served_by(self) -> list[Endpoint]:
        return [serving.endpoint for serving in self._servings]

    def serve(self, device: VhostUserDevice, label: str) -> Serving:
        """Start what serves ``device`` (placed) and record it in ``served_by``; the caller
        plugs it (plug and place_cold do; a scenario that sequences QMP itself may too)."""
        serving = serve(device, logdir=self.logdir, run_dir=self.run_dir, label=label)
        self._servings.append(serving)
        return serving

    # -- cold ------------------------------------------------------------------------------

    def place_cold(self, devices: tuple[VhostUserDevice, ...]) -> tuple[VhostUserDevice, ...]:
        """Serve each device for QEMU's command line (root bus); returns them placed."""
        placed = []
        for index, device in enumerate(devices):
            name = f"vu{index}"
            at = device.placed(name, self.run_dir / f"{name}.sock", device.bus)
            serving = self.serve(at, "" if index == 0 else name)
            self.plugged.append(PluggedDevice(serving))
            placed.append(at)
        return tuple(placed)

    def found_at(self, slots: Mapping[str, int]) -> None:
        """Where the guest sees the cold-plugged devices: root-bus slot -> BDF (bus 0)."""
        for plugged in self.plugged:
            if not plugged.hot and plugged.device.id in slots:
                plugged.bdf = f"0000:00:{slots[plugged.device.id]:02x}.0"

    # -- hot -------------------------------------------------------------------------------

    def _attached(self, what: str) -> tuple[GuestMachine, GuestSession]:
        if self._machine is None or self._guest is None:
            raise StateError("not started", "started", what)
        return self._machine, self._guest

    def free_port(self) -> str:
        used = {p.device.bus for p in self.plugged if p.hot}
        for i in range(self.root_ports):
            if root_port_id(i) not in used:
                return root_port_id(i)
        raise ConfigError(
            f"all {self.root_ports} root ports are taken: unplug one or boot more (root_ports=N)"
        )

    @phase("plug")
    def plug(self, device: VhostUserDevice) -> PluggedDevice:
        """Serve ``device`` and hot-plug it into a free root port; returns once
        the guest lists the new function with its driver. A refused device_add raises
        QmpCommandFailed (chardev and back-end cleaned up); QEMU dying raises QemuExited.
        With ``reconnect_ms`` the chardev re-dials a restarted back-end."""
        machine, guest = self._attached("plug")
        if self.root_ports < 1:
            raise ConfigError("hot-plug needs empty root ports: boot with root_ports=N")
        self._hot_count += 1
        name = f"hp{self._hot_count}"
        placed = device.placed(name, self.run_dir / f"{name}.sock", self.free_port())
        serving = self.serve(placed, name)
        before = guest.functions()
        t0 = time.monotonic()
        machine.qmp("chardev-add", placed.chardev_add_arguments())
        try:
            if placed.reconnect_ms is not None:
                # A reconnecting chardev connects in the background, and QEMU 11.1.3's
                # realize does not wait for it: device_add fails ("Failed to set msg fds")
                # unless QEMU's main loop already has the connection. Our accept() is not
                # that proof (it can come first), query-chardev is.
                machine.wait_chardev(name, connected=True, timeout=CONNECT_TIMEOUT)
            machine.qmp("device_add", placed.device_add_arguments())
        except QemuExited:
            serving.close()
            raise
        except TestbedError:
            with contextlib.suppress(TestbedError):
                machine.qmp("chardev-remove", id=name)
            serving.close()
            raise
        added = time.monotonic()
        # Sysfs lists a hot-added function before the kernel has assigned its BARs; the
        # driver bind (virtio-pci) comes after that, so it is the sign the add finished.
        bdf = guest.wait_new_function(placed.virtio_id, sorted(before), SEE_TIMEOUT)
        plugged = PluggedDevice(serving, bdf, hot=True)
        plugged.timings = {
            "device_add": round(added - t0, 3),
            "guest_sees": round(time.monotonic() - added, 3),
        }
        self.plugged.append(plugged)
        log.info("plugged %s (%s) on %s as %s: %s", name, placed.layout.describe(), placed.bus,
                 bdf, plugged.timings)  # fmt: skip
        return plugged

    @phase("unplug")
    def unplug(
        self, plugged: PluggedDevice, *, timeout: float = UNPLUG_TIMEOUT, guest_ejects: bool = True
    ) -> UnplugResult:
        """device_del -> DEVICE_DELETED -> gone in the guest -> chardev-remove -> the
        back-end sees the disconnect (and is closed). Returns how and how fast. With
        native PCIe hot-plug (aarch64 virt) and ``guest_ejects``, the guest powers the slot
        off right after device_del instead of waiting out pciehp's 5 s."""
        machine, guest = self._attached("unplug")
        if plugged not in self.plugged or not plugged.hot or plugged.bdf is None:
            raise StateError("not hot-plugged", "plugged", f"unplug({plugged.device.id})")
        device = plugged.device
        t0 = time.monotonic()
        machine.qmp("device_del", id=device.device_id)
        if guest_ejects and profile_for(self.arch).native_pcie_hotplug:
            guest.run(slot_power_off_script(plugged.bdf), check=True, timeout=20)
        machine.wait_event("DEVICE_DELETED", timeout, match={"device": device.device_id})
        deleted = time.monotonic() - t0
        guest.wait_function_gone(plugged.bdf, max(2.0, t0 + timeout - time.monotonic()))
        gone = time.monotonic() - t0
        self.plugged.remove(plugged)
        machine.qmp("chardev-remove", id=device.id)
        kind = plugged.endpoint.wait_disconnected(DISCONNECT_TIMEOUT)
        plugged.serving.close()
        result = UnplugResult(kind, round(deleted, 3), round(gone, 3))
        plugged.timings.update(device_deleted=result.deleted_after, guest_gone=result.gone_after)
        log.info("unplugged %s: %s", plugged.device.id, result)
        return result

    def restart_backend(self, plugged: PluggedDevice, layout: ShmemLayout | None = None) -> Backend:
        """Close ``plugged``'s back-end (ours) and start a new one on the same socket,
        serving ``layout`` (None: the same). QEMU takes the hang-up in on its main loop,
        later: until it has, query-chardev still says connected, and a wait for "connected
        again" would pass at once, so that is waited for here. Only a chardev with
        reconnect_ms finds the new one."""
        machine, _ = self._attached("restart_backend")
        if plugged not in self.plugged:
            raise StateError("not plugged", "plugged", f"restart_backend({plugged.device.id})")
        plugged.serving.close()
        machine.wait_chardev(plugged.device.id, connected=False, timeout=DISCONNECT_TIMEOUT)
        plugged.serving = restart(plugged.serving, layout, logdir=self.logdir)
        self._servings.append(plugged.serving)
        return plugged.serving.backend

    def close(self) -> None:
        """Close every back-end (after QEMU is gone: the VM's teardown order). ``plugged``
        and ``served_by`` stay, for what a test asserts after the teardown."""
        for serving in reversed(self._servings):
            serving.close()
