"""virtio-fs DAX with a real guest driver: FUSE_SETUPMAPPING becomes SHMEM_MAP.

Our back-end serves virtio-fs (testbed/vhost_user/devices/fs.py) with a DAX cache window in
shared-memory region 0; the guest's virtio-fs driver (6.12 on both architectures, built
in; x86_64 also 6.1, a module) mounts it with ``-o dax=always``, asks for 2 MiB ranges of a
file with FUSE_SETUPMAPPING, which the back-end turns into SHMEM_MAP, and then reads and
writes the file through the window with no request per access; FUSE_REMOVEMAPPING becomes
SHMEM_UNMAP. Each guest comes from the shared snapshot with the device hot-plugged into a
root port (a 64 MiB window fits its 128 MiB reserve); files are checked against the host's
bytes, requests against the back-end's trace (vhost_user/trace.py: a queue entry is named
by its FUSE opcode, a channel entry is a SHMEM_MAP/UNMAP and QEMU's verdict).

What QEMU 11.1.3 does, recorded here: a map whose file range runs past EOF is refused
(Linux maps whole 2 MiB ranges, so the last range of a file whose size is not a multiple
of 2 MiB cannot be read through DAX: EIO); a read-only map of a file the back-end may only
read is refused (readonly-map-writable); a host truncate under a live mapping kills
QEMU with SIGBUS at the guest's next access past the new end
(shmem-map-truncated-file-sigbus). Known bugs are strict expected failures.

The scenarios marked foreign_backend also run against your own DAX-capable virtio-fs
back-end (``pytest scenarios --backend-cmd '... {socket} ... {share} ... {tag}'``): they
check the files and the SHMEM_MAP/UNMAP the relay saw, and the FUSE requests only when our
back-end serves (the relay cannot see inside the virtqueues).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.bugs import KnownBugSeen
from testbed.bugs.marks import known_bug
from testbed.device import ForeignCommand, VhostUserDevice
from testbed.errors import QemuExited
from testbed.host.backends import ensure_virtiofsd
from testbed.plugging import PluggedDevice
from testbed.pytest_plugin import Boot
from testbed.vhost_user.backend import DisconnectKind
from testbed.vhost_user.devices.fs import VirtioFsDevice
from testbed.vhost_user.devices.spec import VirtioFsSpec
from testbed.vhost_user.protocol import FLAG_NEED_REPLY
from testbed.vhost_user.relay import Relay
from testbed.vhost_user.trace import CHANNEL_FROM_QEMU, CHANNEL_TO_QEMU, QUEUE_REQUEST
from testbed.vm import GuestVM

M = 1 << 20
RANGE = 2 * M  # Linux's DAX unit (fs/fuse/dax.c FUSE_DAX_SZ)
TAG = "daxfs"
MOUNT = "/mnt/dax"
WINDOW = 64 * M  # region 0 = BAR 4, in the root port's 128M reserve
# Both kernels have FUSE_DAX on x86_64; arm64's 6.1 has none (no ZONE_DEVICE), so there
# is no DAX to test there.
KERNELS = {"6.12": ("x86_64", "aarch64"), "6.1": ("x86_64",)}
KERNEL = "6.12"  # the recordings of QEMU's behaviour: one kernel is enough
WAIT = 30.0
SETUPMAPPING_FLAG_WRITE = 2  # include/uapi/linux/fuse.h
MAP_RW = 1  # VHOST_USER_FLAG_MAP_RW


@dataclass
class DaxGuest:
    vm: GuestVM
    plugged: PluggedDevice
    share: Path

    @property
    def ours(self) -> VirtioFsDevice | None:
        """Our device model; None when the user's back-end serves (--backend-cmd)."""
        model = self.plugged.model
        return model if isinstance(model, VirtioFsDevice) else None

    def model(self) -> VirtioFsDevice:
        assert self.ours is not None, "our back-end's model"
        return self.ours

    def md5(self, name: str) -> str:
        """The guest's md5 of the file: a read through DAX."""
        out = self.vm.run(f"md5sum {MOUNT}/{name}", check=True, timeout=120).text
        return out.split()[0]

    def host_md5(self, name: str) -> str:
        return hashlib.md5((self.share / name).read_bytes()).hexdigest()

    def mount(self) -> None:
        self.vm.run(f"mkdir -p {MOUNT} && mount -t virtiofs {TAG} {MOUNT} -o dax=always",
                    check=True)  # fmt: skip

    def channel(self) -> list[tuple[dict[str, Any], str, int | None]]:
        """Every SHMEM_MAP/UNMAP the back-end sent, in order: (payload, name, QEMU's
        verdict; None when no answer was asked for)."""
        return channel_exchanges(self.plugged)

    def fuse(self, name: str) -> list[dict[str, Any]]:
        """The payloads of the FUSE requests named ``name`` (our back-end's trace only)."""
        return [e.payload or {} for e in self.plugged.endpoint.trace.entries()
                if e.direction == QUEUE_REQUEST and e.name == name]  # fmt: skip


