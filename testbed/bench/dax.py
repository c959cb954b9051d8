"""The DAX benchmark of `testbed bench`: a sequential read of one file in the guest, through
virtio-fs DAX from our back-end, against the same read without DAX from our back-end and
from virtiofsd (I/O: a guest, our back-end, virtiofsd).

One restored guest per architecture (the 6.12 kernel: virtio-fs DAX on both), one root
port; the three file servers are hot-plugged one after the other, each sharing the same
directory with one 32 MiB file. Each run mounts the tag, reads the file once with dd
(bs=1M) and unmounts: the first read after a mount, so DAX pays its SETUPMAPPINGs and the
others find an empty page cache. The guest times the read itself (/proc/uptime around dd,
10 ms resolution), so SSH's round trip is not in it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.device import ForeignCommand, VhostUserDevice
from testbed.errors import StateError
from testbed.host.backends import ensure_virtiofsd
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user.devices.fs import VirtioFsDevice
from testbed.vhost_user.devices.spec import VirtioFsSpec
from testbed.vm import GuestOptions, GuestVM

MIB = 1 << 20
FILE_SIZE = 32 * MIB
WINDOW = 64 * MIB  # holds the whole file: no reclaim in the measured read
KERNEL = "6.12"
TAG = "benchfs"
MOUNT = "/mnt/bench"
DRIVER_TIMEOUT = 30.0
READ_TIMEOUT = 300.0

SERVERS = ("ours_dax", "ours_nodax", "virtiofsd")
"""The figures' middle names: dax_read.<server>.<arch>."""


@dataclass(frozen=True)
class Server:
    name: str
    device: Callable[[Path], VhostUserDevice]
    mount_options: str


def _ours(window: int) -> Callable[[Path], VhostUserDevice]:
    return lambda share: VhostUserDevice.serving(VirtioFsSpec(share, TAG, window))


def _virtiofsd(share: Path) -> VhostUserDevice:
    command = [str(ensure_virtiofsd(log=lambda _: None)), "--socket-path={socket}",
               f"--shared-dir={share}", "--tag", TAG, "--sandbox", "none"]  # fmt: skip
    return VhostUserDevice.of(None, backend=ForeignCommand.of(command), num_vqs=2,
                              config_size=40)  # fmt: skip


def servers() -> tuple[Server, ...]:
    return (
        Server("ours_dax", _ours(WINDOW), "-o dax=always"),
        Server("ours_nodax", _ours(0), ""),
        Server("virtiofsd", _virtiofsd, ""),
    )


def read_script(options: str) -> str:
    """Mount, read the file once, unmount; prints the read's seconds (guest clock)."""
    return (
        f"mkdir -p {MOUNT} && mount -t virtiofs {TAG} {MOUNT} {options} && "
        "a=$(cut -d' ' -f1 /proc/uptime) && "
        f"dd if={MOUNT}/file of=/dev/null bs=1M 2>/dev/null && "
        "b=$(cut -d' ' -f1 /proc/uptime) && "
        f"umount {MOUNT} && echo $a $b"
    )


def seconds_of(output: str) -> float:
    """The read's seconds from read_script's output ("<start> <end>", /proc/uptime)."""
    start, end = (float(word) for word in output.split())
    return end - start


def _check_path(server: str, model: object) -> None:
    """Our back-end served the path its figure names: DAX (SETUPMAPPING, no READ), or
    FUSE_READ without a window."""
    if not isinstance(model, VirtioFsDevice):
        return  # virtiofsd: it has no DAX to take
    requests = model.requests
    dax = "SETUPMAPPING" in requests and "READ" not in requests
    if dax != (server == "ours_dax"):
        raise StateError(f"requests {requests}", "DAX" if server == "ours_dax" else "READ",
                         f"the {server} read")  # fmt: skip


def measure_dax_reads(arch: str, accel: str, runs: int) -> dict[str, list[float]]:
    """``runs`` reads per server, in one guest: server name -> seconds per read."""
    share = make_private_dir("bench-share")
    try:
        (share / "file").write_bytes(os.urandom(FILE_SIZE))
        options = GuestOptions(root_ports=1, kernel=KERNEL)
        found: dict[str, list[float]] = {}
        with GuestVM(arch, options=options, accel=accel, restore=True) as vm:
            for server in servers():
                plugged = vm.plug(server.device(share))
                if plugged.bdf is None:
                    raise StateError("no address", "plugged", f"the {server.name} device")
                vm.guest.wait_virtio_driver(plugged.bdf, "virtiofs", timeout=DRIVER_TIMEOUT)
                script = read_script(server.mount_options)
                found[server.name] = [
                    seconds_of(vm.run(script, check=True, timeout=READ_TIMEOUT).text)
                    for _ in range(runs)
                ]
                _check_path(server.name, plugged.model)
                vm.unplug(plugged)
        return found
    finally:
        remove_tree(share)
