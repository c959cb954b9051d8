"""Back-ends and guest drivers we did not write: virtiofsd and qemu-storage-daemon behind
the relay (testbed/vhost_user/relay.py), driven by the guest kernel's own virtio-fs and
virtio_blk drivers (optional modules, loaded only here).

virtiofsd (Debian 1.14) has no shared memory: the relay offers SHMEM and answers
GET_SHMEM_CONFIG with a 64 MiB region 0, the virtio-fs DAX cache window. A guest kernel with
FUSE_DAX (x86_64's 6.1, both arches' 6.12) finds it at probe and prints its length and
address, which must be the region and BAR 4 as our reader and lspci see them. arm64's 6.1
has no ZONE_DEVICE, hence no FUSE_DAX: its driver never looks for a cache window, so there
the scenario asserts what is true -- the share mounts, reads and writes, no cache line
shows. (virtiofsd serves no DAX: a `-o dax=always` mount would then fail every read with
ENOSYS; the DAX scenarios with our own back-end are in test_dax.py.)
Every message of both back-ends passes the relay's conformance checks (violations fail the
test, as for our own back-end), and teardown leaves no process, socket or pid file.

Both are also hot-plugged (GuestVM.plug of a device whose back-end is a ForeignCommand): the
driver is loaded first, so it probes the device as it arrives; unplug (device_del, the
guest's eject, chardev-remove) must stop and reap the back-end and leave neither its socket
nor its pid file nor the relay's socket behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.device import ForeignCommand, VhostUserDevice
from testbed.errors import HostCapabilityError
from testbed.guest.inspect import GuestPciDevice
from testbed.host.foreign import ForeignBackend
from testbed.plugging import PluggedDevice
from testbed.pytest_plugin import Boot
from testbed.vm import GuestVM

M = 1 << 20
CACHE = {0: 64 * M}  # shmid 0 is virtio-fs's cache (VIRTIO_FS_SHMCAP_ID_CACHE)
TAG = "testbedfs"
DISK_SIZE = 16 * M
BLOCK = 512
# virtio_fs_setup_dax reports the window with dev_dbg: +p turns those lines on.
VIRTIOFS_PARAMS = {"virtiofs": "dyndbg=+p"}
# "virtiofs virtio2: Cache len: 0x4000000 @ 0xf8000000", then the mapped window.
CACHE_LINE = re.compile(r"virtiofs \S+: Cache len: 0x([0-9a-f]+) @ 0x([0-9a-f]+)")
WINDOW_LINE = re.compile(
    r"virtio_fs_setup_dax: window kaddr \S+ phys_addr 0x([0-9a-f]+) len 0x([0-9a-f]+)"
)
# grep -E form of the window line, for the guest-side wait.
WINDOW_LINE_GREP = "virtio_fs_setup_dax: window kaddr"
# A 64M BAR 4 fits the root port's default 128M reserve (see scenarios/test_hotplug.py).
DRIVER_TIMEOUT = 30.0


def _host_tool(which: str) -> Path:
    from testbed.host import backends

    try:
        if which == "virtiofsd":
            return backends.ensure_virtiofsd(log=lambda _: None)
        return backends.ensure_storage_daemon(log=lambda _: None)
    except HostCapabilityError as exc:
        pytest.skip(f"host capability missing: {exc}")


def _assert_left_nothing(vm: GuestVM, foreign: ForeignBackend | None) -> None:
    """After close(): the back-end process reaped, its socket and pid file gone."""
    assert foreign is not None and foreign.pid is None and foreign.stopped is not None
    assert not foreign.pid_file.exists(), f"{foreign.pid_file} left behind"
    assert not foreign.socket.exists(), f"{foreign.socket} left behind"
    assert vm.run_dir is not None and not vm.run_dir.exists()


def _assert_unplug_left_nothing(vm: GuestVM, device: PluggedDevice, pid: int) -> None:
    """After unplug: the guest lists nothing, the back-end process is reaped, its socket,
    its pid file and the relay's socket are gone."""
    foreign = device.foreign
    assert foreign is not None and foreign.pid is None and foreign.stopped is not None
    assert not foreign.stopped.killed, "the back-end needed SIGKILL"
    assert not Path(f"/proc/{pid}").exists(), f"back-end {pid} still running or unreaped"
    assert not foreign.pid_file.exists(), f"{foreign.pid_file} left behind"
    assert not foreign.socket.exists(), f"{foreign.socket} left behind"
    relay_socket = device.device.socket_path
    assert not relay_socket.exists(), f"the relay's {relay_socket} left behind"
    assert vm.guest.test_devices(device.device.virtio_id) == {}
    assert device not in vm.plugged