def channel_exchanges(plugged: PluggedDevice) -> list[tuple[dict[str, Any], str, int | None]]:
    """Our back-end and the relay both trace the back-end channel: a request, then QEMU's
    u64 answer when the request asked for one (REPLY_ACK); one request at a time."""
    out: list[tuple[dict[str, Any], str, int | None]] = []
    waiting: tuple[dict[str, Any], str] | None = None
    for entry in plugged.endpoint.trace.entries():
        if entry.direction == CHANNEL_TO_QEMU and entry.name in ("SHMEM_MAP", "SHMEM_UNMAP"):
            if entry.flags & FLAG_NEED_REPLY:
                waiting = (entry.payload or {}, entry.name)
            else:
                out.append((entry.payload or {}, entry.name, None))
        elif entry.direction == CHANNEL_FROM_QEMU and waiting is not None:
            out.append((*waiting, int((entry.payload or {}).get("value", -1))))
            waiting = None
    return out


def live_by_trace(exchanges: list[tuple[dict[str, Any], str, int | None]]) -> dict[int, int]:
    """What QEMU has mapped after these exchanges (window offset -> length), and checks
    along the way: no map over a live mapping, unmaps of whole mappings only."""
    live: dict[int, int] = {}
    for payload, name, verdict in exchanges:
        if verdict not in (0, None):
            continue
        start, length = int(payload["shm_offset"]), int(payload["length"])
        if name == "SHMEM_MAP":
            assert all(o + n <= start or start + length <= o for o, n in live.items()), (
                f"SHMEM_MAP at {start:#x} over a live mapping: {live}"
            )
            live[start] = length
        else:
            assert live.pop(start, None) == length, f"SHMEM_UNMAP of {start:#x}+{length:#x}"
    return live


def dax_guest(
    boot: Boot,
    arch: str,
    kernel: str,
    share: Path,
    *,
    window: int = WINDOW,
    timeout: float = 1.0,
    mount: bool = True,
) -> DaxGuest:
    """A restored guest with ``kernel``, our virtio-fs device sharing ``share`` hot-plugged
    (through ``boot``, so that --backend-cmd stands in for our back-end), the driver bound
    and, with ``mount``, the tag mounted -o dax=always."""
    spec = VirtioFsSpec(share, TAG, window, timeout=timeout)
    vm = boot(VhostUserDevice.serving(spec), plug="hot", root_ports=1, kernel=kernel)
    vm.guest.load_modules("virtiofs")  # 6.1: a module; 6.12: built in, a no-op
    plugged = vm.plugged[0]
    assert plugged.bdf is not None
    if isinstance(plugged.endpoint, Relay) and plugged.endpoint.injecting:
        # Not a skip: DAX does not work with this back-end, and that is the answer.
        pytest.fail(
            "your back-end offers no VHOST_USER_PROTOCOL_F_SHMEM: the relay injected the "
            "window, which nothing will map; DAX needs a back-end that maps (SHMEM_MAP)",
            pytrace=False,
        )
    vm.guest.wait_virtio_driver(plugged.bdf, "virtiofs", timeout=WAIT)
    guest = DaxGuest(vm, plugged, share)
    if mount:
        guest.mount()
    return guest


