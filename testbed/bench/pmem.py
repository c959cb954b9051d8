"""The pmem figures of `testbed bench`: guest sequential write and read of /dev/pmem0.

Ours: virtio-pmem served by our back-end through vhost-user-test-device-pci, the range a
memfd SHMEM_MAPped over shared-memory region 0 (scenarios/test_pmem.py's device). The
anchor: QEMU's own virtio-pmem-pci on a memfd memory backend of the same size, which QEMU
maps itself; x86_64 only (QEMU 11.1's virt machine has no virtio-pmem-pci). Both
with the 6.12 guest kernel, the same transfer, timed inside the guest (its /proc/uptime,
10 ms: the transfer is made long enough for that) so that SSH's round trips are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.device import VhostUserDevice
from testbed.errors import ParseError
from testbed.guest.session import GuestSession
from testbed.vhost_user.devices.spec import PmemSpec
from testbed.vm import GuestOptions, GuestVM

MIB = 1 << 20
KERNEL = "6.12"
SIZE = 64 * MIB
CHUNK_MIB = 48
REPEAT = 4
"""Each pass writes (then reads) 48 MiB four times: ~0.2-1 s under TCG, far above the
guest clock's 10 ms."""
WAIT = 30.0

# Write, then read, the same 48 MiB REPEAT times, past the page cache (O_DIRECT; the write
# also fsyncs: a FLUSH on our device, a sync of the file for QEMU's); uptime around each.
GUEST_SCRIPT = (
    "u() { cut -d' ' -f1 /proc/uptime; }; a=$(u); "
    f"for i in $(seq {REPEAT}); do dd if=/dev/zero of=/dev/pmem0 bs=1M count={CHUNK_MIB} "
    "oflag=direct conv=fsync 2>/dev/null || exit 1; done; b=$(u); "
    f"for i in $(seq {REPEAT}); do dd if=/dev/pmem0 of=/dev/null bs=1M count={CHUNK_MIB} "
    'iflag=direct 2>/dev/null || exit 1; done; c=$(u); echo "$a $b $c"'
)


@dataclass(frozen=True)
class PmemRun:
    write_s: float
    read_s: float

    @property
    def megabytes(self) -> int:
        return CHUNK_MIB * REPEAT


def parse_times(text: str) -> PmemRun:
    """The guest script's three uptimes -> (write seconds, read seconds). Pure."""
    try:
        a, b, c = (float(word) for word in text.split())
    except ValueError as exc:
        raise ParseError(f"pmem bench: want three uptimes, got {text!r}") from exc
    return PmemRun(round(b - a, 3), round(c - b, 3))


def _transfer(guest: GuestSession) -> PmemRun:
    guest.load_modules("virtio_pmem")
    guest.wait_in_guest(
        f'[ "$(cat /sys/block/pmem0/size 2>/dev/null)" = {SIZE // 512} ]',
        f"/dev/pmem0 of {SIZE} bytes",
        timeout=WAIT,
    )
    return parse_times(guest.run(GUEST_SCRIPT, check=True, timeout=600).text)


def measure_ours(arch: str, accel: str) -> PmemRun:
    """Our back-end's pmem, hot-plugged into a restored guest."""
    options = GuestOptions(root_ports=1, kernel=KERNEL)
    with GuestVM(arch, options=options, accel=accel, restore=True) as vm:
        vm.plug(VhostUserDevice.serving(PmemSpec(SIZE)))
        return _transfer(vm.guest)


def measure_qemu_pmem(arch: str, accel: str) -> PmemRun:
    """QEMU's own virtio-pmem-pci over a memfd of the same size, as ours is (a file on disk
    would put the host's disk in QEMU's FLUSH and page faults, not QEMU's pmem path; booted:
    its device is on the command line, so no snapshot fits it)."""
    qemu_args = (
        # merged by QEMU into the VM's own -m; q35 refuses a memory device without maxmem
        "-m", "512M,maxmem=2G",
        "-object", f"memory-backend-memfd,id=pm,share=on,size={SIZE}",
        "-device", "virtio-pmem-pci,memdev=pm,id=pmem0",
    )  # fmt: skip
    options = GuestOptions(kernel=KERNEL, extra_qemu_args=qemu_args)
    with GuestVM(arch, options=options, accel=accel) as vm:
        return _transfer(vm.guest)
