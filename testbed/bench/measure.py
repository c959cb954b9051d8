"""The measurements of `testbed bench` (I/O: QEMU, guests, subprocesses).

Each function returns seconds for one run; testbed.bench.run collects them into figures.
Child processes (the floor, pytest, make, testbed itself) run through `run_child`, which
writes their output to a log file and, on any exception (Ctrl-C, SIGTERM turned into an
exception), terminates them and waits, so that nothing outlives the benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.bench.report import RUN_INIT, BootObservation, dmesg_time, parse_dmesg
from testbed.device import VhostUserDevice
from testbed.errors import ProvisionError, QemuExited, StateError, WaitTimeout
from testbed.guest.datapath import GuestDevice, looks_unmapped
from testbed.machine.cmdline import MachineConfig, build_command
from testbed.machine.qemu import free_tcp_port
from testbed.paths import PROJECT_ROOT, cache_dir, make_private_dir, remove_tree
from testbed.resource import Closeable
from testbed.verdict import verdict_for
from testbed.vhost_user.shmem import Memfd
from testbed.vm import GuestOptions, GuestVM

FLOOR_SCRIPT = PROJECT_ROOT / "scripts" / "floor.py"
MIB = 1 << 20
# The cold-plug scenario the benchmark times: scenarios/test_coldplug.py's "two" layout.
COLDPLUG_LAYOUT: Mapping[int, int] = {0: 2 * MIB, 1: 2 * MIB}
# Written to /dev/kmsg by the first SSH command: ties the guest's printk clock to ours.
KMSG_MARK = "testbed-bench-mark"
FLOOR_TIMEOUT = 120.0


def read_loadavg() -> str:
    return Path("/proc/loadavg").read_text()


def run_child(
    argv: Sequence[str],
    log_path: Path,
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[float, int]:
    """Run argv to completion with its output in log_path: (seconds, exit status).

    Raises WaitTimeout past `timeout`. On any exception the child is terminated (SIGTERM,
    so its own teardown runs), then killed if it lingers.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as out:
        out.write(("$ " + " ".join(argv) + "\n").encode())
        out.flush()
        started = time.monotonic()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
        )
        try:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise WaitTimeout(
                    f"{argv[0]} ran longer than {timeout:.0f} s; see {log_path}"
                ) from exc
            return time.monotonic() - started, code
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# -- the floor -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootInputs:
    """What the floor and the test bed boot with, resolved once per architecture."""

    arch: str
    qemu: Path
    accel: str
    kernel: Path
    initrd: Path | None
    cmdline: str
    ready_line: str


def floor_command(inputs: BootInputs, run_dir: Path) -> tuple[list[str], Path]:
    """The test bed's QEMU argv for a plain boot (no -S, no vhost-user device), and the
    console file it writes."""
    console = run_dir / "console.log"
    config = MachineConfig(
        arch=inputs.arch,
        qemu=inputs.qemu,
        accel=inputs.accel,
        kernel=inputs.kernel,
        initrd=inputs.initrd,
        qmp_socket=run_dir / "qmp.sock",
        console_log=console,
        ssh_port=free_tcp_port(),
        kernel_cmdline=inputs.cmdline,
    )
    return build_command(config), console


def measure_floor(inputs: BootInputs, logdir: Path) -> float:
    """One run of scripts/floor.py: Popen to the ready line, in seconds."""
    run_dir = make_private_dir(f"floor-{inputs.arch}")
    try:
        argv, console = floor_command(inputs, run_dir)
        stderr = run_dir / "qemu-stderr.log"
        log_path = logdir / f"floor-{inputs.arch}.log"
        _, code = run_child(
            [
                sys.executable,
                str(FLOOR_SCRIPT),
                "--console",
                str(console),
                "--ready",
                inputs.ready_line,
                "--timeout",
                str(FLOOR_TIMEOUT),
                "--stderr",
                str(stderr),
                "--",
                *argv,
            ],
            log_path,
            FLOOR_TIMEOUT + 30,
        )
        output = log_path.read_text(errors="replace")
        if code != 0:
            raise QemuExited(
                f"the {inputs.arch} floor boot failed ({log_path})",
                stderr_tail=stderr.read_text(errors="replace")[-2000:] if stderr.exists() else "",
                console_tail=console.read_text(errors="replace")[-2000:]
                if console.exists()
                else "",
            )
        seconds: float = json.loads(output.strip().splitlines()[-1])["seconds"]
        return seconds
    finally:
        remove_tree(run_dir)