def make_files(share: Path, sizes: dict[str, int]) -> None:
    for name, size in sizes.items():
        (share / name).parent.mkdir(parents=True, exist_ok=True)
        (share / name).write_bytes(os.urandom(size))


def qemu_running(vm: GuestVM) -> bool:
    assert vm.machine is not None
    return bool(vm.machine.qmp("query-status")["status"] == "running")


# --- DAX in use: reads, writes, reclaim (also against a user's back-end) ------------------


@pytest.mark.foreign_backend
@pytest.mark.kernel_arches(KERNELS)
def test_mount_and_read_through_dax(
    boot: Boot, arch: str, kernel: str, run_dir: Path, record_property: Callable[..., None]
) -> None:
    """mount -o dax=always succeeds, the kernel reports the mount and the file as DAX
    (statx STATX_ATTR_DAX), and a 4 MiB file read in the guest has the host's bytes,
    through two SETUPMAPPING -> SHMEM_MAP pairs and no READ request."""
    make_files(run_dir, {"data": 4 * M})
    g = dax_guest(boot, arch, kernel, run_dir)
    mounts = g.vm.run(f"grep ' {MOUNT} ' /proc/mounts", check=True).text
    assert f"{TAG} {MOUNT} virtiofs rw,relatime,dax=always" in mounts, mounts
    assert g.vm.run(f"daxio d {MOUNT}/data").returncode == 0, "statx: not a DAX file"
    assert g.md5("data") == g.host_md5("data")

    maps = [(p["fd_offset"], p["shm_offset"], p["length"], p["flags"], verdict)
            for p, name, verdict in g.channel() if name == "SHMEM_MAP"]  # fmt: skip
    record_property("shmem-maps", maps)
    assert sorted((f, n, v) for f, _, n, _, v in maps) == [(0, RANGE, 0), (RANGE, RANGE, 0)]
    if g.ours is not None:
        setups = [(p["foffset"], p["moffset"], p["length"]) for p in g.fuse("SETUPMAPPING")]
        assert setups == [(f, s, n) for f, s, n, _, _ in maps], "SETUPMAPPING != SHMEM_MAP"
        assert "READ" not in g.model().requests, "the data came by FUSE_READ, not DAX"


@pytest.mark.foreign_backend
@pytest.mark.kernel_arches(KERNELS)
def test_mmap_write_and_host_write(boot: Boot, arch: str, kernel: str, run_dir: Path) -> None:
    """A write through the guest's MAP_SHARED mapping (daxio: store, msync) is in the host
    file when it returns, through a writable map (SETUPMAPPING FLAG_WRITE -> SHMEM_MAP
    MAP_RW); a host write to a mapped range afterwards is what the guest reads there, with
    no request for that data (no READ, no SETUPMAPPING, no SHMEM_MAP)."""
    make_files(run_dir, {"data": 4 * M})
    g = dax_guest(boot, arch, kernel, run_dir)
    assert g.md5("data") == g.host_md5("data")  # both ranges mapped, read-only
    mine = os.urandom(16).hex().encode()
    g.vm.run(f"daxio w {MOUNT}/data {M} {len(mine)}", stdin=mine, check=True)
    assert (run_dir / "data").read_bytes()[M : M + len(mine)] == mine
    writable = [p for p, name, v in g.channel() if name == "SHMEM_MAP" and p["flags"] & MAP_RW]
    assert [(p["fd_offset"], p["length"]) for p in writable] == [(0, RANGE)]
    if g.ours is not None:
        assert any(p["flags"] & SETUPMAPPING_FLAG_WRITE for p in g.fuse("SETUPMAPPING"))

    before = (len(g.channel()), len(g.fuse("SETUPMAPPING")), len(g.fuse("READ")))
    theirs = os.urandom(16).hex().encode()
    with (run_dir / "data").open("r+b") as fh:
        fh.seek(3 * M)
        fh.write(theirs)
    seen = g.vm.run(f"daxio r {MOUNT}/data {3 * M} {len(theirs)}", check=True).stdout
    assert seen == theirs, "the host's write is not what the guest reads through DAX"
    after = (len(g.channel()), len(g.fuse("SETUPMAPPING")), len(g.fuse("READ")))
    assert after == before, f"a request for data already mapped: {before} -> {after}"


