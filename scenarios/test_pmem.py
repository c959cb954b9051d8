"""virtio-pmem on a shared-memory region: a real guest driver on memory our back-end maps.

Our back-end serves virtio-pmem (virtio-id 27) through vhost-user-test-device-pci: it offers
VIRTIO_PMEM_F_SHMEM_REGION, so the guest takes the persistent-memory range from
shared-memory region 0 (Linux 6.8+: the 6.12 guest kernel), and maps its backing, a memfd,
over all of region 0 with SHMEM_MAP once the device starts (DRIVER_OK). The guest's
virtio_pmem and nd_pmem drivers make /dev/pmem0 of exactly the region's size; FLUSH requests
on the device's queue reach the back-end, which answers after syncing its file.

Checked, on both architectures: bytes both ways at offsets across the region; a filesystem
on it with DAX (a write lands in the back-end's file with no writeback: there is no page
cache in between) and fsync reaching the back-end as FLUSH; what the driver sees of the
region before the back-end maps it; a device reset and a reboot with the filesystem in use
(the back-end maps again at each start, the data is still there); hot-unplug with and
without a mounted filesystem. Each guest comes from the shared snapshot and hot-plugs its
device.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.device import VhostUserDevice
from testbed.guest.datapath import looks_unmapped
from testbed.plugging import PluggedDevice
from testbed.pytest_plugin import Boot
from testbed.vhost_user.backend import DisconnectKind
from testbed.vhost_user.devices.pmem import PmemDevice
from testbed.vhost_user.devices.spec import PmemSpec
from testbed.vhost_user.trace import CHANNEL_FROM_QEMU, CHANNEL_TO_QEMU
from testbed.vm import GuestVM

M = 1 << 20
K = 1 << 10
KERNEL = "6.12"  # the first Debian kernel whose virtio_pmem knows VIRTIO_PMEM_F_SHMEM_REGION
SIZE = 64 * M  # region 0 = BAR 4, in the root port's 128M window
BLOCK = 4 * K
PMEM = "/dev/pmem0"
MOUNT = "/mnt/pm"
WAIT = 30.0
# Across the region: its first block, one in the middle, its last.
OFFSETS = (0, SIZE // 2 - BLOCK, SIZE - BLOCK)


def pmem_guest(boot: Boot, spec: PmemSpec | None = None) -> tuple[GuestVM, PluggedDevice]:
    """A restored 6.12 guest with the pmem drivers loaded and our pmem device hot-plugged:
    once the driver has made /dev/pmem0 of the region's size."""
    vm = boot(root_ports=1, kernel=KERNEL)
    vm.guest.load_modules("virtio_pmem", "ext4")
    plugged = vm.plug(VhostUserDevice.serving(spec or PmemSpec(SIZE)))
    wait_pmem0(vm, (spec or PmemSpec(SIZE)).size)
    return vm, plugged


def wait_pmem0(vm: GuestVM, size: int) -> None:
    """nd_pmem registers the disk a moment after virtio_pmem's probe (asynchronously)."""
    vm.guest.wait_in_guest(
        f'[ "$(cat /sys/block/pmem0/size 2>/dev/null)" = {size // 512} ]',
        f"{PMEM} of {size} bytes",
        timeout=WAIT,
        show="ls -l /dev/pmem* /sys/block; dmesg | tail -n 15",
    )


def model_of(plugged: PluggedDevice) -> PmemDevice:
    model = plugged.model
    assert isinstance(model, PmemDevice), model
    return model


def guest_read(vm: GuestVM, offset: int, length: int = BLOCK) -> bytes:
    """``length`` bytes of /dev/pmem0 at ``offset``, past the guest's page cache."""
    return vm.run(
        f"dd if={PMEM} bs={BLOCK} skip={offset // BLOCK} count={length // BLOCK} "
        "iflag=direct 2>/dev/null",
        check=True,
    ).stdout


def guest_write(vm: GuestVM, offset: int, data: bytes) -> None:
    """``data`` (a block) to /dev/pmem0 at ``offset``, past the page cache, synced."""
    vm.run(
        f"dd of={PMEM} bs={BLOCK} seek={offset // BLOCK} count=1 oflag=direct "
        "conv=notrunc,fsync 2>/dev/null",
        check=True,
        stdin=data,
    )


