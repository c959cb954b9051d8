"""Reconnect: QEMU's chardev with reconnect-ms, the back-end restarted mid-run.

What should hold: the device comes back and the guest sees the same regions; the
configuration (GET_SHMEM_CONFIG, answered once at realize) stays fixed for the life of the
device, so a back-end restarted with another layout does not move the guest's BAR 4.

What QEMU 11.1.3 does (measured, TCG, both arches):
- cold-plugged with reconnect-ms, realize fails: the chardev connects in the background and
  vhost-user-base's realize, unlike vhost-user-blk's, does not wait for it, so its first
  message with fds fails ("Failed to set msg fds.", "vhost_backend_init failed: Protocol
  error") and QEMU exits 1;
- hot-plugged (chardev-add with reconnect-ms, wait for the connection, device_add), the
  device works, but closing the back-end aborts QEMU before any reconnect, as it does
  without reconnect (memory_region_del_eventfd assertion).
Both are strict known bugs: a fixed QEMU turns them into XPASS, which fails the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from testbed.errors import QemuExited, WaitTimeout
from testbed.hotplug import Hotplug, PluggedDevice
from testbed.machine.cmdline import DEFAULT_VIRTIO_ID
from testbed.pytest_plugin import KnownQemuBug, known_qemu_bug, raise_if_known_crash
from testbed.verdict import compare_layout, find_test_devices, lspci_for
from testbed.vhost_user.backend import Backend
from testbed.vm import GuestVM

M = 1 << 20
LAYOUT = {0: 4 * M}
OTHER_LAYOUT = {0: 16 * M}
# Short enough that the device comes back quickly, long enough not to spin QEMU.
RECONNECT_MS = 200
RECONNECT_TIMEOUT = 20.0
POLL = 0.1
DEL_EVENTFD_ABORT = "memory_region_del_eventfd: Assertion"
REALIZE_FAILS = "Failed to set msg fds"


def guest_verdict(vm: GuestVM, bdf: str, layout: Mapping[int, int]) -> None:
    view = vm.inspect_pci()
    device = view.devices.get(bdf)
    assert device is not None, f"{bdf} missing from the guest's PCI view"
    verdict = compare_layout(layout, device, lspci_for(view, device), view.dmesg)
    assert verdict.ok, verdict.explain()


def wait_reconnected(vm: GuestVM, backend: Backend, timeout: float) -> float:
    """Until QEMU re-dialled ``backend`` and asked for the device setup again; seconds
    taken. QEMU dying meanwhile raises QemuExited at once, not a timeout."""
    assert vm.machine is not None
    started = time.monotonic()
    deadline = started + timeout
    while True:
        vm.machine.check_alive("while the back-end was restarted")
        try:
            backend.wait_connected(POLL)
            return time.monotonic() - started
        except WaitTimeout:
            if time.monotonic() > deadline:
                raise


def restart(
    vm: GuestVM, hp: Hotplug, device: PluggedDevice, layout: Mapping[int, int] | None
) -> Backend:
    """Restart ``device``'s back-end and wait for QEMU to come back to it; the known abort
    becomes KnownQemuBug."""
    try:
        backend = hp.restart_backend(device, layout)
        wait_reconnected(vm, backend, RECONNECT_TIMEOUT)
        vm.machine.check_alive("after the reconnect")  # type: ignore[union-attr]
        return backend
    except QemuExited as exc:
        raise_if_known_crash(exc, DEL_EVENTFD_ABORT)
        raise


@known_qemu_bug(
    "QEMU 11.1.3: a cold-plugged vhost-user-test-device with chardev reconnect-ms fails "
    f"realize ('{REALIZE_FAILS}.', 'vhost_backend_init failed: Protocol error'): realize "
    "does not wait for the background connect"
)
def test_coldplug_with_reconnect(boot: Callable[..., GuestVM]) -> None:
    try:
        vm = boot(regions=LAYOUT, reconnect_ms=RECONNECT_MS)
    except QemuExited as exc:
        if exc.returncode == 1 and REALIZE_FAILS in exc.stderr_tail:
            raise KnownQemuBug(f"realize failed: {exc.stderr_tail.strip()}") from exc
        raise
    (device,) = find_test_devices(vm.inspect_pci(), DEFAULT_VIRTIO_ID)
    guest_verdict(vm, device.bdf, LAYOUT)


@known_qemu_bug(
    "QEMU 11.1.3 aborts when the back-end of a device with chardev reconnect-ms closes: "
    "memory_region_del_eventfd: Assertion `i != mr->ioeventfd_nb' failed"
)
def test_backend_restart_same_layout(boot: Callable[..., GuestVM]) -> None:
    vm = boot(root_ports=1)
    with Hotplug(vm) as hp:
        device = hp.plug(LAYOUT, reconnect_ms=RECONNECT_MS)
        guest_verdict(vm, device.bdf, LAYOUT)
        backend = restart(vm, hp, device, None)
        # The device is back: QEMU set it up again on the new connection ...
        assert backend.requests_seen, "QEMU re-dialled but sent nothing"
        # ... and the guest still sees the same function with the same regions.
        assert device.bdf in hp.guest_test_devices()
        guest_verdict(vm, device.bdf, LAYOUT)
        assert vm.run("echo alive").stdout.strip() == b"alive"


@known_qemu_bug(
    "QEMU 11.1.3 aborts when the back-end of a device with chardev reconnect-ms closes: "
    "memory_region_del_eventfd: Assertion `i != mr->ioeventfd_nb' failed"
)
def test_backend_restart_other_layout_keeps_bar(boot: Callable[..., GuestVM]) -> None:
    """The layout is read once, at realize: a back-end that comes back with another one
    must not change what the guest sees (nor bring QEMU down)."""
    vm = boot(root_ports=1)
    with Hotplug(vm) as hp:
        device = hp.plug(LAYOUT, reconnect_ms=RECONNECT_MS)
        restart(vm, hp, device, OTHER_LAYOUT)
        assert vm.machine is not None
        assert vm.machine.qmp("query-status")["status"] == "running"
        assert device.bdf in hp.guest_test_devices()
        guest_verdict(vm, device.bdf, LAYOUT)
