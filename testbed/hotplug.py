"""Hot-plug and hot-unplug of vhost-user test devices into a running GuestVM, over QMP.

Per device: a Backend listening on its own socket in the VM's 0700 run dir, then
chardev-add (socket client) -> device_add into a free root port -> wait, inside the guest
(one SSH command looping on shell built-ins over /sys/bus/pci/devices), until the new
function has its driver. Unplug walks it back: device_del -> DEVICE_DELETED -> wait until
the guest no longer lists it -> chardev-remove -> the back-end sees the connection end.
When a guest-side wait gives up, one full listing from the host says what the guest has.
`Hotplug` is a context manager; close() unplugs (best effort) and closes every back-end it
started, so nothing outlives the block, also on exceptions.

Timing facts this has to allow (platform facts): q35 uses ACPI hot-plug, the guest sees a
device ~0.15 s after device_add and DEVICE_DELETED follows device_del in ~15 ms. aarch64
virt uses native PCIe hot-plug: device_del presses the slot's attention button, and Linux's
pciehp waits 5 s (the operator's chance to cancel) before it powers the slot off, so
DEVICE_DELETED comes ~6 s later. A guest that ejects the device itself powers the slot off
at once (`echo 0 > /sys/bus/pci/slots/N/power`, what an OS does for a software eject): that
is the default here (`guest_ejects=True`); `guest_ejects=False` keeps the button path.

A back-end we did not write (``plug(backend_cmd=...)`` or ``plug(backend_socket=...)``) is
hot-plugged the way GuestVM cold-plugs one (testbed.host.foreign.start_behind_relay): the
foreign process, the relay in front of it (trace, conformance checks, the layout injected
when it has regions), then chardev-add/device_add with the device's virtio-id, queues and
config size. Unplug also closes the relay and stops and reaps the process (its socket and
pid file removed). Every back-end and relay Hotplug starts is recorded in the VM's
``served_by``: their violations fail a pytest scenario like a cold-plugged one's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from testbed.device import DEFAULT_VIRTIO_ID, ShmemLayout, VhostUserDevice
from testbed.errors import ConfigError, QemuExited, StateError, TestbedError, WaitTimeout
from testbed.guest.inspect import VIRTIO_MODERN_BASE, GuestPciDevice, inspect_pci
from testbed.guest.waits import SYSFS_PCI_DEVICES, wait_for_function_script, wait_gone_script
from testbed.host.foreign import ForeignBackend, start_behind_relay
from testbed.machine.cmdline import root_port_id
from testbed.machine.profiles import profile_for
from testbed.resource import Closeable
from testbed.vhost_user.backend import Backend, DisconnectKind
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.relay import Relay

if TYPE_CHECKING:
    from testbed.vm import GuestVM

log = logging.getLogger(__name__)

GUEST_POLL_INTERVAL = 0.1
SEE_TIMEOUT = 30.0
# aarch64 pciehp: ~6 s by design, under TCG and with another VM on the same 2 cores.
UNPLUG_TIMEOUT = 45.0
DISCONNECT_TIMEOUT = 15.0
CONNECT_TIMEOUT = 15.0
FOREIGN_READY_TIMEOUT = 15.0


def slot_power_off_script(bdf: str) -> str:
    """A guest script powering off the hot-plug slot that holds ``bdf`` (pciehp's software
    eject); fails when no slot has that address."""
    address = bdf.rsplit(".", 1)[0]  # slots are named by domain:bus:device
    return (
        "for s in /sys/bus/pci/slots/*; do "
        f'if [ "$(cat "$s/address")" = {address} ]; then echo 0 > "$s/power"; exit 0; fi; '
        f'done; echo "no hot-plug slot at {address}" >&2; exit 1'
    )


def _rest_of(started: float, timeout: float, at_least: float = 2.0) -> float:
    """What is left of a wait begun at ``started``: the host-side look that follows a
    guest-side wait that gave up must not wait the whole timeout a second time."""
    return max(at_least, started + timeout - time.monotonic())


# -- the driver ----------------------------------------------------------------------------


@dataclass
class PluggedDevice:
    """One hot-plugged device and its back-end; ``bdf`` is where the guest sees it.

    ``backend`` is our Backend, or the Relay in front of a foreign back-end; ``foreign``
    is then the process we started for it (None when it was already listening)."""

    spec: VhostUserDevice
    backend: Backend | Relay
    bdf: str
    timings: dict[str, float] = field(default_factory=dict)
    foreign: ForeignBackend | None = None

    @property
    def relayed(self) -> bool:
        """Its back-end is not ours: QEMU reaches it through the relay."""
        return isinstance(self.backend, Relay)

    @property
    def name(self) -> str:
        return self.spec.id

    @property
    def port(self) -> str:
        assert self.spec.bus is not None
        return self.spec.bus

    @property
    def layout(self) -> ShmemLayout:
        return self.spec.layout

    @property
    def device_id(self) -> str:
        return self.spec.device_id

    @property
    def chardev_id(self) -> str:
        return self.spec.id


@dataclass(frozen=True)
class UnplugResult:
    disconnect: DisconnectKind | None
    """How our back-end saw QEMU go; None for a relayed (foreign) back-end."""
    deleted_after: float
    """Seconds from device_del to DEVICE_DELETED."""
    gone_after: float
    """Seconds from device_del until the guest no longer listed the function."""


class Hotplug(Closeable):
    """Plugs test devices into ``vm``'s empty root ports (GuestVM(root_ports=N)).

    Use as a context manager; ``close()`` is idempotent.
    """

    def __init__(self, vm: GuestVM, *, virtio_id: int = DEFAULT_VIRTIO_ID) -> None:
        if vm.machine is None or vm.run_dir is None:
            raise StateError("not started", "started", "Hotplug needs a running GuestVM")
        if vm.root_ports < 1:
            raise ConfigError("hot-plug needs empty root ports: boot GuestVM(root_ports=N)")
        self.vm = vm
        self.machine = vm.machine
        self.run_dir: Path = vm.run_dir
        self.logdir: Path = vm.logdir or vm.run_dir
        self.virtio_id = virtio_id
        self.plugged: dict[str, PluggedDevice] = {}
        self._backends: list[Backend | Relay | ForeignBackend] = []
        self._count = 0
        self._closed = False

    # -- guest view ------------------------------------------------------------------------

    def guest_test_devices(self, virtio_id: int | None = None) -> dict[str, GuestPciDevice]:
        """The test devices (``virtio_id``, default this Hotplug's) the guest lists right
        now, by BDF (the one guest reader)."""
        view = inspect_pci(self.vm.ssh, lspci=False, dmesg=False, timeout=20)
        wanted = self.virtio_id if virtio_id is None else virtio_id
        return {d.bdf: d for d in view.virtio_devices_of(wanted)}

    def guest_functions(self) -> set[str]:
        """Every PCI function the guest lists (BDFs), cheaply: the shell's own echo, no
        exec, where a full listing costs ~40 execs under TCG."""
        out = self.vm.run(f"echo {SYSFS_PCI_DEVICES}/*", check=True, timeout=20).text
        return {word.rsplit("/", 1)[-1] for word in out.split() if "*" not in word}

    def _poll_guest(
        self,
        done: Callable[[dict[str, GuestPciDevice]], bool],
        timeout: float,
        what: str,
        virtio_id: int | None = None,
    ) -> dict[str, GuestPciDevice]:
        deadline = time.monotonic() + timeout
        while True:
            self.machine.check_alive(f"while waiting for {what}")
            current = self.guest_test_devices(virtio_id)
            if done(current):
                return current
            if time.monotonic() > deadline:
                raise WaitTimeout(
                    f"{what} did not happen within {timeout:.0f} s (guest lists test devices "
                    f"{sorted(current) or 'none'}); see the guest's dmesg in the artifacts"
                )
            time.sleep(GUEST_POLL_INTERVAL)  # poll interval of a deadline-bound wait

    def _wait_in_guest(self, script: str, timeout: float) -> str | None:
        """Run a guest-side wait (wait_for_function_script, wait_gone_script): what it
        printed when its condition held, else None; then the caller's _poll_guest has the
        last word (and gives the error message)."""
        try:
            result = self.vm.run(script, timeout=timeout + 10)
        except QemuExited:
            raise
        except (TestbedError, OSError) as exc:  # SSH trouble: the host-side poll decides
            log.warning("guest-side wait failed, polling from the host: %s", exc)
            return None
        return result.text.strip() if result.returncode == 0 else None

    def free_port(self) -> str:
        used = {d.port for d in self.plugged.values()}
        for i in range(self.vm.root_ports):
            if root_port_id(i) not in used:
                return root_port_id(i)
        raise ConfigError(f"all {self.vm.root_ports} root ports are taken: unplug one or boot more")

    # -- plug / unplug ---------------------------------------------------------------------

    def plug(
        self,
        layout: ShmemLayout | Mapping[int, int] | None = None,
        *,
        faults: Faults | None = None,
        port: str | None = None,
        see_timeout: float = SEE_TIMEOUT,
        allow_overfull: bool = False,
        reconnect_ms: int | None = None,
        backend_cmd: str | Sequence[str] | None = None,
        backend_socket: Path | str | None = None,
        virtio_id: int | None = None,
        num_vqs: int = 1,
        vq_size: int | None = None,
        config_size: int | None = None,
        backend_ready_timeout: float = FOREIGN_READY_TIMEOUT,
    ) -> PluggedDevice:
        """Start a back-end serving ``layout`` (None: no regions) and hot-plug a device for
        it (``virtio_id`` default this Hotplug's; ``num_vqs``, ``vq_size``, ``config_size``).

        ``backend_cmd`` ('PROGRAM ARGS... {socket}') or ``backend_socket`` (already
        listening): a back-end we did not write, reached through the relay, which injects
        ``layout`` when it has regions (as GuestVM does for a cold-plugged one).

        Returns once the guest lists the new function. A refused device_add raises
        QmpCommandFailed (chardev and back-end cleaned up); QEMU dying raises QemuExited.
        With ``reconnect_ms`` the chardev re-dials a restarted back-end (restart_backend).
        """
        if self._closed:
            raise StateError("closed", "open", "Hotplug.plug")
        foreign = backend_cmd is not None or backend_socket is not None
        if foreign and faults is not None:
            raise ConfigError("faults are our back-end's: a foreign back-end takes none")
        self._count += 1
        name = f"hp{self._count}"
        spec = VhostUserDevice(
            name,
            self.run_dir / f"{name}.sock",
            ShmemLayout.of(layout),
            virtio_id=self.virtio_id if virtio_id is None else virtio_id,
            num_vqs=num_vqs,
            vq_size=vq_size,
            config_size=config_size,
            bus=port or self.free_port(),
            reconnect_ms=reconnect_ms,
            allow_overfull=allow_overfull,
        )
        trace_path = self.logdir / f"{name}-vhost-user-trace.jsonl"
        backend: Backend | Relay
        started: ForeignBackend | None = None
        if foreign:
            backend, started = start_behind_relay(
                spec,
                command=backend_cmd,
                socket=None if backend_socket is None else Path(backend_socket),
                foreign_socket=self.run_dir / f"{name}-foreign.sock",
                logdir=self.logdir,
                trace_path=trace_path,
                name=f"{name}-backend",
                ready_timeout=backend_ready_timeout,
            )
            # The relay first: close() closes it before it stops the process behind it.
            self._backends.append(backend)
            if started is not None:
                self._backends.append(started)
        else:
            backend = Backend(
                spec.socket_path,
                spec.layout,
                trace_path=trace_path,
                faults=faults,
                num_queues=spec.num_vqs,
            )
            self._backends.append(backend)
            backend.start()
        # Kept past unplug: what QEMU did to it is the scenario's (the plugin checks it).
        self.vm.served_by.append(backend)

        def drop_backend() -> None:
            backend.close()
            if started is not None:
                started.close()

        before = self.guest_functions()
        t0 = time.monotonic()
        self.machine.qmp("chardev-add", spec.chardev_add_arguments())
        if reconnect_ms is not None:
            # A reconnecting chardev connects in the background, and QEMU 11.1.3's realize
            # does not wait for it: device_add fails ("Failed to set msg fds") unless QEMU's
            # main loop already has the connection. Our accept() is not that proof (it can
            # come first), query-chardev is. scenarios/test_reconnect.py provokes the race.
            self.machine.wait_chardev(name, connected=True, timeout=CONNECT_TIMEOUT)
        try:
            self.machine.qmp("device_add", spec.device_add_arguments())
        except QemuExited:
            drop_backend()
            raise
        except TestbedError:
            with contextlib.suppress(TestbedError):
                self.machine.qmp("chardev-remove", id=name)
            drop_backend()
            raise
        added = time.monotonic()
        # Sysfs lists a hot-added function before the kernel has assigned its BARs; the
        # driver bind (virtio-pci) comes after that, so it is the sign the add finished.
        script = wait_for_function_script(VIRTIO_MODERN_BASE + spec.virtio_id, sorted(before),
                                          see_timeout)  # fmt: skip
        bdf = self._wait_in_guest(script, see_timeout)
        if not bdf or bdf in before:  # the guest gave up: list everything, and explain
            seen = self._poll_guest(
                lambda now: any(f.driver for b, f in now.items() if b not in before),
                _rest_of(added, see_timeout),
                f"the guest adding {name} on {spec.bus} (function listed, driver bound)",
                spec.virtio_id,
            )
            (bdf,) = set(seen) - set(before)
        device = PluggedDevice(spec, backend, bdf, foreign=started)
        device.timings = {
            "device_add": round(added - t0, 3),
            "guest_sees": round(time.monotonic() - added, 3),
        }
        self.plugged[name] = device
        log.info("plugged %s (%s) on %s as %s: %s", name, spec.layout.describe(), spec.bus,
                 bdf, device.timings)  # fmt: skip
        return device

    def unplug(
        self,
        device: PluggedDevice,
        *,
        timeout: float = UNPLUG_TIMEOUT,
        disconnect_timeout: float = DISCONNECT_TIMEOUT,
        guest_ejects: bool = True,
    ) -> UnplugResult:
        """device_del -> DEVICE_DELETED -> gone in the guest -> chardev-remove -> the
        back-end sees the disconnect (and is closed). Returns how and how fast.

        With native PCIe hot-plug (aarch64 virt) and ``guest_ejects``, the guest powers
        the slot off right after device_del instead of waiting out pciehp's 5 s."""
        if self.plugged.get(device.name) is not device:
            raise StateError("not plugged", "plugged", f"Hotplug.unplug({device.name})")
        t0 = time.monotonic()
        self.machine.qmp("device_del", id=device.device_id)
        if guest_ejects and profile_for(self.vm.arch).native_pcie_hotplug:
            self.vm.run(slot_power_off_script(device.bdf), check=True, timeout=20)
        self.machine.wait_event("DEVICE_DELETED", timeout, match={"device": device.device_id})
        deleted = time.monotonic() - t0
        # Gone from sysfs is gone: the listing is only needed when the guest says no.
        waited_from = time.monotonic()
        if self._wait_in_guest(wait_gone_script(device.bdf, timeout), timeout) is None:
            self._poll_guest(
                lambda now: device.bdf not in now,
                _rest_of(waited_from, timeout),
                f"{device.bdf} leaving the guest",
                device.spec.virtio_id,
            )
        gone = time.monotonic() - t0
        del self.plugged[device.name]
        self.machine.qmp("chardev-remove", id=device.chardev_id)
        kind = device.backend.wait_disconnected(disconnect_timeout)
        device.backend.close()
        if device.foreign is not None:
            device.foreign.close()  # stopped and reaped; its socket and pid file removed
        result = UnplugResult(kind, round(deleted, 3), round(gone, 3))
        device.timings.update(device_deleted=result.deleted_after, guest_gone=result.gone_after)
        log.info("unplugged %s: %s", device.name, result)
        return result

    def restart_backend(
        self, device: PluggedDevice, layout: ShmemLayout | Mapping[int, int] | None = None
    ) -> Backend:
        """Close ``device``'s back-end and start a new one on the same socket, serving
        ``layout`` (default: the same). Only a chardev plugged with reconnect_ms finds it."""
        if self.plugged.get(device.name) is not device:
            raise StateError("not plugged", "plugged", f"Hotplug.restart_backend({device.name})")
        if not isinstance(device.backend, Backend):
            raise ConfigError("restart_backend serves our own back-end, not a foreign one")
        layout = device.layout if layout is None else ShmemLayout.of(layout)
        device.backend.close()
        # QEMU takes the hang-up in on its main loop, later: until it has, query-chardev
        # still says connected, and a wait for "connected again" would pass at once.
        self.machine.wait_chardev(device.chardev_id, connected=False, timeout=DISCONNECT_TIMEOUT)
        generation = sum(
            isinstance(b, Backend) and b.socket_path == device.backend.socket_path
            for b in self._backends
        )
        backend = Backend(
            device.backend.socket_path,
            layout,
            trace_path=self.logdir / f"{device.name}-{generation}-vhost-user-trace.jsonl",
            num_queues=device.spec.num_vqs,
        )
        self._backends.append(backend)
        self.vm.served_by.append(backend)
        backend.start()
        device.backend = backend
        return backend

    def close(self) -> None:
        """Unplug what is still plugged (best effort: QEMU may be gone), close back-ends."""
        if self._closed:
            return
        self._closed = True
        for device in list(self.plugged.values()):
            try:
                self.machine.check_alive("before unplugging during cleanup")
                self.unplug(device)
            except Exception as exc:  # QEMU dead or the guest stuck: teardown goes on
                log.warning("unplugging %s during cleanup: %s", device.name, exc)
        self.plugged.clear()
        for backend in self._backends:
            backend.close()