def flushes_in_trace(plugged: PluggedDevice) -> list[int]:
    """The ret of every FLUSH reply our back-end put in its trace, in order."""
    return [
        int((e.payload or {}).get("ret", -1))
        for e in plugged.endpoint.trace.entries()
        if e.is_queue and e.name == "FLUSH" and e.direction.endswith("device->driver")
    ]


def test_bytes_both_ways(boot: Boot, record_property: Callable[[str, object], None]) -> None:
    vm, plugged = pmem_guest(boot)
    model = model_of(plugged)
    assert model.map_results == [0], f"QEMU's verdicts on the SHMEM_MAP: {model.map_results}"
    # The map that backs the region: all of region 0, our memfd, read-write, acked 0.
    sent = [e for e in plugged.endpoint.trace.entries() if e.direction == CHANNEL_TO_QEMU]
    answered = [e for e in plugged.endpoint.trace.entries() if e.direction == CHANNEL_FROM_QEMU]
    assert [e.name for e in sent] == ["SHMEM_MAP"], sent
    assert sent[0].payload == {"shmid": 0, "fd_offset": 0, "shm_offset": 0, "length": SIZE,
                               "flags": 1}, sent[0].payload  # fmt: skip
    assert (answered[0].payload or {}).get("value") == 0
    for offset in OFFSETS:
        mine = os.urandom(BLOCK)
        guest_write(vm, offset, mine)
        assert model.read(offset, BLOCK) == mine, f"guest write at {offset:#x} not in the memfd"
        theirs = os.urandom(BLOCK)
        model.write(offset, theirs)
        assert guest_read(vm, offset) == theirs, f"back-end write at {offset:#x} not seen"


def test_dax_filesystem_and_flush(boot: Boot) -> None:
    """ext4 (busybox mke2fs, 4 KiB blocks) mounted -o dax=always: the kernel uses DAX, a
    file's bytes are in the back-end's memfd as soon as write(2) returns, and fsync reaches
    the back-end as FLUSH requests it answers 0 after syncing its file."""
    vm, plugged = pmem_guest(boot)
    model = model_of(plugged)
    vm.run(f"mke2fs -q -b 4096 {PMEM} && mkdir -p {MOUNT} && mount -o dax=always {PMEM} {MOUNT}",
           check=True)  # fmt: skip
    mounts = vm.run("grep pmem0 /proc/mounts; cat /sys/block/pmem0/queue/dax", check=True).text
    assert f"{PMEM} {MOUNT} ext4 rw,relatime,dax=always" in mounts, mounts
    assert mounts.split()[-1] == "1", f"pmem0 does not say it supports DAX: {mounts}"

    marker = f"written-through-dax-{os.urandom(8).hex()}".encode()
    vm.run(f"printf %s {marker.decode()} > {MOUNT}/no-sync", check=True)
    # DAX: no page cache, no writeback. Without DAX the bytes would wait for the flusher.
    assert marker in model.read(0, SIZE), "a DAX write did not land in the back-end's memfd"

    before = len(flushes_in_trace(plugged))
    # busybox sync FILE: fsync(2) of that file.
    vm.run(f"printf synced > {MOUNT}/synced && sync {MOUNT}/synced", check=True)
    flushes = flushes_in_trace(plugged)[before:]
    assert flushes and all(ret == 0 for ret in flushes), f"FLUSH replies after fsync: {flushes}"
    assert model.flushes >= len(flushes) and model.failed_flushes == 0

    vm.run(f"umount {MOUNT} && mount -o dax=always {PMEM} {MOUNT}", check=True)
    back = vm.run(f"cat {MOUNT}/no-sync {MOUNT}/synced", check=True).stdout
    assert back == marker + b"synced"


