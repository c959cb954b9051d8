"""Interruption: SIGINT / SIGTERM at each phase of `testbed exec`, and a pytest-timeout expiry
inside a scenario, leave no QEMU, no socket and no temp dir, and keep the artifacts.

Each case runs the real CLI (or pytest) as a subprocess with TESTBED_TMPDIR and
TESTBED_RESULTS pointing at directories this test owns, so "nothing left" can be checked
exactly: no process whose command line names that TESTBED_TMPDIR, an empty TESTBED_TMPDIR.
The phase is detected from the process's own -vv log lines on stderr or from the files it
writes in its run dir, never from a fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.paths import TMP_PREFIX, remove_tree

pytestmark = pytest.mark.e2e

EXIT_TIMEOUT = 30.0  # a failed teardown may spend up to 10 s collecting dmesg over SSH
PHASE_TIMEOUT = 120.0  # boot under TCG on a loaded 2-core machine
POLL = 0.005
EXPECTED_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}

GUEST_UP = re.compile(r"testbed\.vm: guest x86_64 up")
TEARING_DOWN = re.compile(r"testbed\.vm: tearing down")
QEMU_LAUNCH = re.compile(r"testbed\.machine\.qemu: starting ")


@dataclass
class Watched:
    """A child process whose stderr is read line by line on a thread, for phase detection."""

    proc: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    _new: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._new.put(raw.decode(errors="replace"))
        self._new.put(None)

    def wait_line(self, pattern: re.Pattern[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail(f"no stderr line matching {pattern.pattern!r} within {timeout} s")
            try:
                line = self._new.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.fail(f"stderr closed before a line matching {pattern.pattern!r}")
            assert line is not None
            self.lines.append(line)
            if pattern.search(line):
                return line

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll ``condition`` (a file appearing, ...) while draining stderr."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                self.fail(f"exited before {what}")
            if time.monotonic() > deadline:
                self.fail(f"{what} did not happen within {timeout} s")
            self._drain()
            time.sleep(POLL)

    def _drain(self) -> None:
        while True:
            try:
                line = self._new.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.lines.append(line)

    def _drain_until_eof(self, seconds: float) -> None:
        """Collect stderr lines until the pump thread reports EOF or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                return
            self.lines.append(line)

    def wait_exit_quietly(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._drain_until_eof(2)

    def wait_exit(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.fail(f"did not exit within {timeout} s of the signal")
        # The pump thread sees EOF once the process and its children closed stderr.
        self._drain_until_eof(5)
        return code

    def fail(self, why: str) -> None:
        if self.proc.poll() is None:
            # Started with -X faulthandler: SIGABRT dumps every thread's stack to stderr.
            self.proc.send_signal(signal.SIGABRT)
            self.wait_exit_quietly()
        self._drain()
        tail = "".join(line for line in self.lines[-400:] if "qemu.qmp" not in line)
        args = self.proc.args
        words = args if isinstance(args, list | tuple) else [args]
        pytest.fail(f"{' '.join(str(w) for w in words)}: {why}\n--- stderr ---\n{tail}")


@pytest.fixture
def tmpdir_root() -> Iterator[Path]:
    """A short TESTBED_TMPDIR of our own (sun_path holds 108 bytes; tmp_path is too long)."""
    path = Path(tempfile.mkdtemp(prefix="tbi-", dir="/tmp"))
    try:
        yield path
    finally:
        # Whatever the test found, do not let it leak into the next one; kill stragglers.
        for pid in processes_naming(path):
            os.kill(pid, signal.SIGKILL)
        remove_tree(path)


def processes_naming(path: Path) -> list[int]:
    """Live (not zombie) processes whose command line mentions ``path``."""
    needle = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def sockets_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_socket()] if path.exists() else []


def assert_nothing_left(tmp_root: Path, results: Path, output: str) -> None:
    left = processes_naming(tmp_root)
    assert left == [], f"processes naming {tmp_root} survived: {left}\n{output}"
    sockets = sockets_under(tmp_root) + sockets_under(results)
    assert sockets == [], f"sockets left: {sockets}\n{output}"
    remaining = sorted(p.name for p in tmp_root.iterdir())
    assert remaining == [], f"TESTBED_TMPDIR {tmp_root} not empty: {remaining}\n{output}"


def env_for(tmp_root: Path, results: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TESTBED_TMPDIR"] = str(tmp_root)
    env["TESTBED_RESULTS"] = str(results)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_exec(tmp_root: Path, results: Path, *command: str) -> Watched:
    argv = [
        sys.executable,
        "-X",
        "faulthandler",
        "-m",
        "testbed",
        "-vv",
        "exec",
        "--arch",
        "x86_64",
    ]
    argv += ["--region", "0=4M", "--", *command]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env_for(tmp_root, results),
    )
    return Watched(proc)


def qmp_log_has(tmp_root: Path, text: str) -> Callable[[], bool]:
    def check() -> bool:
        for log in tmp_root.glob(f"{TMP_PREFIX}vm-*/logs/qmp.log"):
            try:
                if text in log.read_text(errors="replace"):
                    return True
            except OSError:
                pass
        return False

    return check


def kept_runs(results: Path) -> list[Path]:
    return sorted((results / "failed").glob("x86_64-*"))


SIGNALS = [pytest.param(s, id=s.name) for s in (signal.SIGINT, signal.SIGTERM)]


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("phase", ["qemu-start", "guest-boot", "ssh-command", "teardown"])
def test_exec_interrupted(
    phase: str, sig: signal.Signals, tmpdir_root: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    run = start_exec(tmpdir_root, results, "sleep", "30")
    try:
        if phase == "qemu-start":
            # Logged just before QEMU is spawned: the signal lands while QEMU starts,
            # before QMP `cont`.
            run.wait_line(QEMU_LAUNCH, PHASE_TIMEOUT)
        elif phase == "guest-boot":
            # `cont` answered: the guest runs, but the ready line has not come yet.
            run.wait_for(qmp_log_has(tmpdir_root, '"return": {}'), "QMP cont", PHASE_TIMEOUT)
        else:
            run.wait_line(GUEST_UP, PHASE_TIMEOUT)
        if phase == "teardown":
            # A first Ctrl-C starts the teardown (which collects dmesg over SSH, as the run
            # failed); the signal under test lands in the middle of it.
            run.proc.send_signal(signal.SIGINT)
            run.wait_line(TEARING_DOWN, EXIT_TIMEOUT)
        run.proc.send_signal(sig)
        code = run.wait_exit(EXIT_TIMEOUT)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    text = "".join(run.lines)
    assert code == EXPECTED_STATUS[sig], f"exit status {code}, want {EXPECTED_STATUS[sig]}:\n{text}"
    if phase == "guest-boot":
        assert not GUEST_UP.search(text), "the guest was up already: phase missed"
    assert_nothing_left(tmpdir_root, results, text[-6000:])
    (kept,) = kept_runs(results)
    assert (kept / "qemu-by-hand.sh").is_file(), "artifacts written so far were not kept"
    if phase != "qemu-start":
        for name in ("qemu-cmdline.txt", "console.log", "qmp.log", "vhost-user-trace.jsonl"):
            assert (kept / name).is_file(), f"{name} not kept in {kept}"


SCENARIO = textwrap.dedent(
    """
    import threading

    import pytest

    from testbed.device import VhostUserDevice


    @pytest.fixture
    def vm(boot):
        return boot(VhostUserDevice.of({0: 4 << 20}))


    def test_blocks_forever(vm):
        print("BODY REACHED", flush=True)
        threading.Event().wait()  # an event that never comes
    """
)


def test_pytest_timeout_tears_down(tmpdir_root: Path, tmp_path: Path) -> None:
    """A scenario whose body hangs: pytest-timeout fails it; its VM is torn down the same way
    and its artifacts are kept."""
    results = tmp_path / "results"
    scenario_dir = tmp_path / "scen"
    scenario_dir.mkdir()
    (scenario_dir / "test_hang.py").write_text(SCENARIO)
    argv = [
        sys.executable, "-m", "pytest", str(scenario_dir / "test_hang.py"),
        "-p", "testbed.pytest_plugin", "-p", "no:cacheprovider", "-s", "-q",
        "--arch", "x86_64", "--rootdir", str(scenario_dir),
        # Only the body is timed: the VM boots in the fixture first, however slow the host.
        "--timeout", "3", "-o", "timeout_func_only=true", "-o", "timeout_method=signal",
    ]  # fmt: skip
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env_for(tmpdir_root, results),
        timeout=PHASE_TIMEOUT + EXIT_TIMEOUT,
        cwd=scenario_dir,
    )
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert "BODY REACHED" in out, f"the VM never came up:\n{out}"
    assert proc.returncode == 1, f"pytest exited {proc.returncode}:\n{out}"
    assert "Timeout" in out, f"not failed by pytest-timeout:\n{out}"
    assert_nothing_left(tmpdir_root, results, out[-6000:])
    kept = results / "artifacts" / "test_blocks_forever_x86_64"
    for name in ("qemu-cmdline.txt", "console.log", "qmp.log", "vhost-user-trace.jsonl"):
        assert (kept / name).is_file(), f"{name} not kept in {kept}:\n{out}"