# -- the test bed ----------------------------------------------------------------------------


def measure_boot(arch: str, accel: str, kernel: str | None = None) -> float:
    """GuestVM start to the first SSH command's answer (teardown not counted)."""
    started = time.monotonic()
    with GuestVM(arch, options=GuestOptions(kernel=kernel), accel=accel) as vm:
        vm.run("true", check=True)
        return time.monotonic() - started


def measure_restore(arch: str, accel: str) -> float:
    """GuestVM(restore=True) start to the first SSH command's answer: a new QEMU restored
    from the snapshot of a booted guest with one root port (testbed.snapshot), made first
    when missing (the caller runs one of these untimed so that none of the timed ones
    includes that boot)."""
    started = time.monotonic()
    with GuestVM(arch, options=GuestOptions(root_ports=1), accel=accel, restore=True) as vm:
        vm.run("true", check=True)
        return time.monotonic() - started


@dataclass(frozen=True)
class ColdplugRun:
    seconds: float
    """GuestVM start to teardown done: boot, first command, checks, teardown."""
    observation: BootObservation
    verdict: str
    """'' when the guest saw the layout exactly, else the verdict's explanation."""


def measure_coldplug(arch: str, accel: str) -> ColdplugRun:
    """The cold-plug scenario ('two' regions) end to end, instrumented for the phases."""
    started = time.monotonic()
    with GuestVM(arch, VhostUserDevice.of(COLDPLUG_LAYOUT), accel=accel) as vm:
        before = time.monotonic()
        vm.run(f"echo {KMSG_MARK} > /dev/kmsg", check=True)
        after = time.monotonic()
        view = vm.inspect_pci()
        result = verdict_for(view, COLDPLUG_LAYOUT)
        verdict = "" if result.ok else result.explain()
        checked = time.monotonic()
        timings = dict(vm.timings)
    done = time.monotonic()
    lines = parse_dmesg(view.dmesg)
    observation = BootObservation(
        timings=timings,
        mark_host=(before + after) / 2 - started,
        mark_guest=dmesg_time(lines, KMSG_MARK),
        run_init_guest=dmesg_time(lines, RUN_INIT),
        first_command=after - before,
        checks=checked - after,
        teardown=done - checked,
    )
    return ColdplugRun(done - started, observation, verdict)


# -- hot-plug and the data path (testbed.plugging, testbed.guest.datapath) ------------------

HOTPLUG_LAYOUT: Mapping[int, int] = {0: 4 * MIB}
# scenarios/test_datapath.py's set-up: a 64 KiB memfd mapped at 1 MiB into region 1.
DATAPATH_LAYOUT: Mapping[int, int] = {0: 2 * MIB, 1: 2 * MIB}
DATAPATH_SHMID = 1
DATAPATH_OFFSET = 1 * MIB
DATAPATH_LENGTH = 64 * 1024
DATAPATH_PROBE = 64
DRIVER_OK_TIMEOUT = 20.0


def measure_hotplug_cycles(arch: str, accel: str, cycles: int) -> list[float]:
    """`cycles` plug/unplug cycles in one boot: chardev-add, device_add, the guest binds
    it, device_del, DEVICE_DELETED, the guest no longer lists it, back-end disconnected."""
    seconds = []
    options = GuestOptions(root_ports=1)
    with GuestVM(arch, options=options, accel=accel, restore=True) as vm:
        for _ in range(cycles):
            started = time.monotonic()
            plugged = vm.plug(VhostUserDevice.of(HOTPLUG_LAYOUT))
            vm.unplug(plugged)
            seconds.append(time.monotonic() - started)
    return seconds