@pytest.mark.foreign_backend
@pytest.mark.kernel_arches(KERNELS)
def test_window_smaller_than_the_working_set(
    boot: Boot, arch: str, kernel: str, run_dir: Path, record_property: Callable[..., None]
) -> None:
    """An 8 MiB window (4 ranges) against 32 MiB of files read twice over: the driver
    reclaims ranges (REMOVEMAPPING -> SHMEM_UNMAP) to map others, the data stays right,
    QEMU never holds more than the window; at unmount every SHMEM_MAP has had its
    SHMEM_UNMAP and the back-end's host fds are back to their level before the mount."""
    names = [f"f{i}" for i in range(4)]
    make_files(run_dir, dict.fromkeys(names, 8 * M))
    g = dax_guest(boot, arch, kernel, run_dir, window=8 * M, mount=False)
    fds_before = g.ours.held_fds if g.ours is not None else 0
    g.mount()
    files = " ".join(f"{MOUNT}/{n}" for n in names)
    for _ in range(2):
        sums = g.vm.run(f"md5sum {files}", check=True, timeout=300).text.split()[0::2]
        assert sums == [g.host_md5(n) for n in names]
    exchanges = g.channel()
    unmaps = [p for p, name, _ in exchanges if name == "SHMEM_UNMAP"]
    assert unmaps, "no range was reclaimed with an 8 MiB window"
    assert all(v in (0, None) for _, _, v in exchanges), "QEMU refused a map or an unmap"
    record_property("shmem-maps-unmaps", (len(exchanges) - len(unmaps), len(unmaps)))
    for i in range(len(exchanges)):  # the window's size bounds what is live, always
        assert sum(live_by_trace(exchanges[: i + 1]).values()) <= 8 * M
    if g.ours is not None:
        removed = {(m, n) for p in g.fuse("REMOVEMAPPING") for m, n in p["ranges"]}
        assert {(p["shm_offset"], p["length"]) for p in unmaps} <= removed
        record_property("fuse", {k: v for k, v in g.model().requests.items() if "MAPPING" in k})

    g.vm.run(f"umount {MOUNT}", check=True)
    g.plugged.endpoint.wait_until(lambda: not live_by_trace(g.channel()), WAIT, "every unmap")
    if g.ours is not None:
        fs = g.model()
        g.plugged.endpoint.wait_until(lambda: fs.unsettled() == [], WAIT, "DESTROY settled")
        stats = fs.mapper_stats
        assert stats is not None and stats.maps_acked == stats.unmaps_acked
        assert stats.dropped_by_reset == 0 and fs.held_fds == fds_before == fs.idle_fds


# --- what QEMU 11.1.3 does with files the guest maps ---------------------------------------


