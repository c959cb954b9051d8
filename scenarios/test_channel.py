"""The back-end channel as the guest sees it: requests at the wrong time, and payloads QEMU
must refuse.

The spec allows SHMEM_MAP/UNMAP once VHOST_USER_PROTOCOL_F_SHMEM is negotiated, with no
word about the device's status. So a SHMEM_MAP before DRIVER_OK, after the guest reset the
device, or after a system_reset must be mapped or refused, never crash QEMU. Our back-end
refuses to send one before DRIVER_OK, so these scenarios write the request on the channel
themselves (`send_raw`).

Malformed requests (a shmid with no region, an offset + length that overflows, a zero
length, an unmap of what was never mapped or already unmapped) must get a non-zero
verdict, leave the guest's view of BAR 4 alone and keep the channel usable: a valid map
afterwards, at a sparse shmid beyond nregions, is seen. A range that runs past the fd's end
is not malformed: the front-end "will mmap the given fd", and mmap(2) maps it (QEMU 11.1.3
refuses it: shmem-map-past-eof-refused).

Scenarios that use region 1 only restore a booted guest and hot-plug their device
(HOT_LAYOUT); the malformed-request one needs two regions and cold-plugs on the root bus.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from testbed.bugs import KnownBugSeen
from testbed.bugs.marks import known_bug
from testbed.device import VhostUserDevice
from testbed.errors import QemuExited, TestbedError
from testbed.guest.datapath import GuestDevice, looks_unmapped
from testbed.pytest_plugin import Boot
from testbed.vhost_user.protocol import U64, BackendRequest, Header, MMap
from testbed.vhost_user.shmem import Memfd
from testbed.vhost_user.trace import CHANNEL_FROM_QEMU, CHANNEL_TO_QEMU
from testbed.vm import GuestVM

M = 1 << 20
K = 1 << 10
U64_MAX = (1 << 64) - 1
LAYOUT = {0: 2 * M, 1: 2 * M}
SHMID = 1
# Region 1 alone, hot-plugged into a root port after a restore (boot once, restore many):
# behind a root port the config space holds one shared-memory capability, two abort QEMU
# 11.1.3 (shmem-caps-overflow-abort). For the scenarios that only use region 1.
HOT_LAYOUT = {SHMID: 2 * M}
OFFSET = 1 * M
LENGTH = 64 * K
PROBE = 64
DRIVER_OK_TIMEOUT = 20.0
CHANNEL_TIMEOUT = 10.0
MAP, UNMAP = BackendRequest.SHMEM_MAP, BackendRequest.SHMEM_UNMAP
STOPPED_BUG = "shmem-map-stopped-device-segfault"


def send_raw(
    vm: GuestVM,
    request: BackendRequest,
    payload: MMap,
    fds: Sequence[int] = (),
    *,
    stopped: bool = False,
) -> int:
    """Send ``request`` on the back-end channel without Backend's DRIVER_OK guard; QEMU's
    u64 verdict. QemuExited (exit status, stderr) when QEMU died instead of answering; a
    segfault's site comes from the kernel's log, and when the log has none (unreadable,
    rate-limited) a ``stopped`` device's scenario says where it died instead."""
    session = vm.backend.session
    assert session is not None and session.channel is not None, "no back-end channel"
    channel, body = session.channel, payload.pack()
    header = Header.make(request, len(body), need_reply=True)
    vm.backend.trace.record(CHANNEL_TO_QEMU, header, body, len(fds))
    try:
        channel.settimeout(CHANNEL_TIMEOUT)
        channel.send(header, body, fds)
        with channel.recv() as reply:
            vm.backend.trace.record(CHANNEL_FROM_QEMU, reply.header, reply.body, len(reply.fds))
            return U64.unpack(reply.body).value
    except (OSError, TestbedError):
        assert vm.machine is not None
        vm.machine.wait_exited(5.0)
        try:
            vm.machine.check_alive(f"after {request.name} {payload}")
        except QemuExited as exc:
            if not stopped or exc.returncode != -11 or "crash site:" in exc.stderr_tail:
                raise
            raise QemuExited(
                f"{exc}\nSIGSEGV, no site known, on {request.name} to a stopped device",
                exc.returncode,
                exc.stderr_tail,
            ) from exc
        raise