def _virtiofsd_cmd(run_dir: Path) -> tuple[list[str], Path]:
    """virtiofsd's command template and its share (a private dir with one host file)."""
    virtiofsd = _host_tool("virtiofsd")
    share = run_dir / "share"
    share.mkdir()
    (share / "from-host.txt").write_text("written by the host\n")
    cmd = [
        str(virtiofsd),
        "--socket-path={socket}",
        f"--shared-dir={share}",
        "--tag",
        TAG,
        # No namespaces: the test bed may run unprivileged; the share is a private dir.
        "--sandbox",
        "none",
    ]
    return cmd, share


def _virtiofs(cmd: list[str]) -> VhostUserDevice:
    """virtiofsd's device with {0: 64M} injected by the relay. config_size 40: virtio-fs's
    config (tag[36], num_request_queues); 2 queues: hiprio and one request queue."""
    return VhostUserDevice.of(CACHE, backend=ForeignCommand.of(cmd), num_vqs=2, config_size=40)


def _blk(cmd: list[str]) -> VhostUserDevice:
    """virtio-blk: device id 2, one request queue, 60 bytes of config (virtio_blk_config),
    no regions (nothing injected)."""
    return VhostUserDevice.of(
        None, backend=ForeignCommand.of(cmd), virtio_id=2, num_vqs=1, config_size=60
    )


@dataclass(frozen=True)
class CacheProbe:
    """What the virtio-fs driver's probe of the device should have printed."""

    window: bool
    """The kernel has FUSE_DAX and looks for the cache window (all but arm64's 6.1)."""
    debug: bool
    """Its dev_dbg lines (the mapped window) were on when it probed: our dyndbg=+p reached
    it before the probe. Not so for a driver built into the kernel (6.12) that probed a
    cold-plugged device at boot, before any command ran."""

    @classmethod
    def of(cls, vm: GuestVM, *, hot: bool) -> CacheProbe:
        assert vm.image is not None
        no_dax = vm.arch == "aarch64" and vm.image.kernel_name == "6.1"
        built_in = vm.run("grep -qx virtiofs /extra/modules/virtiofs.order").returncode != 0
        return cls(window=not no_dax, debug=hot or not built_in)


def _virtiofs_probed(vm: GuestVM, bdf: str, probe: CacheProbe) -> str:
    """The guest's kernel log once virtio-fs has probed the device at ``bdf``: bound and
    DRIVER_OK (the probe is over), and, where it is logged, the driver's second line, the
    mapped window, which comes tens of ms after its first ("Cache len"). Waited for, not
    read once: a read right after the bind found the first line without the second."""
    vm.guest.wait_virtio_driver(bdf, "virtiofs", timeout=DRIVER_TIMEOUT)
    if probe.window and probe.debug:
        vm.guest.wait_dmesg(WINDOW_LINE_GREP, timeout=DRIVER_TIMEOUT)
    return vm.run("dmesg", check=True).stdout.decode(errors="replace")