def measure_map_unmap(arch: str, accel: str, rounds: int) -> list[float]:
    """`rounds` SHMEM_MAP -> the guest reads the pattern through BAR 4 -> SHMEM_UNMAP ->
    the guest reads the range empty, on one booted guest at DRIVER_OK."""

    seconds = []
    with GuestVM(arch, VhostUserDevice.of(DATAPATH_LAYOUT), accel=accel) as vm:
        device = vm.test_device()
        guest = GuestDevice(vm.ssh, device.bdf)
        guest.start()
        vm.backend.wait_driver_ok(DRIVER_OK_TIMEOUT)
        with Memfd(DATAPATH_LENGTH) as memfd:
            pattern = os.urandom(DATAPATH_LENGTH)
            memfd.write(0, pattern)
            for _ in range(rounds):
                started = time.monotonic()
                mapped = vm.backend.map(
                    DATAPATH_SHMID, DATAPATH_OFFSET, DATAPATH_LENGTH, memfd.fileno()
                )
                seen = guest.read(DATAPATH_SHMID, DATAPATH_OFFSET, DATAPATH_PROBE)
                unmapped = vm.backend.unmap(DATAPATH_SHMID, DATAPATH_OFFSET, DATAPATH_LENGTH)
                gone = guest.read(DATAPATH_SHMID, DATAPATH_OFFSET, DATAPATH_PROBE)
                seconds.append(time.monotonic() - started)
                matches = seen == pattern[:DATAPATH_PROBE]
                if mapped or unmapped or not matches:
                    raise StateError(
                        f"map {mapped}, unmap {unmapped}, pattern seen {matches}",
                        "map 0, unmap 0, pattern seen",
                        "map/unmap round trip (run scenarios/test_datapath.py for details)",
                    )
                if not looks_unmapped(gone):
                    raise StateError("mapped after UNMAP", "unmapped", "map/unmap round trip")
    return seconds


# -- the whole suite, set-up steps -----------------------------------------------------------


def venv_tool(name: str) -> str:
    """A tool installed beside this Python (the venv's pytest, testbed)."""
    return str(Path(sys.executable).parent / name)


def measure_suite(workers: int, output: Path, logdir: Path, timeout: float) -> tuple[float, str]:
    """`pytest scenarios -n workers --dist loadgroup` (what `make e2e` runs): (seconds,
    pytest's summary)."""
    env = dict(os.environ, TESTBED_RESULTS=str(output / f"bench-e2e-n{workers}"))
    log_path = logdir / f"e2e-n{workers}.log"
    seconds, code = run_child(
        [venv_tool("pytest"), "scenarios", "-n", str(workers), "--dist", "loadgroup", "-q"],
        log_path,
        timeout,
        env=env,
        cwd=PROJECT_ROOT,
    )
    lines = log_path.read_text(errors="replace").strip().splitlines()
    summary = lines[-1] if lines else ""
    if code not in (0, 1):  # 1 = some tests failed: still a timed suite, reported
        raise ProvisionError(f"pytest scenarios -n {workers} exited {code}; see {log_path}")
    return seconds, summary


def measure_command(
    argv: Sequence[str],
    log_path: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> float:
    seconds, code = run_child(argv, log_path, timeout, env=env, cwd=PROJECT_ROOT)
    if code != 0:
        raise ProvisionError(f"{' '.join(argv)} exited {code}; see {log_path}")
    return seconds


def testbed_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "testbed", *args]


class FreshCache(Closeable):
    """A new, empty TESTBED_CACHE beside the real one (same file system, so the downloaded
    .debs can be hard-linked in); removed on close()."""

    def __init__(self, reuse_debs: bool) -> None:
        real = cache_dir()
        real.parent.mkdir(parents=True, exist_ok=True)
        # Not make_private_dir: it must sit on the cache's file system for hard links.
        self.path = Path(tempfile.mkdtemp(prefix="testbed-bench-cache-", dir=real.parent))
        self.path.chmod(0o700)
        if reuse_debs and (real / "images" / "debs").is_dir():
            target = self.path / "images" / "debs"
            target.mkdir(parents=True)
            for deb in (real / "images" / "debs").iterdir():
                if deb.is_file():
                    os.link(deb, target / deb.name)

    def env(self) -> dict[str, str]:
        return dict(os.environ, TESTBED_CACHE=str(self.path))

    def close(self) -> None:
        remove_tree(self.path)