@dataclass
class Rig:
    vm: GuestVM
    guest: GuestDevice
    memfd: Memfd
    pattern: bytes

    def guest_sees(self, shmid: int = SHMID, offset: int = OFFSET) -> bytes:
        return self.guest.read(shmid, offset, PROBE)

    def start(self) -> None:
        self.guest.start()
        self.vm.backend.wait_driver_ok(DRIVER_OK_TIMEOUT)

    def check_map_outcome(self, verdict: int, what: str) -> None:
        """A map QEMU answered: mapped (0) and seen, or refused and not seen."""
        if verdict == 0:
            assert self.guest_sees() == self.pattern[:PROBE], f"{what}: mapped but not seen"
        else:
            assert looks_unmapped(self.guest_sees()), f"{what}: refused but the guest sees it"

    def check_channel_works(self, shmid: int = 0) -> None:
        """The device started, a valid map of region ``shmid`` is accepted and seen."""
        assert self.vm.backend.map(shmid, 0, LENGTH, self.memfd.fileno()) == 0
        assert self.guest_sees(shmid, 0) == self.pattern[:PROBE]


def rig(vm: GuestVM, memfd: Memfd, *, start: bool = True) -> Rig:
    """The guest's test device, detached from virtio-pci (and started unless ``start`` is
    False: then the vhost device stays stopped), and a memfd holding a random pattern."""
    pattern = os.urandom(LENGTH)
    memfd.write(0, pattern)
    r = Rig(vm, GuestDevice(vm.ssh, vm.test_device().bdf), memfd, pattern)
    if start:
        r.start()
    else:
        r.guest.detach()
    return r


def _map(shm_offset: int = OFFSET) -> MMap:
    """A valid read-write SHMEM_MAP of LENGTH bytes into region SHMID."""
    return MMap(SHMID, 0, shm_offset, LENGTH, 1)


@known_bug(STOPPED_BUG)
def test_map_before_driver_ok(boot: Boot) -> None:
    vm = boot(VhostUserDevice.of(HOT_LAYOUT), plug="hot")
    with Memfd(LENGTH) as memfd:
        r = rig(vm, memfd, start=False)
        session = vm.backend.session
        assert session is not None and not session.driver_ok, "the device is already started"
        assert looks_unmapped(r.guest_sees())
        verdict = send_raw(vm, MAP, _map(), [memfd.fileno()], stopped=True)
        r.check_map_outcome(verdict, "SHMEM_MAP before DRIVER_OK")
        r.start()
        r.check_channel_works(SHMID)


@known_bug(STOPPED_BUG)
def test_map_after_guest_reset(boot: Boot) -> None:
    vm = boot(VhostUserDevice.of(HOT_LAYOUT), plug="hot")
    with Memfd(LENGTH) as memfd:
        r = rig(vm, memfd)
        assert vm.backend.map(SHMID, OFFSET, LENGTH, memfd.fileno()) == 0
        assert r.guest_sees() == r.pattern[:PROBE]
        r.guest.reset()
        assert looks_unmapped(r.guest_sees()), "a mapping survived the device reset"
        verdict = send_raw(vm, MAP, _map(), [memfd.fileno()], stopped=True)
        r.check_map_outcome(verdict, "SHMEM_MAP after a device reset")
        r.start()
        r.check_channel_works(SHMID)


@known_bug(STOPPED_BUG)
def test_map_after_system_reset(boot: Boot) -> None:
    vm = boot(VhostUserDevice.of(HOT_LAYOUT), plug="hot")
    assert vm.machine is not None
    # The guest VM runs with -no-reboot: without this, system_reset makes QEMU quit. Set at
    # run time (not -action on the command line) so the guest comes from the shared snapshot.
    vm.machine.qmp("set-action", reboot="reset")
    with Memfd(LENGTH) as memfd:
        r = rig(vm, memfd)
        assert vm.backend.map(SHMID, OFFSET, LENGTH, memfd.fileno()) == 0
        assert r.guest_sees() == r.pattern[:PROBE]
        vm.machine.qmp("system_reset")
        vm.machine.wait_event("RESET", 10.0)
        # The guest reboots: only QEMU's answer and its survival are looked at.
        verdict = send_raw(vm, MAP, _map(0), [memfd.fileno()], stopped=True)
        assert isinstance(verdict, int)
        assert vm.machine.qmp("query-status")["status"] == "running"


@dataclass(frozen=True)
class Refused:
    request: BackendRequest
    payload: MMap
    fd: str = "memfd"
    """The fd sent with it: "memfd" (LENGTH bytes, the pattern) or ""."""


