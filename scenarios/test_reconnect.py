"""Reconnect: QEMU's chardev with reconnect-ms, the back-end restarted mid-run.

What should hold: the device comes back and the guest sees the same regions; the
configuration (GET_SHMEM_CONFIG, answered once at realize) stays fixed for the life of the
device, so a back-end restarted with another layout does not move the guest's BAR 4.

What QEMU 11.1.3 does (measured, TCG, both arches):
- cold-plugged with reconnect-ms, realize fails: the chardev connects in the background and
  vhost-user-base's realize, unlike vhost-user-blk's, does not wait for it, so its first
  message with fds fails ("Failed to set msg fds.", "vhost_backend_init failed: Protocol
  error") and QEMU exits 1;
- hot-plugged the same way (chardev-add with reconnect-ms, device_add before QEMU's main
  loop has the connection), device_add fails the same way; provoked on purpose by
  test_hotplug_before_chardev_connects. The other hot-plug scenarios wait until
  query-chardev reports the chardev connected, so they never meet that race by accident;
- hot-plugged after the connection, the device works, but closing the back-end aborts QEMU
  before any reconnect, as it does without reconnect (memory_region_del_eventfd assertion).
Both are known bugs (testbed/bugs/registry.toml): the day a QEMU build fixes one, its
scenarios fail with "did not show" until the registry says so.
"""

from __future__ import annotations

from collections.abc import Mapping

from testbed.bugs.marks import known_bug
from testbed.device import VhostUserDevice
from testbed.errors import QmpCommandFailed
from testbed.plugging import PluggedDevice
from testbed.pytest_plugin import Boot
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.protocol import Request
from testbed.vm import GuestVM

M = 1 << 20
LAYOUT = {0: 4 * M}
OTHER_LAYOUT = {0: 16 * M}
# Short enough that the device comes back quickly, long enough not to spin QEMU.
RECONNECT_MS = 200
RECONNECT_TIMEOUT = 20.0
# Far longer than the scenario: the chardev's next re-dial cannot come before device_add.
SLOW_RECONNECT_MS = 600_000
RECONNECTING = VhostUserDevice.of(LAYOUT, reconnect_ms=RECONNECT_MS)


def restart(vm: GuestVM, device: PluggedDevice, layout: Mapping[int, int] | None) -> Backend:
    """Restart ``device``'s back-end and wait, on QEMU's side, for the chardev to come back
    to it and for the device set-up to arrive again.

    Each step waits on its own condition: QEMU took the hang-up in (query-chardev says
    disconnected), the new back-end listens, QEMU re-dialled (query-chardev says connected),
    QEMU set the device up again (GET_FEATURES on the new connection)."""
    assert vm.machine is not None
    backend = vm.restart_backend(device, layout)
    vm.machine.wait_chardev(device.device.id, connected=True, timeout=RECONNECT_TIMEOUT)
    backend.wait_for_request(Request.GET_FEATURES, RECONNECT_TIMEOUT)
    vm.machine.check_alive("after the reconnect")
    return backend


def _test_devices(vm: GuestVM) -> set[str]:
    return set(vm.guest.test_devices(RECONNECTING.virtio_id))


@known_bug("reconnect-realize-no-wait")
def test_coldplug_with_reconnect(boot: Boot) -> None:
    vm = boot(RECONNECTING)
    vm.check_guest_sees(LAYOUT)


@known_bug("backend-hangup-del-eventfd-abort")
def test_backend_restart_same_layout(boot: Boot) -> None:
    vm = boot(root_ports=1)
    device = vm.plug(RECONNECTING)
    vm.check_guest_sees(device)
    backend = restart(vm, device, None)
    # The device is back: QEMU set it up again on the new connection ...
    assert backend.requests_seen, "QEMU re-dialled but sent nothing"
    # ... and the guest still sees the same function with the same regions.
    assert device.bdf in _test_devices(vm)
    vm.check_guest_sees(device)
    assert vm.run("echo alive").stdout.strip() == b"alive"


@known_bug("backend-hangup-del-eventfd-abort")
def test_backend_restart_other_layout_keeps_bar(boot: Boot) -> None:
    """The layout is read once, at realize: a back-end that comes back with another one
    must not change what the guest sees (nor bring QEMU down)."""
    vm = boot(root_ports=1)
    device = vm.plug(RECONNECTING)
    restart(vm, device, OTHER_LAYOUT)
    assert vm.machine is not None
    assert vm.machine.qmp("query-status")["status"] == "running"
    assert device.bdf in _test_devices(vm)
    vm.check_guest_sees(LAYOUT, device.bdf)


@known_bug("reconnect-realize-no-wait")
def test_hotplug_before_chardev_connects(boot: Boot) -> None:
    """The hot-plug face of the cold-plug bug, provoked on purpose rather than met by timing.

    The chardev's first connect fails (no back-end yet: QEMU says so on stderr), then the
    back-end starts listening and device_add comes long before the next re-dial. A correct
    QEMU waits for the connection in realize (the back-end is there to take it); 11.1.3
    fails device_add at once. The QMP steps are the scenario's own; the back-end is the
    VM's (its trace in the artifacts, its violations checked like any other)."""
    vm = boot(root_ports=1)
    assert vm.machine is not None and vm.run_dir is not None and vm.devices is not None
    late = VhostUserDevice.of(LAYOUT, reconnect_ms=SLOW_RECONNECT_MS)
    late = late.placed("late", vm.run_dir / "late.sock", "rp0")
    vm.machine.qmp("chardev-add", late.chardev_add_arguments())
    vm.machine.wait_stderr(r"Unable to connect character device late\b", RECONNECT_TIMEOUT)
    backend = vm.devices.serve(late, "late").backend
    assert not vm.machine.chardev_connected("late"), "connected before device_add"
    try:
        vm.machine.qmp("device_add", late.device_add_arguments())
    except QmpCommandFailed as exc:
        # QEMU's reason is on its stderr, not in the QMP error: keep both.
        raise QmpCommandFailed(
            exc.command,
            exc.arguments,
            exc.error_class,
            f"{exc.desc}; QEMU stderr: {vm.machine.stderr_text()[-500:]}",
        ) from exc
    # A fixed QEMU: realize waited, the device is up and serves the layout.
    backend.wait_for_request(Request.GET_SHMEM_CONFIG, RECONNECT_TIMEOUT)
    (bdf,) = _test_devices(vm)
    vm.check_guest_sees(LAYOUT, bdf)