def test_files_not_a_multiple_of_the_dax_range(
    boot: Boot, arch: str, run_dir: Path, record_property: Callable[..., None]
) -> None:
    """QEMU 11.1.3 refuses a SHMEM_MAP whose file range runs past EOF (verdict 1, "backing
    store size ... is too small"), and Linux maps whole 2 MiB ranges: a 3 MiB file reads
    right through its first range and fails with EIO in its last, a 10-byte file fails
    at once; the guest's kernel logs nothing, QEMU stays up."""
    make_files(run_dir, {"odd": 3 * M, "small": 10})
    g = dax_guest(boot, arch, KERNEL, run_dir)
    assert g.vm.machine is not None
    head = g.vm.run(f"dd if={MOUNT}/odd bs=1M count=2 2>/dev/null | md5sum", check=True).text
    assert head.split()[0] == hashlib.md5((run_dir / "odd").read_bytes()[:RANGE]).hexdigest()
    dmesg_before = g.vm.run("dmesg", check=True).text
    whole = g.vm.run(f"dd if={MOUNT}/odd of=/dev/null bs=1M")
    small = g.vm.run(f"cat {MOUNT}/small")
    record_property("guest", [(whole.returncode, whole.stderr.decode()),
                              (small.returncode, small.stderr.decode())])  # fmt: skip
    assert whole.returncode == 1 and "Input/output error" in whole.stderr.decode()
    assert small.returncode == 1 and "Input/output error" in small.stderr.decode()
    new_dmesg = g.vm.run("dmesg", check=True).text[len(dmesg_before) :]
    record_property("guest-dmesg", new_dmesg)
    assert new_dmesg.strip() == ""

    lines = [
        g.vm.machine.wait_stderr(
            rf"virtio-shmem-0-[0-9a-f]+ backing store size {size} is too small for 'size' "
            rf"option 0x200000 plus 'offset' option {offset}", WAIT
        )[0]
        for size, offset in (("0x300000", "0x200000"), ("0xa", "0x0"))
    ]  # fmt: skip
    record_property("qemu-stderr", lines)
    refused = [(p["fd_offset"], v) for p, name, v in g.channel() if name == "SHMEM_MAP" and v]
    record_property("refused-maps", refused)
    # The 3 MiB file's second range, then the small file's only one (asked for once or
    # more: each refusal is an EIO the guest may retry), all verdict 1, nothing else.
    assert refused[0] == (RANGE, 1) and set(refused[1:]) == {(0, 1)}, refused
    assert g.model().error_replies == {"SETUPMAPPING": len(refused)}
    assert qemu_running(g.vm)


@known_bug("readonly-map-writable")
def test_read_only_host_file(boot: Boot, arch: str, run_dir: Path) -> None:
    """A host file the back-end may only read (chmod 0444): our server maps its ranges
    from an O_RDONLY fd with a read-only SHMEM_MAP, which is what a file it may not write
    calls for. The guest should read the host's bytes; QEMU 11.1.3 refuses the map
    ("unable to map backing store for guest RAM: Permission denied") and the read fails
    with EIO."""
    make_files(run_dir, {"ro": 2 * M})
    (run_dir / "ro").chmod(0o444)
    g = dax_guest(boot, arch, KERNEL, run_dir)
    assert g.vm.machine is not None
    read = g.vm.run(f"md5sum {MOUNT}/ro")
    if read.returncode != 0 or read.text.split()[0] != g.host_md5("ro"):
        # Our server sends an O_RDONLY fd of the file for a read-only map (flags 0):
        # a refusal of one is readonly-map-writable's signature.
        refused = [v for p, name, v in g.channel()
                   if name == "SHMEM_MAP" and not p["flags"] & MAP_RW and v]  # fmt: skip
        said = (
            f"read-only SHMEM_MAP of a regular file opened read-only refused (u64 {refused[0]})"
            if refused
            else f"QEMU's verdicts {[v for _, _, v in g.channel()]}"
        )
        seen = (
            f"DAX read of a read-only host file: {read.stderr.decode().strip()!r}; {said}; "
            f"QEMU's stderr: {g.vm.machine.stderr_text().strip()}"
        )
        raise KnownBugSeen("readonly-map-writable", seen) if refused else AssertionError(seen)


