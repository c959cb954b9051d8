"""GuestVM: a booted guest with (optionally) our vhost-user back-end, reachable over SSH.

Composition only: QEMU resolution and accelerator choice (testbed.host), the guest image
(testbed.images), the back-end (testbed.vhost_user), the QEMU driver (testbed.machine)
and SSH (testbed.guest). Every part is torn down in reverse order on exit, also when
start-up fails half-way, on Ctrl-C, and on SIGTERM (the CLI turns it into an exception).

Artifacts (qemu-cmdline.txt, console.log, qmp.log, qemu-stderr.log, the vhost-user trace,
dmesg on failure, qemu-by-hand.sh) go to `artifacts_dir` when given and stay there. Without
one they live in the private run dir and are copied under results/ only when the run
fails, so that a failure never loses its evidence.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from testbed.device import DEFAULT_VIRTIO_ID, ShmemLayout, VhostUserDevice
from testbed.errors import ConfigError, QemuExited
from testbed.guest.inspect import GuestPciDevice, GuestPciView, inspect_pci
from testbed.guest.ssh import CommandResult, SSHSession
from testbed.machine.cmdline import MachineConfig, build_command
from testbed.machine.qemu import GuestMachine, free_tcp_port
from testbed.paths import make_private_dir, remove_tree, results_dir, sanitize
from testbed.verdict import LayoutVerdict, verdict_for

log = logging.getLogger(__name__)

BACKEND_CHARDEV = "vu0"
BACKEND_SOCKET = f"{BACKEND_CHARDEV}.sock"
TRACE_NAME = "vhost-user-trace.jsonl"


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _dq(word: str) -> str:
    """Double-quote for sh, so that ${RUN} placeholders still expand."""
    escaped = "".join("\\" + c if c in '\\$`"' else c for c in word)
    return f'"{escaped}"'


def by_hand_script(
    qemu_argv: Sequence[str],
    run_dir: Path,
    device: VhostUserDevice | None,
    incoming: Path | None = None,
) -> str:
    """qemu-by-hand.sh: `testbed backend` serving the device's layout, then QEMU with the
    same command line in the foreground, for gdb. It serves the layout only: a scenario's
    faults and steps are replayed by its reproduce.sh (testbed bugs reproduce), not here.

    Paths under the run dir become ${RUN}, a fresh 0700 dir, so the script works after
    the original run dir is gone; testbed runs from this venv, found by absolute path.
    """
    prefix = str(run_dir)

    def arg(word: str) -> str:
        return _dq(word).replace(prefix, "${RUN}")

    lines = [
        "#!/bin/sh",
        "# This VM's QEMU by hand, against a back-end serving the same layout (no faults:",
        "# reproduce.sh reruns a failed scenario as it ran). GDB='gdb --args' sh qemu-by-hand.sh",
        "set -eu",
        "RUN=$(mktemp -d /tmp/testbed-repro-XXXXXX)",
        'chmod 700 "$RUN"',
        'cleanup() { [ -n "${BACKEND:-}" ] && kill "$BACKEND" 2>/dev/null; rm -rf "$RUN"; }',
        "trap cleanup EXIT INT TERM",
    ]
    if device is not None:
        region_args = " ".join(device.layout.region_args())
        lines += [
            f'{shlex.quote(sys.executable)} -m testbed backend --socket "$RUN/{BACKEND_SOCKET}" '
            f"{region_args} &",
            "BACKEND=$!",
            f'while [ ! -S "$RUN/{BACKEND_SOCKET}" ]; do sleep 0.1; done',
        ]
    lines.append('echo "console: $RUN/console.log  QMP: $RUN/qmp.sock" >&2')
    if incoming is not None:
        # -incoming defer: the guest comes from a snapshot (testbed.snapshot), loaded
        # once the file's format is set; say how, since nothing else here does it.
        steps = [
            '{"execute": "qmp_capabilities"}',
            '{"execute": "migrate-set-capabilities", "arguments": {"capabilities": '
            '[{"capability": "mapped-ram", "state": true}]}}',
            f'{{"execute": "migrate-incoming", "arguments": {{"uri": "file:{incoming}"}}}}',
            '{"execute": "cont"}',
        ]
        lines.append(
            "echo 'restored guest: send these on QMP ($RUN/qmp.sock), e.g. with socat:' >&2"
        )
        lines += [f"echo {shlex.quote(step)} >&2" for step in steps]
    body = " \\\n    ".join(arg(w) for w in qemu_argv)
    lines.append("${GDB:-} " + body)
    return "\n".join(lines) + "\n"


class _CutShort(BaseException):
    """Raised by _SignalsDeferred into a graceful teardown step (BaseException, so that no
    `except Exception` on the way swallows it)."""


class _SignalsDeferred:
    """While tearing down, SIGINT/SIGTERM are recorded instead of raised at a random point.

    A signal raised between two teardown steps would skip every step after it. Recorded, it
    only interrupts a step marked ``interruptible`` (the graceful ones, which may wait on
    the guest) and is delivered again through the previous handler on exit, so a second
    Ctrl-C still ends the program with 130 (143 for SIGTERM), after a complete teardown.
    Python runs signal handlers in the main thread only: elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.interruptible = False
        self._saved: dict[int, Any] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)
        if self.interruptible:
            self.interruptible = False
            raise _CutShort()

    def __enter__(self) -> _SignalsDeferred:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._saved[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        if not self.pending:
            return
        signum = self.pending[0]
        handler = self._saved.get(signum)
        if callable(handler):
            handler(signum, None)  # default_int_handler / cli's SIGTERM handler: raises
        else:
            os.kill(os.getpid(), signum)  # SIG_DFL: let it do what it would have done


class GuestVM:
    """A booted guest; use as a context manager. `.ssh`, `.machine`, `.backend`, `.image`."""

    def __init__(
        self,
        arch: str,
        *,
        regions: ShmemLayout | Mapping[int, int] | None = None,
        accel: str = "auto",
        qemu: str | None = None,
        artifacts_dir: Path | None = None,
        faults: Any = None,
        memory_mib: int = 512,
        cpu: str | None = None,
        phys_bits: int | None = None,
        root_ports: int = 0,
        root_port_pref64: int | None = None,
        extra_kernel_args: Sequence[str] = (),
        extra_qemu_args: Sequence[str] = (),
        boot_timeout: float = 90.0,
        allow_overfull: bool = False,
        reconnect_ms: int | None = None,
        backend_cmd: str | Sequence[str] | None = None,
        backend_socket: Path | str | None = None,
        virtio_id: int = DEFAULT_VIRTIO_ID,
        num_vqs: int = 1,
        vq_size: int | None = None,
        config_size: int | None = None,
        backend_ready_timeout: float = 15.0,
        restore: bool | None = False,
        plug: str = "cold",
        kernel: str | None = None,
    ) -> None:
        self.arch = arch
        # The guest kernel by its recipe name ("6.1", "6.12"; None: the image layer's
        # default): passed through to ensure_image as it is.
        self.kernel = kernel
        # A back-end we did not write: started from ``backend_cmd`` ('PROGRAM ARGS...
        # {socket}') or already listening on ``backend_socket``; QEMU reaches it through
        # the relay (trace, conformance checks), which injects ``regions`` if given.
        if backend_cmd is not None and backend_socket is not None:
            raise ConfigError("give a back-end command or a back-end socket, not both")
        self.backend_cmd = backend_cmd
        self.backend_socket = None if backend_socket is None else Path(backend_socket)
        self.backend_ready_timeout = backend_ready_timeout
        self.foreign: Any = None
        foreign = backend_cmd is not None or backend_socket is not None
        # The device, parsed and checked here, at the edge; its socket is placed at start.
        # None: no vhost-user device at all; an empty layout: a device without regions.
        self.device: VhostUserDevice | None = (
            None
            if regions is None and not foreign
            else VhostUserDevice(
                BACKEND_CHARDEV,
                Path(BACKEND_SOCKET),
                ShmemLayout.of(regions),
                virtio_id=virtio_id,
                num_vqs=num_vqs,
                vq_size=vq_size,
                config_size=config_size,
                reconnect_ms=reconnect_ms,
                allow_overfull=allow_overfull,
            )
        )
        self.accel_requested = accel
        self.qemu_explicit = qemu
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir else None
        self.faults = faults
        self.memory_mib = memory_mib
        self.cpu = cpu
        self.phys_bits = phys_bits
        # How the device arrives: "cold" on the QEMU command line, seen by the firmware
        # and the kernel's first enumeration; "hot" with device_add into a root port once
        # the guest is up (testbed.hotplug), which lets the guest come from a snapshot.
        if plug not in ("cold", "hot"):
            raise ConfigError(f"plug={plug!r}: use 'cold' or 'hot'")
        if plug == "hot" and self.device is None:
            raise ConfigError("plug='hot' hot-plugs the device: give regions or a back-end")
        self.plug = plug
        self.root_ports = max(root_ports, 1) if plug == "hot" else root_ports
        # None: MachineConfig's default. The window holds BAR 2 as well as BAR 4, and
        # firmware aligns it only to 2 MiB: a 64M layout needs a 128M reserve.
        self.root_port_pref64 = root_port_pref64
        self.extra_kernel_args = tuple(extra_kernel_args)
        self.extra_qemu_args = tuple(extra_qemu_args)
        self.boot_timeout = boot_timeout
        # Boot once, restore many (testbed.snapshot): start from a saved, booted guest.
        # Only without a cold-plugged device: the saved guest has none, a scenario
        # hot-plugs its own after the restore. None: restore whenever that holds.
        cold_device = self.device is not None and plug == "cold"
        if restore and cold_device:
            raise ConfigError(
                "restore=True starts from a saved guest without devices: cold-plug needs "
                "a real boot (restore=False), or hot-plug the device after the restore"
            )
        self.restore = not cold_device if restore is None else restore
        self.snapshot: Any = None
        self._backend_generation = 0

        self.run_dir: Path | None = None
        self.logdir: Path | None = None
        self.machine: GuestMachine | None = None
        self.backend: Any = None
        self._ssh: SSHSession | None = None
        self.image: Any = None
        self.qemu_binary: Any = None
        self.accel: Any = None
        self.timings: dict[str, float] = {}
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> GuestVM:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=exc is not None)

    @property
    def ssh(self) -> SSHSession:
        if self._ssh is None:
            raise ConfigError("GuestVM is not started: use it as a context manager")
        return self._ssh

    def _step(self, name: str, started: float) -> float:
        now = time.monotonic()
        self.timings[name] = round(now - started, 3)
        return now

    def start(self) -> GuestVM:
        from testbed.host.accel import choose_accel
        from testbed.host.qemu import resolve_qemu
        from testbed.images import ensure_image

        t0 = t = time.monotonic()
        try:
            self.qemu_binary = resolve_qemu(self.arch, self.qemu_explicit)
            t = self._step("resolve_qemu", t)
            self.accel = choose_accel(self.accel_requested, self.arch, self.qemu_binary.path)
            log.info("accelerator %s: %s", self.accel.name, self.accel.reason)
            t = self._step("choose_accel", t)
            # Build progress to stderr: `testbed exec` keeps stdout for the guest's bytes.
            self.image = ensure_image(self.arch, log=_to_stderr, kernel=self.kernel)
            t = self._step("ensure_image", t)

            self.run_dir = make_private_dir(f"vm-{sanitize(self.arch)}")
            if self.artifacts_dir is not None:
                self.artifacts_dir.mkdir(parents=True, exist_ok=True)
                self.logdir = self.artifacts_dir
            else:
                self.logdir = self.run_dir / "logs"
                self.logdir.mkdir()

            devices: tuple[VhostUserDevice, ...] = ()
            if self.device is not None and self.plug == "cold":
                self.device = dataclasses.replace(self.device, socket=self.run_dir / BACKEND_SOCKET)
                self._start_backend()
                devices = (self.device,)
            t = self._step("backend", t)

            config = MachineConfig(
                arch=self.arch,
                qemu=self.qemu_binary.path,
                accel=self.accel.name,
                kernel=Path(self.image.kernel),
                initrd=Path(self.image.initrd) if self.image.initrd else None,
                qmp_socket=self.run_dir / "qmp.sock",
                console_log=self.logdir / "console.log",
                ssh_port=free_tcp_port(),
                kernel_cmdline=self.image.cmdline,
                extra_kernel_args=self.extra_kernel_args,
                memory_mib=self.memory_mib,
                cpu=self.cpu,
                phys_bits=self.phys_bits,
                vhost_user_devices=devices,
                root_ports=self.root_ports,
                extra_args=self.extra_qemu_args,
            )
            if self.root_port_pref64 is not None:
                config = dataclasses.replace(config, root_port_pref64=self.root_port_pref64)
            if self.restore:
                config = self._restore_from(config)
                t = self._step("snapshot", t)
            self._write_by_hand(config)
            self.machine = GuestMachine(config, self.logdir)
            self.machine.start()
            t = self._step("qemu_start" if not self.restore else "restore", t)
            if not self.restore:
                self.machine.wait_console(re.escape(self.image.ready_line), self.boot_timeout)
                t = self._step("ready_line", t)
            remaining = max(self.boot_timeout - (time.monotonic() - t0), 5.0)
            self._ssh = SSHSession.connect(
                "127.0.0.1",
                self.machine.ssh_port,
                Path(self.image.client_key),
                self.image.host_key_line,
                time.monotonic() + remaining,
                check_alive=self.machine.check_alive,
            )
            t = self._step("ssh", t)
            if self.device is not None and self.plug == "hot":
                self._plug_device()
                self._step("hotplug", t)
            self.timings["total"] = round(time.monotonic() - t0, 3)
            log.info("guest %s up: %s", self.arch, self.timings)
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def _plug_device(self) -> None:
        """Hot-plug this VM's device into its first root port; from then on it is this
        VM's device and back-end, as a cold-plugged one would be (closed after QEMU)."""
        from testbed.hotplug import Hotplug

        assert self.device is not None
        device = self.device
        plugged = Hotplug(self, virtio_id=device.virtio_id).plug(
            device.layout,
            faults=self.faults,
            allow_overfull=device.allow_overfull,
            reconnect_ms=device.reconnect_ms,
            backend_cmd=self.backend_cmd,
            backend_socket=self.backend_socket,
            num_vqs=device.num_vqs,
            vq_size=device.vq_size,
            config_size=device.config_size,
            backend_ready_timeout=self.backend_ready_timeout,
        )
        self.device, self.backend, self.foreign = plugged.spec, plugged.backend, plugged.foreign

    def _restore_from(self, config: MachineConfig) -> MachineConfig:
        """``config`` set to restore the snapshot of its guest, made first if missing."""
        from testbed.snapshot import SnapshotStore, qemu_identity, snapshot_key

        assert self.logdir is not None
        identity = qemu_identity(self.qemu_binary.path, self.qemu_binary.version_str)
        key = snapshot_key(config, identity)

        def make(snap: Any, partial: Path) -> None:
            # The same guest, booted for real; it must come out with the same key, or
            # the file would not fit the QEMU that restores it.
            maker = GuestVM(
                self.arch,
                accel=self.accel.name,
                qemu=str(self.qemu_binary.path),
                artifacts_dir=snap.logdir,
                memory_mib=self.memory_mib,
                cpu=self.cpu,
                phys_bits=self.phys_bits,
                root_ports=self.root_ports,
                root_port_pref64=self.root_port_pref64,
                extra_kernel_args=self.extra_kernel_args,
                extra_qemu_args=self.extra_qemu_args,
                boot_timeout=self.boot_timeout,
                kernel=self.kernel,
            )
            with maker:
                assert maker.machine is not None
                made = snapshot_key(maker.machine.config, identity)
                if made != key:
                    raise ConfigError(f"snapshot boot has key {made}, wanted {key}: a bug")
                maker.save_state(partial)

        self.snapshot = SnapshotStore().get_or_make(key, make)
        # The console log begins with the boot this guest comes from (QEMU appends to it):
        # a failure's console tail and the artifacts tell the whole story.
        shutil.copyfile(self.snapshot.console, config.console_log)
        (self.logdir / "restored-from.txt").write_text(
            f"restored from {self.snapshot.state}\n"
            f"the boot that made it: {self.snapshot.logdir} (its console is the start of "
            "console.log here)\n"
        )
        return dataclasses.replace(config, incoming=self.snapshot.state)

    @property
    def foreign_backend(self) -> bool:
        """The device's back-end is not ours: QEMU talks to it through the relay."""
        return self.backend_cmd is not None or self.backend_socket is not None

    def _start_foreign_backend(self) -> None:
        from testbed.host.foreign import start_behind_relay

        assert self.device is not None and self.logdir is not None and self.run_dir is not None
        # The relay stands where our back-end would: same socket, same trace file, and
        # `violations` like Backend's, so the plugin's checks apply unchanged.
        self.backend, self.foreign = start_behind_relay(
            self.device,
            command=self.backend_cmd,
            socket=self.backend_socket,
            foreign_socket=self.run_dir / "foreign.sock",
            logdir=self.logdir,
            trace_path=self.logdir / TRACE_NAME,
            ready_timeout=self.backend_ready_timeout,
        )

    def load_modules(
        self, *names: str, params: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> CommandResult:
        """insmod the image's optional modules (under /extra, with their dependencies, in
        order) for ``names`` (e.g. "virtiofs", "virtio_blk"), ``params`` by module name
        (e.g. {"virtiofs": "dyndbg=+p"}); see testbed.images.extra."""
        from testbed.images.extra import load_command

        return self.run(load_command(names, dict(params or {})), check=True, timeout=timeout)

    def _start_backend(self, layout: ShmemLayout | None = None) -> None:
        from testbed.vhost_user.backend import Backend

        assert self.device is not None and self.logdir is not None
        if self.foreign_backend:
            self._start_foreign_backend()
            return
        # Each back-end keeps its own trace: a restarted one must not overwrite the first.
        trace = TRACE_NAME
        if self._backend_generation:
            trace = TRACE_NAME.replace(".jsonl", f"-{self._backend_generation}.jsonl")
        self._backend_generation += 1
        self.backend = Backend(
            self.device.socket,
            layout or self.device.layout,
            trace_path=self.logdir / trace,
            faults=self.faults,
        )
        self.backend.start()

    def restart_backend(self, regions: ShmemLayout | Mapping[int, int] | None = None) -> Any:
        """Close the back-end and start a new one on the same socket (the same layout, or
        ``regions``); returns it. QEMU, the socket's client, only finds it again when the
        chardev reconnects (GuestVM(reconnect_ms=...))."""
        if self.backend is None:
            raise ConfigError("this GuestVM has no back-end (regions=None): nothing to restart")
        if self.foreign_backend:
            raise ConfigError("restart_backend serves our own back-end, not a foreign one")
        layout = None if regions is None else ShmemLayout.of(regions)
        self.backend.close()
        if self.machine is not None:
            # Until QEMU's main loop took the hang-up in, the chardev still reads connected.
            self.machine.wait_chardev(BACKEND_CHARDEV, connected=False, timeout=15.0)
        self._start_backend(layout)
        return self.backend

    def _write_by_hand(self, config: MachineConfig) -> None:
        assert self.logdir is not None and self.run_dir is not None
        argv = build_command(config)
        # The console file follows the run dir too, so a rerun never clobbers these logs.
        argv = [
            w.replace(str(self.logdir / "console.log"), str(self.run_dir / "console.log"))
            for w in argv
        ]
        script = self.logdir / "qemu-by-hand.sh"
        # A foreign back-end is not ours to replay: the script then starts QEMU only.
        device = None if self.foreign_backend else self.device
        script.write_text(by_hand_script(argv, self.run_dir, device, config.incoming))
        script.chmod(0o755)

    def close(self, failed: bool = False) -> None:
        """Idempotent teardown, in reverse order; keeps the evidence when `failed`.

        A Ctrl-C or SIGTERM arriving *during* teardown (a second Ctrl-C, a timeout) must
        not skip the steps after the one it hits, or the run dir and the sockets in it
        outlive us: it only cuts the graceful parts short (dmesg, QMP quit) and is
        delivered once everything is down (see _SignalsDeferred).
        """
        with _SignalsDeferred() as signals:
            if self._closed:
                return
            self._closed = True
            self._teardown(failed, signals)

    def _teardown(self, failed: bool, signals: _SignalsDeferred) -> None:
        log.info("tearing down %s guest (%s)", self.arch, "failed" if failed else "ok")

        def step(what: str, action: Callable[[], object], graceful: bool = False) -> None:
            nonlocal failed
            if graceful and signals.pending:
                return  # already asked to hurry: skip what is only nice to have
            try:
                try:
                    signals.interruptible = graceful
                    action()
                finally:
                    signals.interruptible = False
            except _CutShort:
                log.warning("teardown, %s: cut short by a signal", what)
                failed = True
            except Exception as exc:
                log.warning("teardown, %s: %s", what, exc)
                failed = True

        if failed and self._ssh is not None and self.logdir is not None:
            ssh, logdir = self._ssh, self.logdir
            step("collecting dmesg", lambda: self._save_dmesg(ssh, logdir), graceful=True)
        if self._ssh is not None:
            step("closing SSH", self._ssh.close)
            self._ssh = None
        if self.machine is not None:
            machine = self.machine
            if not failed:
                step("QEMU shutdown", lambda: machine.shutdown(timeout=10), graceful=True)
            step("killing QEMU", machine.close)
        if self.backend is not None:
            step("closing the back-end", self.backend.close)
        if self.foreign is not None:
            step("stopping the foreign back-end", self.foreign.close)
        if failed and self.artifacts_dir is None and self.logdir is not None:
            step("keeping artifacts", self._keep_artifacts)
        if self.run_dir is not None:
            run_dir = self.run_dir
            step("removing the run dir", lambda: remove_tree(run_dir))

    def save_state(self, path: Path) -> None:
        """Save the guest to ``path`` (testbed.snapshot): its SSH session is closed first,
        since a restored guest must not hold a connection to a QEMU that is gone; the
        guest stays paused, good only for close() after this."""
        if self.machine is None:
            raise ConfigError("GuestVM is not started: nothing to save")
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        self.machine.save_state(path)

    @staticmethod
    def _save_dmesg(ssh: SSHSession, logdir: Path) -> None:
        dmesg = ssh.run("dmesg", timeout=10)
        (logdir / "guest-dmesg.txt").write_bytes(dmesg.stdout)

    def _keep_artifacts(self) -> None:
        assert self.logdir is not None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = results_dir() / "failed" / f"{sanitize(self.arch)}-{stamp}"
        shutil.copytree(self.logdir, kept, dirs_exist_ok=True)
        log.warning("artifacts of the failed run kept in %s", kept)

    # -- conveniences ----------------------------------------------------------------------

    def run(
        self, command: str | Sequence[str], *, check: bool = False, timeout: float = 60.0
    ) -> CommandResult:
        """Run a command over SSH. If it fails because QEMU died under it, the error is
        QemuExited (exit status or signal, stderr and console tails), not an SSH error."""
        try:
            return self.ssh.run(command, check=check, timeout=timeout)
        except Exception as exc:
            if self.machine is not None:
                self.machine.wait_exited(1.0)  # the SSH EOF can beat QEMU's exit status
                try:
                    self.machine.check_alive("under a guest command")
                except QemuExited as dead:
                    raise dead from exc
            raise

    def inspect_pci(self) -> GuestPciView:
        return inspect_pci(self.ssh)

    # -- the verdict -----------------------------------------------------------------------

    @property
    def virtio_id(self) -> int:
        """The device type the guest sees for our device (its virtio-id)."""
        return self.device.virtio_id if self.device is not None else DEFAULT_VIRTIO_ID

    def test_device(self, virtio_id: int | None = None) -> GuestPciDevice:
        """The guest's one vhost-user test device (AssertionError unless exactly one)."""
        virtio_id = self.virtio_id if virtio_id is None else virtio_id
        devices = self.inspect_pci().virtio_devices_of(virtio_id)
        if len(devices) != 1:
            raise AssertionError(
                f"want one test device (virtio-id {virtio_id}) in the guest, have "
                f"{[d.bdf for d in devices] or 'none'}"
            )
        return devices[0]

    def verdict(
        self, layout: ShmemLayout | Mapping[int, int] | None = None, bdf: str | None = None
    ) -> LayoutVerdict:
        """How the guest's test device (the only one, or the one at ``bdf``) differs from
        ``layout`` (default: the layout this VM's back-end serves)."""
        if layout is None:
            if self.device is None:
                raise ConfigError("this GuestVM has no device: name the layout to expect")
            layout = self.device.layout
        return verdict_for(self.inspect_pci(), layout, bdf, self.virtio_id)

    def check_guest_sees(
        self, layout: ShmemLayout | Mapping[int, int] | None = None, bdf: str | None = None
    ) -> None:
        """Fail (AssertionError, with the differences) unless the guest shows ``layout``."""
        verdict = self.verdict(layout, bdf)
        if not verdict.ok:
            raise AssertionError(verdict.explain())