def _assert_cache_window(
    vm: GuestVM, device: GuestPciDevice, dmesg: str, probe: CacheProbe
) -> None:
    """Region 0 at BAR 4 as our reader and lspci see it; where the kernel has FUSE_DAX the
    virtio-fs driver's own "Cache len ... @ ..." (and, when logged, its mapped window) are
    that same range. ``dmesg`` is read after _virtiofs_probed: the absence of the lines is
    then final."""
    bar4 = device.resources.bar(4)
    assert bar4 is not None and bar4.size == CACHE[0]
    view = vm.inspect_pci()
    assert view.lspci is not None
    region = view.lspci[device.bdf].regions[4]
    assert (region.address, region.size) == (bar4.start, bar4.size)
    vm.check_guest_sees(CACHE, device.bdf)

    found = CACHE_LINE.search(dmesg)
    if not probe.window:
        # arm64 6.1: no FUSE_DAX, the driver never looks for the window.
        assert found is None and "No cache capability" not in dmesg
        assert WINDOW_LINE.search(dmesg) is None
        return
    assert found, f"no 'Cache len' line from virtio_fs_setup_dax in dmesg:\n{dmesg[-2000:]}"
    length, address = int(found.group(1), 16), int(found.group(2), 16)
    # Region 0 is the only one, so it starts at BAR 4's base.
    assert (length, address) == (CACHE[0], bar4.start)
    assert (length, address) == (region.size, region.address)
    if probe.debug:
        window = WINDOW_LINE.search(dmesg)
        assert window, "the driver found the cache but did not map it (no 'window' line)"
        assert (int(window.group(1), 16), int(window.group(2), 16)) == (address, length)


def _assert_share_works(vm: GuestVM, share: Path) -> None:
    """The guest mounts the tag, reads the host's file, writes one the host reads."""
    vm.run(f"mkdir -p /mnt/fs && mount -t virtiofs {TAG} /mnt/fs", check=True)
    read = vm.run("cat /mnt/fs/from-host.txt", check=True).stdout
    assert read == b"written by the host\n"
    vm.run("echo written by the guest > /mnt/fs/from-guest.txt && sync", check=True)
    assert (share / "from-guest.txt").read_text() == "written by the guest\n"
    vm.run("umount /mnt/fs", check=True)


def _storage_daemon_cmd(run_dir: Path) -> tuple[list[str], Path]:
    """qemu-storage-daemon's command template exporting a 16M file (one host block set)."""
    qsd = _host_tool("qemu-storage-daemon")
    disk = run_dir / "disk.img"
    with disk.open("wb") as fh:
        fh.truncate(DISK_SIZE)
        fh.seek(200 * BLOCK)
        fh.write(b"TESTBED-HOST-BLOCK")
    cmd = [
        str(qsd),
        "--blockdev",
        f"driver=file,node-name=f0,filename={disk}",
        "--export",
        "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={socket},writable=on",
    ]
    return cmd, disk


def _assert_disk_works(vm: GuestVM, disk: Path) -> None:
    """The guest's vda is the file: its size, a host block read, a guest block written."""
    sectors = int(vm.run("cat /sys/block/vda/size", check=True).stdout)
    assert sectors * BLOCK == DISK_SIZE

    got = vm.run("dd if=/dev/vda bs=512 skip=200 count=1 2>/dev/null | head -c 18", check=True)
    assert got.stdout == b"TESTBED-HOST-BLOCK"
    vm.run(
        "printf TESTBED-GUEST-BLOCK | dd of=/dev/vda bs=512 seek=300 conv=notrunc 2>/dev/null"
        " && sync && echo 1 > /proc/sys/vm/drop_caches",
        check=True,
    )
    with disk.open("rb") as fh:
        fh.seek(300 * BLOCK)
        assert fh.read(19) == b"TESTBED-GUEST-BLOCK"


def test_virtiofs_cache_window(boot: Boot, arch: str, run_dir: Path) -> None:
    cmd, share = _virtiofsd_cmd(run_dir)
    vm = boot(_virtiofs(cmd))
    vm.guest.load_modules("virtiofs", params=VIRTIOFS_PARAMS)
    device = vm.test_device()  # virtio-id 26, now bound to virtio-fs
    assert device.driver == "virtio-pci"
    probe = CacheProbe.of(vm, hot=False)
    dmesg = _virtiofs_probed(vm, device.bdf, probe)
    _assert_cache_window(vm, device, dmesg, probe)
    _assert_share_works(vm, share)

    assert "GET_SHMEM_CONFIG" in vm.plugged[0].endpoint.trace.names()
    foreign = vm.plugged[0].foreign
    vm.close()
    _assert_left_nothing(vm, foreign)
    assert foreign is not None and foreign.stopped is not None
    assert foreign.stopped.returncode == 0  # virtiofsd ends by itself when QEMU goes