@known_bug("shmem-map-truncated-file-sigbus")
def test_host_truncate_under_a_live_mapping(boot: Boot, arch: str, run_dir: Path) -> None:
    """A host process truncates a file to one page while the guest has its ranges mapped;
    the guest then reads its second page. That read should fail (or read zeros) and QEMU
    stay up; QEMU 11.1.3 dies with SIGBUS, nothing on stderr."""
    make_files(run_dir, {"data": 4 * M})
    g = dax_guest(boot, arch, KERNEL, run_dir)
    assert g.vm.machine is not None
    assert g.md5("data") == g.host_md5("data")
    os.truncate(run_dir / "data", 4096)
    read = g.vm.run(f"dd if={MOUNT}/data of=/dev/null bs=4096 skip=1 count=1", timeout=30)
    g.vm.machine.wait_exited(2.0)
    try:
        g.vm.machine.check_alive("after the guest read past the file's new end")
    except QemuExited as exc:
        # The guest's load faults in TCG's generated code: no site in QEMU's binary to
        # tell this SIGBUS from another, so the step is named (the registry's signature).
        if exc.returncode != -signal.SIGBUS or "crash site:" in exc.stderr_tail:
            raise
        raise QemuExited(
            f"{exc}\nSIGBUS, no site known, on a guest access past a host-truncated file's end",
            exc.returncode,
            exc.stderr_tail,
        ) from exc
    assert read.returncode in (0, 1), read
    assert qemu_running(g.vm)


def test_host_extend_under_a_live_mapping(boot: Boot, arch: str, run_dir: Path) -> None:
    """A host process appends 2 MiB to a file whose two ranges the guest has mapped: once
    the guest's attributes time out it sees the new size, reads the whole file right, and
    the new range is one more SHMEM_MAP; QEMU stays up."""
    make_files(run_dir, {"data": 4 * M})
    g = dax_guest(boot, arch, KERNEL, run_dir)
    assert g.md5("data") == g.host_md5("data")
    with (run_dir / "data").open("ab") as fh:
        fh.write(os.urandom(2 * M))
    g.vm.guest.wait_in_guest(f'[ "$(stat -c %s {MOUNT}/data)" = {6 * M} ]',
                             "the guest seeing the file grown", timeout=WAIT)  # fmt: skip
    assert g.md5("data") == g.host_md5("data")
    maps = [(p["fd_offset"], v) for p, name, v in g.channel() if name == "SHMEM_MAP"]
    assert sorted(maps) == [(0, 0), (RANGE, 0), (2 * RANGE, 0)]
    assert qemu_running(g.vm)


def test_host_remove_under_a_live_mapping(boot: Boot, arch: str, run_dir: Path) -> None:
    """A host process removes a file whose ranges the guest has mapped, while the guest
    still holds its name (a long entry timeout, so what follows does not race it): the
    guest reads the removed file's bytes through the live mappings with no request at all
    (QEMU maps the inode, not the name), QEMU stays up, and unmount unmaps it like any."""
    make_files(run_dir, {"data": 4 * M})
    g = dax_guest(boot, arch, KERNEL, run_dir, timeout=3600.0)
    was = g.host_md5("data")
    assert g.md5("data") == was
    fs = g.model()
    before = fs.requests
    (run_dir / "data").unlink()
    assert g.md5("data") == was
    grown = {k: n - before.get(k, 0) for k, n in fs.requests.items() if n != before.get(k, 0)}
    assert set(grown) <= {"OPEN", "FLUSH", "RELEASE"}, f"requests after the unlink: {grown}"
    assert qemu_running(g.vm)
    g.vm.run(f"umount {MOUNT}", check=True)
    g.plugged.endpoint.wait_until(lambda: fs.unsettled() == [], WAIT, "DESTROY settled")
    assert live_by_trace(g.channel()) == {}


# --- live mappings when the guest lets go ---------------------------------------------------


