"""Hot-plug and hot-unplug through QMP, and both at once with a live mapping.

Each cycle: chardev-add -> device_add into a free root port -> the guest sees exactly the
served layout -> device_del -> DEVICE_DELETED -> the guest no longer lists it ->
chardev-remove -> the back-end saw a clean disconnect. On aarch64 (native PCIe hot-plug)
the guest ejects the device itself after device_del (it powers the slot off, as an OS does
for a software eject), except in test_unplug_by_attention_button, which keeps the
attention-button path (pciehp's 5 s wait) covered.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from testbed.bugs.marks import known_bug
from testbed.bugs.signature import crash_site
from testbed.device import VhostUserDevice
from testbed.errors import QemuExited, QmpCommandFailed
from testbed.guest.datapath import GuestDevice, looks_unmapped
from testbed.host.kernel_log import segfault_site
from testbed.pytest_plugin import Boot
from testbed.vhost_user.backend import DisconnectKind
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.shmem import Memfd
from testbed.vm import GuestVM

M = 1 << 20
CYCLES = ({0: 4 * M}, {3: 16 * M}, {200: 64 * M})
# The 64M layout needs the root port's default 128M reserve: the window holds BAR 2 (16K)
# besides BAR 4, and firmware aligns it to 2 MiB only (a 64M reserve is too small, measured).
DRIVER_OK_TIMEOUT = 20.0


def test_three_cycles(boot: Boot, record_property: Callable[[str, object], None]) -> None:
    vm = boot(root_ports=1)
    for layout in CYCLES:
        device = vm.plug(VhostUserDevice.of(layout))
        vm.check_guest_sees(device)
        result = vm.unplug(device)
        record_property(f"timings-{device.device.layout.describe()}", device.timings)
        assert result.disconnect is DisconnectKind.CLEAN, result
        assert vm.guest.test_devices(device.device.virtio_id) == {}
        assert device.backend.requests_seen, "the back-end never heard from QEMU"
    assert vm.machine is not None
    vm.machine.qmp("query-status")  # QEMU still answers after three cycles


@pytest.mark.arches("aarch64")
def test_unplug_by_attention_button(
    boot: Boot, record_property: Callable[[str, object], None]
) -> None:
    """The unplug a guest goes through when nothing inside it ejects the device:
    device_del presses the root port's attention button, pciehp waits its 5 s and powers
    the slot off, QEMU completes the unplug. aarch64 only: q35's ACPI hot-plug has no
    button. (The other hot-plug scenarios let the guest eject the device itself.)"""
    vm = boot(root_ports=1)
    device = vm.plug(VhostUserDevice.of({0: 4 * M}))
    vm.check_guest_sees(device)
    result = vm.unplug(device, guest_ejects=False)
    record_property("timings-button", device.timings)
    assert result.disconnect is DisconnectKind.CLEAN, result
    assert vm.guest.test_devices(device.device.virtio_id) == {}


@known_bug("shmem-caps-overflow-abort")
def test_two_regions_behind_root_port(boot: Boot) -> None:
    vm = boot(root_ports=1)
    assert vm.machine is not None
    try:
        vm.plug(VhostUserDevice.of({0: 2 * M, 1: 2 * M}, allow_overfull=True))
    except QmpCommandFailed as exc:
        # A clean refusal is the right outcome (a fixed QEMU): it must still be there.
        assert exc.desc, exc
        assert vm.machine.qmp("query-status")["status"] == "running"
        return
    pytest.fail("QEMU accepted 2 regions behind a root port; the guest cannot see both caps")


def test_bad_backend_is_refused(boot: Boot) -> None:
    """A region size that is not a page multiple: device_add fails, QEMU stays alive."""
    vm = boot(root_ports=1)
    assert vm.machine is not None
    bad = Faults(shmem_raw_sizes={0: 4 * M + 512})
    with pytest.raises(QmpCommandFailed) as refused:
        vm.plug(VhostUserDevice.of({0: 4 * M}, faults=bad))
    assert "page" in refused.value.desc.lower(), refused.value.desc
    assert vm.machine.qmp("query-status")["status"] == "running"
    assert vm.guest.test_devices(VhostUserDevice().virtio_id) == {}
    # The port is usable afterwards.
    device = vm.plug(VhostUserDevice.of({0: 4 * M}))
    vm.check_guest_sees(device)


@known_bug("unplug-live-mapping-del-subregion-abort")
def test_unplug_with_live_mapping(boot: Boot) -> None:
    """Map, unplug while mapped: QEMU stays up, the back-end's memfd is intact; a new
    device on the same port starts without mappings. (The known bug is x86_64's, whose
    ACPI hot-plug aborts; aarch64's native PCIe hot-plug survives: the registry says so.)"""
    vm = boot(root_ports=1)
    assert vm.machine is not None
    layout = VhostUserDevice.of({0: 4 * M})
    offset, length = 1 * M, 64 * 1024
    pattern = os.urandom(length)
    with Memfd(length) as memfd:
        memfd.write(0, pattern)
        device = vm.plug(layout)
        assert device.bdf is not None
        guest = GuestDevice(vm.ssh, device.bdf)
        guest.start()
        device.backend.wait_driver_ok(DRIVER_OK_TIMEOUT)
        assert device.backend.map(0, offset, length, memfd.fileno()) == 0
        assert guest.read(0, offset, 64) == pattern[:64]

        result = vm.unplug(device)
        assert result.disconnect is DisconnectKind.CLEAN, result
        assert vm.machine.qmp("query-status")["status"] == "running"
        assert memfd.read(0, length) == pattern, "the memfd changed across the unplug"

        again = vm.plug(layout)
        assert again.bdf is not None
        fresh = GuestDevice(vm.ssh, again.bdf)
        fresh.start()
        again.backend.wait_driver_ok(DRIVER_OK_TIMEOUT)
        assert looks_unmapped(fresh.read(0, offset, 64)), "a new device starts with a mapping"
        assert again.backend.map(0, offset, length, memfd.fileno()) == 0
        assert fresh.read(0, offset, 64) == pattern[:64]


# QEMU 11.1.3 crashes only when it takes the hang-up in before its unrealize is done: a
# race it loses ~7 times in 8 here. Each attempt is a fresh device; QEMU must survive all.
HANGUP_ATTEMPTS = 4


@known_bug("unplug-channel-close-hangup-segfault")
def test_backend_hangs_up_when_channel_closes_during_unplug(boot: Boot) -> None:
    """device_del, and the back-end hangs up its main socket as soon as QEMU closes the
    back-end channel (QEMU's unrealize closes its channel end first; the relay did this
    before 9d0b7d2). A back-end is less trusted than QEMU: QEMU must survive, complete the
    unplug (DEVICE_DELETED) and the guest must drop the device, every time. QEMU 11.1.3
    segfaults (nothing on stderr): the judge needs the crash site from the host kernel log,
    so a segfault elsewhere does not pass for this bug."""
    vm = boot(root_ports=1)
    assert vm.machine is not None
    hangs_up = VhostUserDevice.of({0: 4 * M}, faults=Faults(hang_up_on_channel_close=True))
    for attempt in range(1, HANGUP_ATTEMPTS + 1):
        device = vm.plug(hangs_up)
        try:
            result = vm.unplug(device)
        except QemuExited as exc:
            site = _crash_site(vm, exc) or (
                "a site unknown (no line for its pid in the host kernel log: "
                "unreadable, or rate-limited)"
            )
            raise AssertionError(
                f"QEMU crashed at {site} during unplug {attempt}, after the back-end "
                "hung up on the back-end channel's close"
            ) from exc
        assert result.disconnect is DisconnectKind.LOCAL, "the fault never hung up"
        assert vm.machine.qmp("query-status")["status"] == "running"
        assert vm.guest.test_devices(hangs_up.virtio_id) == {}


def _crash_site(vm: GuestVM, exc: QemuExited) -> str:
    """Where QEMU died: its assertion, else the faulting instruction's offset in the binary
    from the host kernel log ("qemu-system-x86_64+0x..."; empty when dmesg is not
    readable), as the registry and testbed fuzz's triage name a crash site."""
    segfault = segfault_site(vm.machine.pid) if vm.machine is not None else {}
    return crash_site(exc.stderr_tail, segfault)
