"""The one QEMU driver: launch, QMP, logs, events, shutdown and teardown of every QEMU.

`QemuMachine` owns one QEMU process and everything attached to it: the argv (a subclass
supplies it through `_command`, from testbed.machine.cmdline), the launch, the QMP link
(testbed.machine.qmp), the logs and the sockets. QEMU *dials* our listening sockets (QMP,
and qtest for QtestMachine): no polling for QEMU's socket to appear, and a QEMU that dies
before connecting is noticed at once. `close()` is idempotent and kills whatever is left,
so a machine used as a context manager never outlives its block.

Flavours: `GuestMachine` (testbed.machine.guest: a guest booted from a MachineConfig, with
its console and the ssh port forward), `QtestMachine` (testbed.machine.qtest: no guest) and
the capability probes (testbed.machine.probe). `run_to_exit` runs a QEMU that ends by itself
(`-version`, a probe payload) through the same launcher; nothing else in the test bed starts
QEMU.

Logs, all in `logdir`: qemu-cmdline.txt, qemu-stderr.log, qmp.log (JSON lines: every command,
response and event), and console.log for a guest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import re
import select
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self

from qemu.qmp import ExecuteError

from testbed.bugs.signature import crash_site
from testbed.errors import (
    HostCapabilityError,
    QemuExited,
    QmpCommandFailed,
    StateError,
    TestbedError,
    WaitTimeout,
)
from testbed.host.debugger import CrashSites
from testbed.machine.cmdline import format_command
from testbed.machine.qmp import QmpLink
from testbed.paths import make_private_dir, remove_tree
from testbed.process import kill, launch
from testbed.profile import phase
from testbed.resource import Closeable
from testbed.waiting import wait_steps, wait_until

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.02
MIGRATION_ENDS = frozenset({"completed", "failed", "cancelled"})
MIGRATION_EXIT_GRACE = 2.0
"""Seconds a QEMU whose migration failed is given to exit (an incoming one does)."""
TAIL_LINES = 20


# Ports handed out by this process. Between free_tcp_port() and QEMU's bind the port is
# free again, so the kernel may offer it to the next caller (another VM started from
# another thread): remembering them keeps two VMs of one process off the same port.
# Another process can still take one: GuestMachine.start retries on that clash.
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()
_PORT_PROBES = 64


def quiet_qmp_logs() -> None:
    """Silence qemu.qmp's own warnings: for a QEMU that is meant to die (a crash bug being
    reproduced), its lost-connection warnings are noise; our errors say what happened."""
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and that this process never
    handed out before (QEMU's hostfwd needs a number, it cannot take port 0)."""
    with _handed_out_lock:
        for _ in range(_PORT_PROBES):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port: int = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise HostCapabilityError(
        f"no fresh TCP port on 127.0.0.1 after {_PORT_PROBES} tries ({len(_handed_out)} "
        "already handed out): check the ephemeral port range (net.ipv4.ip_local_port_range)"
    )


# -- running a QEMU that ends by itself -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QemuRun:
    """What a QEMU that ran to its exit left: status and output."""

    returncode: int
    stdout: str
    stderr: str