# Layout {0: 2M, 3: 2M}: nregions 2, shmid 3 is valid, 2 is a gap, 4 and 255 have no region.
SPARSE = {0: 2 * M, 3: 2 * M}
REFUSED = {
    "shmid in a gap": Refused(MAP, MMap(2, 0, 0, LENGTH, 1)),
    "shmid beyond every region": Refused(MAP, MMap(4, 0, 0, LENGTH, 1)),
    "shmid 255": Refused(MAP, MMap(255, 0, 0, LENGTH, 1)),
    "shm_offset + length overflows": Refused(MAP, MMap(3, 0, U64_MAX - 4095, 8 * K, 1)),
    "fd_offset + length overflows": Refused(MAP, MMap(3, U64_MAX - 4095, 0, 8 * K, 1)),
    "length 0": Refused(MAP, MMap(3, 0, 0, 0, 1)),
    "unmap of a range never mapped": Refused(UNMAP, MMap(3, 0, 0, LENGTH, 0), ""),
    "unmap of length 0": Refused(UNMAP, MMap(0, 0, 0, 0, 0), ""),
}


def test_malformed_requests_change_nothing(boot: Boot) -> None:
    vm = boot(VhostUserDevice.of(SPARSE))
    with Memfd(LENGTH) as memfd:
        r = rig(vm, memfd)
        # A live mapping in region 0 that no refused request may disturb.
        assert vm.backend.map(0, 0, LENGTH, memfd.fileno()) == 0
        fds = {"memfd": [memfd.fileno()], "": []}
        for what, bad in REFUSED.items():
            verdict = vm.backend.channel_request(bad.request, bad.payload.pack(), fds[bad.fd])
            assert verdict != 0, f"QEMU accepted the {what}"
            assert r.guest_sees(0, 0) == r.pattern[:PROBE], f"region 0 changed after {what}"
            assert looks_unmapped(r.guest_sees(3, 0)), f"region 3 changed after {what}"
        # Unmap twice: the second finds nothing to unmap.
        assert vm.backend.unmap(0, 0, LENGTH) == 0
        assert looks_unmapped(r.guest_sees(0, 0)), "the mapping is still there after UNMAP"
        assert vm.backend.unmap(0, 0, LENGTH) != 0, "QEMU accepted an unmap of an unmapped range"
        # The channel still works, and a shmid beyond nregions that has a region is fine.
        r.check_channel_works(3)


@known_bug("shmem-map-past-eof-refused")
def test_map_past_the_files_end_is_mapped(boot: Boot) -> None:
    """A 64 KiB memfd, the range asks for 128 KiB: as a virtio-fs DAX chunk of a small file
    does. The guest sees the file's bytes in the part the file backs."""
    vm = boot(VhostUserDevice.of(HOT_LAYOUT), plug="hot")
    with Memfd(LENGTH) as memfd:
        r = rig(vm, memfd)
        verdict = vm.backend.channel_request(
            MAP, MMap(SHMID, 0, OFFSET, 2 * LENGTH, 1).pack(), [memfd.fileno()]
        )
        if verdict != 0:
            raise KnownBugSeen(
                "shmem-map-past-eof-refused",
                f"SHMEM_MAP whose fd range runs past the file's end refused (u64 {verdict})",
            )
        assert r.guest_sees() == r.pattern[:PROBE], "mapped, but the guest does not see it"


@known_bug("shmem-map-unknown-flags-accepted")
def test_map_with_unknown_flags_is_refused(boot: Boot) -> None:
    vm = boot(VhostUserDevice.of(HOT_LAYOUT), plug="hot")
    with Memfd(LENGTH) as memfd:
        r = rig(vm, memfd)
        flags = 0xF0 | 1  # read-write plus bits the spec does not define
        verdict = vm.backend.channel_request(
            MAP, MMap(SHMID, 0, OFFSET, LENGTH, flags).pack(), [memfd.fileno()]
        )
        if verdict == 0 and r.guest_sees() == r.pattern[:PROBE]:
            raise KnownBugSeen(
                "shmem-map-unknown-flags-accepted",
                f"SHMEM_MAP ignores unknown flag bits ({flags:#x}): mapped, the guest sees it",
            )
        assert verdict != 0, "QEMU answered 0 to unknown flag bits"
        assert looks_unmapped(r.guest_sees()), "refused, yet the guest sees the mapping"
        r.check_channel_works(SHMID)