def test_storage_daemon_disk(boot: Boot, arch: str, run_dir: Path) -> None:
    cmd, disk = _storage_daemon_cmd(run_dir)
    vm = boot(_blk(cmd))
    vm.guest.load_modules("virtio_blk")
    device = vm.test_device(virtio_id=2)
    assert device.driver == "virtio-pci"
    vm.guest.wait_virtio_driver(device.bdf, "virtio_blk", timeout=DRIVER_TIMEOUT)
    _assert_disk_works(vm, disk)

    foreign = vm.plugged[0].foreign
    vm.close()
    _assert_left_nothing(vm, foreign)
    # qemu-storage-daemon keeps serving after QEMU leaves: SIGTERM ends it, no SIGKILL.
    assert foreign is not None and foreign.stopped is not None and not foreign.stopped.killed


def test_virtiofs_hotplug_cache_window(boot: Boot, arch: str, run_dir: Path) -> None:
    """virtiofsd hot-plugged behind the relay with {0: 64M} injected: the virtio-fs driver
    (loaded before the device arrives) probes it on hot-add and finds the window (x86_64),
    the share works, and unplug leaves nothing."""
    cmd, share = _virtiofsd_cmd(run_dir)
    vm = boot(root_ports=1)
    vm.guest.load_modules("virtiofs", params=VIRTIOFS_PARAMS)
    plugged = vm.plug(_virtiofs(cmd))
    assert plugged.relayed and plugged.foreign is not None and plugged.bdf is not None
    pid = plugged.foreign.pid
    assert pid is not None
    probe = CacheProbe.of(vm, hot=True)
    dmesg = _virtiofs_probed(vm, plugged.bdf, probe)
    device = vm.test_device(bdf=plugged.bdf)
    assert device.driver == "virtio-pci"
    _assert_cache_window(vm, device, dmesg, probe)
    _assert_share_works(vm, share)

    assert "GET_SHMEM_CONFIG" in plugged.endpoint.trace.names()
    vm.unplug(plugged)
    _assert_unplug_left_nothing(vm, plugged, pid)
    assert vm.machine is not None
    vm.machine.qmp("query-status")  # QEMU still answers after the cycle


def test_storage_daemon_hotplug_disk(boot: Boot, arch: str, run_dir: Path) -> None:
    """qemu-storage-daemon hot-plugged behind the relay, nothing injected: virtio_blk sees
    the disk, blocks reach the host file, the guest sees no shared-memory capability (and
    QEMU never asks for a layout), and unplug leaves nothing."""
    cmd, disk = _storage_daemon_cmd(run_dir)
    vm = boot(root_ports=1)
    vm.guest.load_modules("virtio_blk")
    plugged = vm.plug(_blk(cmd))
    assert plugged.relayed and plugged.foreign is not None and plugged.bdf is not None
    pid = plugged.foreign.pid
    assert pid is not None
    vm.guest.wait_virtio_driver(plugged.bdf, "virtio_blk", timeout=DRIVER_TIMEOUT)
    device = vm.test_device(virtio_id=2, bdf=plugged.bdf)
    assert device.driver == "virtio-pci"
    assert device.function.virtio_shm_caps == []
    vm.check_guest_sees(plugged)  # no caps, no BAR 4
    _assert_disk_works(vm, disk)

    assert "GET_SHMEM_CONFIG" not in plugged.endpoint.trace.names()
    vm.unplug(plugged)
    _assert_unplug_left_nothing(vm, plugged, pid)
    assert vm.machine is not None
    vm.machine.qmp("query-status")