def test_driver_before_the_map(boot: Boot, record_property: Callable[[str, object], None]) -> None:
    """What the driver sees of region 0 before the back-end maps it. The device starts at
    DRIVER_OK, after the driver's probe: nd_pmem reads the namespace's info blocks while
    nothing is mapped. Here the back-end holds its map back until told, so the guest's view
    of an unmapped region can be read, then the map comes and the backing shows through."""
    vm, plugged = pmem_guest(boot, PmemSpec(SIZE, map_on_start=False))
    model = model_of(plugged)
    assert vm.machine is not None
    pattern = os.urandom(BLOCK)
    model.write(BLOCK, pattern)

    unmapped = guest_read(vm, BLOCK)
    record_property("unmapped-read", unmapped[:16].hex())
    assert looks_unmapped(unmapped), f"the unmapped region reads {unmapped[:16].hex()}"
    guest_write(vm, 2 * BLOCK, os.urandom(BLOCK))  # goes nowhere: nothing is mapped
    assert vm.machine.qmp("query-status")["status"] == "running"

    model.map_now()
    plugged.endpoint.wait_until(lambda: bool(model.map_results), WAIT, "the SHMEM_MAP's verdict")
    assert model.map_results == [0]
    assert guest_read(vm, BLOCK) == pattern, "after the map the guest does not see the backing"
    assert model.read(2 * BLOCK, BLOCK) == bytes(BLOCK), "the unmapped write reached the memfd"


def _mounted_with_file(vm: GuestVM) -> None:
    vm.run(f"mke2fs -q -b 4096 {PMEM} && mkdir -p {MOUNT} && mount -o dax=always {PMEM} {MOUNT} "
           f"&& echo kept > {MOUNT}/kept && sync {MOUNT}/kept", check=True)  # fmt: skip


def _remount_and_read(vm: GuestVM) -> bytes:
    wait_pmem0(vm, SIZE)
    vm.run(f"umount {MOUNT} 2>/dev/null; mkdir -p {MOUNT} && mount -o dax=always {PMEM} {MOUNT}",
           check=True)  # fmt: skip
    return vm.run(f"cat {MOUNT}/kept", check=True).stdout


def test_device_reset_with_pmem_in_use(boot: Boot) -> None:
    """The guest resets the device under a mounted DAX filesystem (unbind and bind
    virtio-pci: a virtio reset, then the driver starts it again). QEMU drops the mapping on
    the reset; the back-end maps again at the new start; the file is still there."""
    vm, plugged = pmem_guest(boot)
    model = model_of(plugged)
    _mounted_with_file(vm)
    pci = "/sys/bus/pci/drivers/virtio-pci"
    vm.run(f"echo {plugged.bdf} > {pci}/unbind && echo {plugged.bdf} > {pci}/bind", check=True)
    plugged.endpoint.wait_until(lambda: len(model.map_results) == 2, WAIT, "the second map")
    assert model.map_results == [0, 0] and model.started == 2
    assert _remount_and_read(vm) == b"kept\n"


def test_reboot_with_pmem_in_use(boot: Boot) -> None:
    """A system reset with the filesystem mounted: the guest boots again, finds the device
    where it was, the back-end maps again when the new driver starts it, the file is there."""
    vm, plugged = pmem_guest(boot)
    model = model_of(plugged)
    _mounted_with_file(vm)
    vm.reboot()
    vm.guest.load_modules("virtio_pmem", "ext4")
    plugged.endpoint.wait_until(lambda: len(model.map_results) == 2, WAIT, "the map after reboot")
    assert model.map_results == [0, 0]
    assert _remount_and_read(vm) == b"kept\n"


@pytest.mark.parametrize("mounted", [False, True], ids=["idle", "mounted"])
def test_unplug(boot: Boot, mounted: bool, run_dir: Path) -> None:
    """Hot-unplug of a pmem device whose region is mapped (always: the back-end maps at
    start), idle or under a mounted DAX filesystem: QEMU completes the unplug and stays up,
    the guest drops the device (a mounted filesystem is shut down), the back-end sees a
    clean disconnect, and the data written before is in the backing file, which outlives
    the device (a file on disk here, not a memfd)."""
    backing = run_dir / "pmem.img"
    backing.write_bytes(b"")
    vm, plugged = pmem_guest(boot, PmemSpec(SIZE, path=backing))
    assert vm.machine is not None
    if mounted:
        _mounted_with_file(vm)
    result = vm.unplug(plugged)
    assert result.disconnect is DisconnectKind.CLEAN, result
    assert vm.machine.qmp("query-status")["status"] == "running"
    assert vm.run("[ ! -e /sys/block/pmem0 ]").returncode == 0, "pmem0 outlived its device"
    if mounted:
        assert b"kept\n" in backing.read_bytes(), "the file's bytes are not in the backing"
