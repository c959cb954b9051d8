"""The SHMEM_MAP/UNMAP data path as the guest sees it.

The two scenarios that look at region 0 as well as region 1 (nothing may leak into it; a
map there proves the channel still works) cold-plug a two-region device on the root bus;
the others restore a booted guest and hot-plug a device with region 1 alone (HOT_LAYOUT).

The guest drives the device to DRIVER_OK by hand (testbed.guest.datapath), the back-end
maps a memfd holding a random pattern at a non-zero offset of region 1, and bytes must
flow both ways through BAR 4. Refused requests (overlap, past the end, unknown shmid,
unknown unmap range) must get a non-zero verdict, leave the guest's view alone and keep
the back-end channel usable. Reset (device_status = 0) must drop every mapping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from testbed.bugs import KnownBugSeen
from testbed.bugs.marks import known_bug
from testbed.device import VhostUserDevice
from testbed.guest.datapath import GuestDevice, looks_unmapped
from testbed.pytest_plugin import Boot
from testbed.vhost_user.shmem import Memfd
from testbed.vm import GuestVM

M = 1 << 20
K = 1 << 10
LAYOUT = {0: 2 * M, 1: 2 * M}
SHMID = 1
# Region 1 alone, hot-plugged into a root port after a restore (boot once, restore many):
# behind a root port the config space holds one shared-memory capability, two abort QEMU
# 11.1.3 (shmem-caps-overflow-abort). For the scenarios that never look at region 0.
HOT_LAYOUT = {SHMID: 2 * M}
OFFSET = 1 * M  # non-zero: the mapping must land at region offset + shm_offset
LENGTH = 64 * K
PROBE = 64  # bytes the guest reads at each probed spot (devmem is one exec per word)
DRIVER_OK_TIMEOUT = 20.0


@dataclass
class Rig:
    vm: GuestVM
    guest: GuestDevice
    memfd: Memfd
    pattern: bytes

    def guest_sees(self, offset: int = 0) -> bytes:
        return self.guest.read(SHMID, OFFSET + offset, PROBE)


def start(vm: GuestVM) -> GuestDevice:
    guest = GuestDevice(vm.ssh, vm.test_device().bdf)
    guest.start()
    vm.backend.wait_driver_ok(DRIVER_OK_TIMEOUT)
    return guest


def rig(vm: GuestVM, memfd: Memfd) -> Rig:
    pattern = os.urandom(LENGTH)
    memfd.write(0, pattern)
    return Rig(vm, start(vm), memfd, pattern)


def test_map_read_write_unmap(boot: Boot) -> None:
    vm = boot(VhostUserDevice.of(LAYOUT))
    with Memfd(LENGTH) as memfd:
        r = rig(vm, memfd)
        assert looks_unmapped(r.guest_sees()), "the region is not empty before any map"
        assert vm.backend.map(SHMID, OFFSET, LENGTH, memfd.fileno()) == 0
        # Start and end of the mapping: both ends land where they should.
        assert r.guest_sees() == r.pattern[:PROBE]
        assert r.guest_sees(LENGTH - PROBE) == r.pattern[-PROBE:]
        # Nothing leaks into region 0 or before the offset.
        assert looks_unmapped(r.guest.read(0, OFFSET, PROBE))
        assert looks_unmapped(r.guest.read(SHMID, OFFSET - PROBE, PROBE))

        guest_bytes = os.urandom(PROBE)
        r.guest.write(SHMID, OFFSET + 4 * K, guest_bytes)
        assert memfd.read(4 * K, PROBE) == guest_bytes, "guest write did not reach the memfd"

        backend_bytes = os.urandom(PROBE)
        memfd.write(8 * K, backend_bytes)
        assert r.guest_sees(8 * K) == backend_bytes, "back-end write not seen by the guest"

        assert vm.backend.unmap(SHMID, OFFSET, LENGTH) == 0
        assert looks_unmapped(r.guest_sees()), "the pattern is still there after UNMAP"
        r.guest.write(SHMID, OFFSET, os.urandom(PROBE))
        assert memfd.read(0, PROBE) == r.pattern[:PROBE], "a write after UNMAP reached the file"


def test_refused_requests_change_nothing(boot: Boot) -> None:
    vm = boot(VhostUserDevice.of(LAYOUT))
    with Memfd(LENGTH) as memfd:
        r = rig(vm, memfd)
        assert vm.backend.map(SHMID, OFFSET, LENGTH, memfd.fileno()) == 0
        region = LAYOUT[SHMID]
        refused = {
            "overlapping map": lambda: vm.backend.map(
                SHMID, OFFSET + LENGTH // 2, LENGTH, memfd.fileno()
            ),
            "map past the region": lambda: vm.backend.map(
                SHMID, region - LENGTH // 2, LENGTH, memfd.fileno()
            ),
            "unknown shmid": lambda: vm.backend.map(7, 0, LENGTH, memfd.fileno()),
            "unmap of an unknown range": lambda: vm.backend.unmap(SHMID, 0, LENGTH),
        }
        for what, request in refused.items():
            verdict = request()
            assert verdict != 0, f"QEMU accepted the {what}"
            assert r.guest_sees() == r.pattern[:PROBE], f"the guest view changed after {what}"
            assert looks_unmapped(r.guest.read(SHMID, region - PROBE, PROBE)), what
        # The channel still works: a valid map elsewhere succeeds and is seen.
        assert vm.backend.map(0, 0, LENGTH, memfd.fileno()) == 0
        assert r.guest.read(0, 0, PROBE) == r.pattern[:PROBE]


@known_bug("readonly-map-writable")
def test_read_only_map_keeps_guest_writes_out(boot: Boot) -> None:
    vm = boot(VhostUserDevice.of(HOT_LAYOUT), plug="hot")
    with Memfd(LENGTH) as memfd:
        r = rig(vm, memfd)
        assert vm.backend.map(SHMID, OFFSET, LENGTH, memfd.fileno(), writable=False) == 0
        assert r.guest_sees() == r.pattern[:PROBE], "read-only map not readable by the guest"
        r.guest.write(SHMID, OFFSET, os.urandom(PROBE))
        if memfd.read(0, PROBE) != r.pattern[:PROBE]:
            raise KnownBugSeen(
                "readonly-map-writable",
                "a guest write through a read-only mapping reached the memfd",
            )


def test_reset_drops_mappings(boot: Boot) -> None:
    vm = boot(VhostUserDevice.of(HOT_LAYOUT), plug="hot")
    with Memfd(LENGTH) as memfd:
        r = rig(vm, memfd)
        assert vm.backend.map(SHMID, OFFSET, LENGTH, memfd.fileno()) == 0
        assert r.guest_sees() == r.pattern[:PROBE]
        r.guest.reset()
        assert looks_unmapped(r.guest_sees()), "a mapping survived the device reset"
        r.guest.start()
        vm.backend.wait_driver_ok(DRIVER_OK_TIMEOUT)
        assert vm.backend.map(SHMID, OFFSET, LENGTH, memfd.fileno()) == 0
        assert r.guest_sees() == r.pattern[:PROBE]