@pytest.mark.parametrize("how", ["unmount", "device-reset", "reboot", "unplug"])
def test_live_mappings_at(boot: Boot, arch: str, run_dir: Path, how: str) -> None:
    """Two ranges mapped, then the guest lets go: unmount (DESTROY: the back-end unmaps
    both), a device reset under the mounted share (unbind virtio-pci: QEMU drops the
    mappings itself, nothing is unmapped), a system reset, or hot-unplug. QEMU stays up,
    the back-end's account settles, and after a reset the share mounts and reads again.
    The registered unplug-live-mapping-del-subregion-abort (x86_64) does not show on
    unplug here: the guest's virtio-fs driver resets the device on its way out, before the
    eject, so no mapping is left for unrealize to trip on."""
    make_files(run_dir, {"data": 4 * M})
    g = dax_guest(boot, arch, KERNEL, run_dir)
    fs, vm = g.model(), g.vm
    assert vm.machine is not None and g.plugged.bdf is not None
    assert g.md5("data") == g.host_md5("data") and len(fs.live_mappings) == 2
    pci = "/sys/bus/pci/drivers/virtio-pci"
    if how == "unmount":
        vm.run(f"umount {MOUNT}", check=True)
    elif how == "device-reset":
        vm.run(f"echo {g.plugged.bdf} > {pci}/unbind", check=True)
    elif how == "reboot":
        vm.reboot()
    else:
        assert vm.unplug(g.plugged).disconnect is DisconnectKind.CLEAN
    g.plugged.endpoint.wait_until(lambda: fs.live_mappings == {}, WAIT, "no live mapping")
    stats = fs.mapper_stats
    assert stats is not None and stats.maps_acked == 2
    if how == "unmount":
        assert (stats.unmaps_acked, stats.dropped_by_reset) == (2, 0)
    else:
        assert (stats.unmaps_sent, stats.dropped_by_reset) == (0, 2)
    assert qemu_running(vm)
    if how in ("device-reset", "reboot"):
        if how == "device-reset":
            vm.run(f"echo {g.plugged.bdf} > {pci}/bind && umount {MOUNT}", check=True)
        vm.guest.wait_virtio_driver(g.plugged.bdf, "virtiofs", timeout=WAIT)
        g.mount()
        assert g.md5("data") == g.host_md5("data") and len(fs.live_mappings) == 2


# --- a file server we did not write --------------------------------------------------------


def _listing(vm: GuestVM) -> list[str]:
    """Each file under the mount: its path, size and md5, sorted by path."""
    script = (f"cd {MOUNT} && find . -type f | sort | while read -r f; do "
              'echo "$f $(stat -c %s "$f") $(md5sum < "$f" | cut -d" " -f1)"; done')  # fmt: skip
    return vm.run(script, check=True, timeout=120).text.splitlines()


def test_same_contents_as_virtiofsd(boot: Boot, arch: str, run_dir: Path) -> None:
    """The same share read through DAX from our back-end and without DAX from virtiofsd
    (Debian's 1.14, behind the relay, no window) lists the same files with the same
    sizes and bytes, which are the host's: a differential check against a file server we
    did not write. The files are 2 MiB multiples and an empty one (others cannot be read
    through DAX on QEMU 11.1.3, test_files_not_a_multiple_of_the_dax_range)."""
    sizes = {"a": 2 * M, "b": 6 * M, "sub/c": 4 * M, "sub/deeper/d": 2 * M, "empty": 0}
    make_files(run_dir, sizes)
    truth = sorted(f"./{n} {s} {hashlib.md5((run_dir / n).read_bytes()).hexdigest()}"
                   for n, s in sizes.items())  # fmt: skip
    g = dax_guest(boot, arch, KERNEL, run_dir)
    ours = _listing(g.vm)
    assert "READ" not in g.model().requests
    g.vm.run(f"umount {MOUNT}", check=True)
    g.vm.unplug(g.plugged)

    virtiofsd = [str(ensure_virtiofsd(log=lambda _: None)), "--socket-path={socket}",
                 f"--shared-dir={run_dir}", "--tag", TAG, "--sandbox", "none"]  # fmt: skip
    theirs = VhostUserDevice.of(None, backend=ForeignCommand.of(virtiofsd), num_vqs=2,
                                config_size=40)  # fmt: skip
    plugged = g.vm.plug(theirs)
    assert plugged.bdf is not None
    g.vm.guest.wait_virtio_driver(plugged.bdf, "virtiofs", timeout=WAIT)
    g.vm.run(f"mount -t virtiofs {TAG} {MOUNT}", check=True)
    assert "dax=" not in g.vm.run(f"grep ' {MOUNT} ' /proc/mounts", check=True).text
    assert ours == _listing(g.vm) == truth
    assert not re.search("SHMEM", " ".join(plugged.endpoint.trace.names()))