def run_to_exit(argv: Sequence[str], timeout: float) -> QemuRun:
    """Run a QEMU that ends by itself (`-version`, a probe payload) and collect its output.

    WaitTimeout when it is still running after ``timeout`` s (it is killed; so it is on
    Ctrl-C); OSError when it cannot be started at all.
    """
    log.debug("running %s", " ".join(argv))
    proc: subprocess.Popen[bytes] | None = None

    def record(started: subprocess.Popen[bytes]) -> None:
        nonlocal proc
        proc = started

    try:
        launch(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, on=record)
        assert proc is not None
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WaitTimeout(f"`{' '.join(argv)}` did not exit within {timeout:.0f} s") from None
    finally:
        if proc is not None:
            kill(proc)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    return QemuRun(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


# -- helpers -----------------------------------------------------------------------------------


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


class MachineState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class QemuMachine(Closeable):
    """One QEMU process with QMP, logs and events. Use as a context manager.

    Subclasses supply the argv (`_command`) and may add listeners before the launch
    (`_pre_launch`) and accept or configure after QMP is up (`_post_launch`).
    """

    def __init__(
        self,
        logdir: Path | None = None,
        *,
        qmp_socket: Path | None = None,
        qmp_timeout: float = 10.0,
        crash_sites: bool = False,
    ) -> None:
        """``logdir`` / ``qmp_socket`` None: in a private run dir made by start() and
        removed, logs included, by close(). ``crash_sites``: gdb attached once QEMU is up
        (when gdb is installed), so that a crash that prints nothing has its site without
        the kernel's log (``silent_site``)."""
        self.sites = CrashSites(crash_sites)
        self._last_pid: int | None = None
        self._logdir = Path(logdir) if logdir is not None else None
        self._qmp_socket = qmp_socket
        self.qmp_timeout = qmp_timeout
        self.state = MachineState.NEW
        self.run_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._returncode: int | None = None
        self._stderr_file: IO[bytes] | None = None
        self._listeners: dict[Path, socket.socket] = {}
        self._qmp = QmpLink()

    # -- paths -----------------------------------------------------------------------------

    @property
    def logdir(self) -> Path:
        if self._logdir is None:
            raise StateError(self.state, MachineState.RUNNING, "logdir")
        return self._logdir

    @property
    def qmp_socket(self) -> Path:
        if self._qmp_socket is None:
            raise StateError(self.state, MachineState.RUNNING, "qmp_socket")
        return self._qmp_socket

    @property
    def cmdline_path(self) -> Path:
        return self.logdir / "qemu-cmdline.txt"

    @property
    def stderr_path(self) -> Path:
        return self.logdir / "qemu-stderr.log"

    @property
    def qmp_log_path(self) -> Path:
        return self.logdir / "qmp.log"

    # -- hooks -----------------------------------------------------------------------------

    def _command(self) -> list[str]:
        """QEMU's argv, with -qmp dialing self.qmp_socket (see cmdline.qmp_option)."""
        raise NotImplementedError

    def _pre_launch(self) -> None:
        """Before each launch (after the run dir exists): e.g. more listeners."""

    def _post_launch(self, deadline: float) -> None:
        """After QMP is up and the state is RUNNING: e.g. accept qtest, `cont`."""

    def _console_tail(self) -> str:
        """The last lines the guest printed, for QemuExited (none without a guest)."""
        return ""

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it exited (negative: killed by that signal), else None."""
        if self._proc is not None and self._returncode is None:
            self._returncode = self._proc.poll()
        return self._returncode

    def start(self, timeout: float = 30.0) -> Self:
        """Launch QEMU and negotiate QMP (QEMU dials our listener) within ``timeout``."""
        if self.state is not MachineState.NEW:
            raise StateError(self.state, MachineState.NEW, f"{type(self).__name__}.start")
        deadline = time.monotonic() + timeout
        try:
            if self._logdir is None or self._qmp_socket is None:
                self.run_dir = make_private_dir("qemu")
                self._logdir = self._logdir or self.run_dir
                self._qmp_socket = self._qmp_socket or self.run_dir / "qmp.sock"
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._qmp.open_log(self.qmp_log_path)
            self._stderr_file = self.stderr_path.open("ab")
            self._launch_and_connect(deadline)
            self.state = MachineState.RUNNING
            self.sites.attach(self.pid, self.logdir / "gdb.log")
            self._post_launch(deadline)
        except BaseException:
            self.close()
            raise
        return self

    def _launch_and_connect(self, deadline: float) -> None:
        qmp_listener = self._listen(self.qmp_socket)
        self._pre_launch()
        argv = self._command()
        self.cmdline_path.write_text(format_command(argv))
        log.debug("starting %s", " ".join(argv))
        self._returncode = None

        def record(proc: subprocess.Popen[bytes]) -> None:
            self._proc = proc
            self._last_pid = proc.pid

        launch(argv, stdout=self._stderr_file, stderr=self._stderr_file, on=record)
        conn = self._accept(qmp_listener, "QMP", deadline)
        try:
            self._qmp.connect(conn, timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # qemu.qmp's ConnectError, or our timeout: QEMU hung up
            raise self._hung_up("negotiating QMP", deadline) from exc

    def _listen(self, path: Path) -> socket.socket:
        """A listening UNIX socket at ``path`` for QEMU to dial; closed once accepted."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listeners[path] = sock
        sock.bind(str(path))
        sock.listen(1)
        return sock

    def _accept(self, listener: socket.socket, what: str, deadline: float) -> socket.socket:
        """QEMU's connection to ``listener``; QemuExited at once if QEMU exits first."""
        wait_steps(
            # Readable = QEMU dialled; a short select so that QEMU's death is seen at once.
            lambda left: bool(select.select([listener], [], [], min(left, POLL_INTERVAL))[0]),
            max(0.0, deadline - time.monotonic()),
            f"QEMU connecting {what}",
            seen=lambda: f"see {self.stderr_path}",
            alive=lambda: self.check_alive(f"before connecting {what}"),
        )
        conn, _ = listener.accept()
        conn.setblocking(True)
        self._close_listener(listener)
        return conn

    def _close_listener(self, listener: socket.socket) -> None:
        for path, sock in list(self._listeners.items()):
            if sock is listener:
                del self._listeners[path]
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _hung_up(self, doing: str, deadline: float) -> TestbedError:
        """The error for QEMU closing a socket on us: its exit status and stderr when it
        exits (as it does when it refuses its configuration)."""
        self.wait_exited(max(0.1, deadline - time.monotonic()))
        return self._exit_error(f"while {doing}") or WaitTimeout(
            f"QEMU hung up while {doing} but kept running; see {self.stderr_path}"
        )

    def check_alive(self, doing: str = "unexpectedly") -> None:
        """Raise QemuExited (with exit status, stderr and console tails) if QEMU is gone."""
        if self._proc is None:
            raise StateError(self.state, MachineState.RUNNING, type(self).__name__)
        error = self._exit_error(doing)
        if error is not None:
            raise error

    def silent_site(self) -> dict[str, str]:
        """Where QEMU died of a signal that prints nothing ({}: it did not; CrashSites)."""
        return self.sites.site(self.returncode, self._last_pid)

    def _exit_error(self, doing: str) -> QemuExited | None:
        """QemuExited (with exit status, stderr and console tails) if QEMU is gone."""
        code = self.returncode
        if code is None:
            return None
        stderr = tail(self.stderr_text())
        # A segfault prints nothing: where it happened is what tells it from another one.
        site = crash_site("", self.silent_site())
        stderr += f"\ncrash site: {site}" if site else ""
        return QemuExited(
            f"QEMU exited {doing} (logs in {self.logdir})",
            returncode=code,
            stderr_tail=stderr,
            console_tail=self._console_tail(),
        )

    # -- QMP -------------------------------------------------------------------------------

    def qmp(
        self,
        cmd: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Execute a QMP command; arguments from `arguments` and/or keywords.

        Keywords cannot spell dashed names: pass those in `arguments`.
        Raises QmpCommandFailed when QEMU refuses, QemuExited when QEMU is gone.
        """
        if self.state is not MachineState.RUNNING or not self._qmp.connected:
            raise StateError(self.state, MachineState.RUNNING, f"QMP {cmd}")
        args = {**(arguments or {}), **kwargs}
        try:
            with phase(f"QMP {cmd}"):
                return self._qmp.execute(cmd, args, timeout or self.qmp_timeout)
        except ExecuteError as exc:
            raise QmpCommandFailed(cmd, args, exc.error_class, str(exc)) from exc
        except TimeoutError as exc:
            self.check_alive(f"during QMP {cmd}")
            raise WaitTimeout(
                f"QMP {cmd} got no answer in {timeout or self.qmp_timeout} s"
            ) from exc
        except Exception as exc:
            self.wait_exited(2.0)
            self.check_alive(f"during QMP {cmd}")
            raise TestbedError(f"QMP {cmd} failed: {exc!r}") from exc

    def hmp(self, text: str, timeout: float | None = None) -> str:
        """A human monitor command (`info mtree`, ...) through QMP; returns its output."""
        out = self.qmp("human-monitor-command", {"command-line": text}, timeout=timeout)
        return str(out)

    def chardev_connected(self, chardev_id: str) -> bool:
        """Whether QEMU's main loop sees socket chardev ``chardev_id`` connected.

        query-chardev names a socket chardev that is not connected "disconnected:<addr>".
        This is QEMU's own view, the one device_add acts on: a back-end's accept() can come
        before QEMU's main loop has taken the background connect in (reconnect-ms)."""
        for chardev in self.qmp("query-chardev"):
            if chardev.get("label") == chardev_id:
                return not str(chardev.get("filename", "")).startswith("disconnected:")
        raise TestbedError(f"QEMU has no chardev {chardev_id!r} (query-chardev)")

    def wait_chardev(self, chardev_id: str, *, connected: bool, timeout: float) -> float:
        """Until QEMU reports chardev ``chardev_id`` connected (or disconnected); seconds
        taken. QEMU dying meanwhile raises QemuExited at once, not a timeout."""
        started = time.monotonic()
        want = "connected" if connected else "disconnected"
        with phase(f"wait: chardev {want}"):
            wait_until(
                lambda: self.chardev_connected(chardev_id) == connected,
                timeout,
                f"chardev {chardev_id} {want} (query-chardev)",
                interval=POLL_INTERVAL,
                seen=lambda: f"see {self.qmp_log_path}",
            )
        return time.monotonic() - started

    def stderr_text(self) -> str:
        """What QEMU printed on stderr (and stdout) so far."""
        return _read_text(self.stderr_path) if self._logdir is not None else ""

    def wait_stderr(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Until QEMU's stderr matches ``pattern`` (regex); QemuExited if QEMU dies first."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        return wait_until(
            lambda: regex.search(self.stderr_text()),
            timeout,
            f"{regex.pattern!r} on QEMU's stderr",
            interval=POLL_INTERVAL,
            seen=lambda: f"see {self.stderr_path}",
            alive=lambda: self.check_alive(f"while waiting for {regex.pattern!r} on stderr"),
        )

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every QMP event received so far, oldest first (a copy)."""
        return self._qmp.events

    def wait_event(
        self, name: str, timeout: float, match: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The first not yet consumed event `name` whose data contains `match`.

        Events are collected from start, so one that arrived before this call counts.
        """

        def alive() -> None:
            if self.returncode is not None:
                self.check_alive(f"while waiting for event {name}")

        with phase(f"wait: QMP event {name}"):
            return wait_steps(
                # Woken by the event itself; at most 0.1 s apart, for QEMU's death.
                lambda remaining: self._qmp.take_event(name, match, min(remaining, 0.1)),
                timeout,
                f"QMP event {name} matching {dict(match or {})}",
                seen=lambda: f"events {self._qmp.event_names()}",
                alive=alive,
            )

    # -- QEMU's migration (testbed.snapshot saves and loads guests with it) ------------------

    def wait_migration(self, doing: str, timeout: float) -> None:
        """Until QEMU's MIGRATION event says the migration (outgoing or incoming) ended:
        completed, or failed/cancelled (raised with QEMU's reason). The caller turned the
        'events' migration capability on (testbed.snapshot does)."""
        event = self.wait_event("MIGRATION", timeout, {"status": MIGRATION_ENDS})
        status = event["data"]["status"]
        if status == "completed":
            return
        # A failed incoming migration ends QEMU (its stderr says why): that exit, once QEMU
        # is gone, is the error; the event can arrive just before it.
        if self.wait_exited(MIGRATION_EXIT_GRACE) is not None:
            self.check_alive(f"after the migration {status} while {doing}")
        last = self.qmp("query-migrate")
        reason = last.get("error-desc") or tail(self.stderr_text()) or "no reason given"
        raise TestbedError(f"migration {status} while {doing}: {reason}")

    # -- teardown --------------------------------------------------------------------------

    def wait_exited(self, timeout: float) -> int | None:
        """Give a dying QEMU up to ``timeout`` s to be reaped; its status, or None if it
        is still running."""
        if self._proc is None:
            return None
        try:
            self._returncode = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self._returncode

    def shutdown(self, timeout: float = 10.0) -> int:
        """QMP quit, then wait for QEMU to exit; QemuExited if the status is not 0."""
        if self.state is not MachineState.RUNNING:
            raise StateError(self.state, MachineState.RUNNING, f"{type(self).__name__}.shutdown")
        with contextlib.suppress(TestbedError):
            # QEMU may drop the connection before its answer arrives: the exit status is
            # the verdict.
            self.qmp("quit", timeout=timeout)
        code = self.wait_exited(timeout)
        if code is None:
            raise WaitTimeout(f"QEMU did not exit within {timeout} s after quit")
        self._qmp.disconnect()
        if code != 0:
            raise QemuExited(
                "QEMU exited badly on quit", returncode=code, stderr_tail=tail(self.stderr_text())
            )
        return code

    def _reap(self) -> None:
        """Kill the process group of QEMU if it is still there and collect its status."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._returncode = kill(proc)
        self.sites.close(self._returncode, self._last_pid)

    def close(self) -> None:
        """Idempotent: disconnect QMP, kill -9 what is left, reap, remove the sockets (and
        the run dir with the logs, when the machine made one)."""
        if self.state is MachineState.CLOSED:
            return
        self.state = MachineState.CLOSED
        # Nested finally: a Ctrl-C or SIGTERM landing in the QMP disconnect (which waits)
        # must still kill QEMU and remove its sockets before it propagates.
        try:
            self._qmp.close()
        finally:
            try:
                self._reap()
            finally:
                for listener in list(self._listeners.values()):
                    self._close_listener(listener)
                if self._stderr_file is not None:
                    self._stderr_file.close()
                    self._stderr_file = None
                if self._qmp_socket is not None:
                    with contextlib.suppress(FileNotFoundError):
                        self._qmp_socket.unlink()
                if self.run_dir is not None:
                    remove_tree(self.run_dir)
