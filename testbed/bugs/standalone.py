"""The template of an exported repro.py: a stand-alone reproducer of one known QEMU bug
(the last of its three parts: testbed.bugs.standalone_site, where a silent crash happened;
testbed.bugs.standalone_backend, the replayed back-end; this, the steps and the verdict).

STANDARD LIBRARY ONLY: `testbed bugs export` copies the three files' text into repro.py
with the recorded script appended as JSON, for a QEMU developer who has QEMU and Python 3
and nothing of ours. It plays the vhost-user back-end by replaying what our back-end
answered in the recorded run (reply per request, in order), starts QEMU without a guest
(QEMU dials our listening QMP and qtest sockets), replays the recorded QMP/qtest steps,
the back-end's channel requests and what it did to its files, prints the signature when it
shows and exits 0 if and only if the bug reproduced. A crash that prints nothing is told
apart by its site: gdb attached to QEMU when gdb is installed, else the kernel's log. QEMU
is killed and the temp dir removed on every path (Ctrl-C included).

The script (JSON) has: bug, title, arch, signature {stderr, exit, observable}, argv (with
"{qemu}" and "{dir}" placeholders), qtest (bool), backend {socket, exchanges
[[request, reply or null], ...], disconnect_at}, steps [{op: ...}, ...].

Standard library only but for one module: the waits (here and in standalone_backend) go
through testbed.waiting, the test bed's one waiting helper, whose text `testbed bugs
export` puts in repro.py where standalone_backend imports it (``inline_waiting``: that
module imports nothing of ours but WaitTimeout, which becomes TimeoutError there). The
generator of repro.py is testbed.bugs.export.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any

# -- inlined into repro.py: begin (render_repro puts the two files' text here instead)
from testbed.bugs.standalone_backend import (
    POLL,
    START_TIMEOUT,
    STEP_TIMEOUT,
    QemuGone,
    ReplayBackend,
    make_memfd,
)
from testbed.bugs.standalone_site import (
    GDB_ATTACHED,
    SILENT_SIGNALS,
    fault_in_gdb,
    format_site,
    gdb_argv,
    segfault_in_log,
)
from testbed.waiting import wait_steps, wait_until  # inlined into repro.py by export

# -- inlined into repro.py: end


class Qemu:
    """QEMU dialing our QMP (and qtest) listeners; its stderr in a file."""

    def __init__(self, argv: list[str], workdir: str, qtest: bool) -> None:
        self.workdir = workdir
        self.stderr_path = os.path.join(workdir, "qemu-stderr.log")
        self.listeners = {"qmp": self._listen("qmp.sock")}
        if qtest:
            self.listeners["qtest"] = self._listen("qtest.sock")
        self.stderr = open(self.stderr_path, "wb")  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self.stderr,
            stderr=self.stderr,
            start_new_session=True,  # its own group: killpg reaches anything it forks
        )
        self.qmp: socket.socket | None = None
        self.qmp_buf = b""
        self.qtest: socket.socket | None = None
        self.qtest_buf = b""

    def _listen(self, name: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(os.path.join(self.workdir, name))
        sock.listen(1)
        return sock

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise QemuGone(f"QEMU exited ({exit_text(self.proc.returncode)})")

    def accept(self, what: str, timeout: float) -> socket.socket:
        listener = self.listeners[what]
        wait_steps(
            lambda left: bool(select.select([listener], [], [], min(left, POLL))[0]),
            timeout,
            f"QEMU connecting {what}",
            alive=self.alive,
        )
        conn, _ = listener.accept()
        return conn

    def connect(self, timeout: float) -> None:
        self.qmp = self.accept("qmp", timeout)
        self._qmp_message(timeout)  # the greeting
        self.execute("qmp_capabilities", {}, timeout)
        if "qtest" in self.listeners:
            self.qtest = self.accept("qtest", timeout)

    def _read_line(self, sock: socket.socket, buf: bytes, timeout: float) -> tuple[bytes, bytes]:
        got = [buf]

        def line_in(left: float) -> bool:
            if b"\n" in got[0]:
                return True
            if not select.select([sock], [], [], min(left, POLL))[0]:
                return False
            try:
                data = sock.recv(65536)
            except OSError:  # reset: QEMU died with the socket open
                data = b""
            if not data:
                self.wait_exit(2.0)
                raise QemuGone("QEMU closed the socket")
            got[0] += data
            return b"\n" in got[0]

        wait_steps(line_in, timeout, "an answer from QEMU", alive=self.alive)
        line, _, rest = got[0].partition(b"\n")
        return line, rest

    def _qmp_message(self, timeout: float) -> dict[str, Any]:
        assert self.qmp is not None
        line, self.qmp_buf = self._read_line(self.qmp, self.qmp_buf, timeout)
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, cmd: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """{"return": ...} or {"error": ...}; events are skipped."""
        assert self.qmp is not None
        self.qmp.sendall(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        while True:
            message = self._qmp_message(timeout)
            if "return" in message or "error" in message:
                return message

    def qtest_command(self, line: str, timeout: float) -> str:
        assert self.qtest is not None
        self.qtest.sendall(line.encode() + b"\n")
        while True:
            reply, self.qtest_buf = self._read_line(self.qtest, self.qtest_buf, timeout)
            text = reply.decode()
            if not text.startswith("IRQ"):  # asynchronous IRQ notifications
                return text

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr_text(self) -> str:
        with open(self.stderr_path, errors="replace") as fh:
            return fh.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for sock in (self.qmp, self.qtest, *self.listeners.values()):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self.stderr.close()


def exit_text(returncode: int | None) -> str:
    """How QEMU ended, as the registry spells it: signal:SIGABRT, status:1, running."""
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"signal:{signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal:{-returncode}"
    return f"status:{returncode}"


def judge(signature: dict[str, str], stderr: str, exit_kind: str, observed: list[str]) -> bool:
    """The bug showed: its stderr pattern (and exit, unless "any") for a crash or an error
    message; its observable pattern in what the checks saw for a silent acceptance."""
    if signature.get("observable"):
        return any(re.search(signature["observable"], text) for text in observed)
    # An empty pattern (a segfault prints nothing) leaves the exit alone to decide.
    if not re.search(signature.get("stderr") or "", stderr):
        return False
    return signature.get("exit", "any") in ("any", exit_kind)


def _fd(spec: dict[str, Any], workdir: str) -> tuple[int, int]:
    """The fd a step names (sent to QEMU) and a read-write handle on its file (-1: none):
    a memfd, one reopened read-only, or an O_PATH fd."""
    fill = bytes.fromhex(spec.get("fill", ""))
    kind = spec.get("kind", "memfd")
    if kind == "opath":
        return os.open(workdir, os.O_PATH | os.O_CLOEXEC), -1
    handle = make_memfd(spec["size"], fill)
    if kind == "rofd":
        return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC), handle
    return handle, os.dup(handle)


def _bar4_size(qemu: Qemu, slot: int, timeout: float) -> int | None:
    reply = qemu.execute("query-pci", {}, timeout)
    for bus in reply.get("return", []):
        for dev in bus["devices"]:
            if dev["bus"] == 0 and dev["slot"] == slot and dev["function"] == 0:
                for region in dev.get("regions", []):
                    if region.get("bar") == 4:
                        return int(region["size"])
    return None


NO_ANSWER = -2
CLOSED = -1


class Runner:
    """Plays the recorded steps against one QEMU."""

    def __init__(self, script: dict[str, Any], qemu: Qemu, backend: ReplayBackend) -> None:
        self.script = script
        self.qemu = qemu
        self.backend = backend
        self.results: dict[str, int] = {}
        self.fds: dict[str, tuple[int, int]] = {}  # name -> (sent, handle)
        self.counts: dict[str, int] = {}
        self.observed: list[str] = []

    def run(self) -> None:
        for step in self.script["steps"]:
            getattr(self, "op_" + step["op"])(step)

    def op_connect(self, step: dict[str, Any]) -> None:
        self.qemu.connect(step.get("timeout", START_TIMEOUT))

    def op_dial(self, step: dict[str, Any]) -> None:
        self.backend.dial(step.get("timeout", START_TIMEOUT), self.qemu.alive)

    def op_qmp(self, step: dict[str, Any]) -> None:
        reply = self.qemu.execute(step["cmd"], step.get("args", {}), STEP_TIMEOUT)
        print(f"  QMP {step['cmd']}: {json.dumps(reply)[:200]}")

    def op_qtest(self, step: dict[str, Any]) -> None:
        for line in step["lines"]:
            reply = self.qemu.qtest_command(line, STEP_TIMEOUT)
            if not reply.startswith("OK"):
                raise QemuGone(f"qtest {line!r}: {reply}")

    def op_wait_request(self, step: dict[str, Any]) -> None:
        self.backend.wait_request(
            step["request"], step["count"], step.get("timeout", STEP_TIMEOUT), self.qemu.alive
        )

    def op_memfd(self, step: dict[str, Any]) -> None:
        self.op_fd(step)

    def op_fd(self, step: dict[str, Any]) -> None:
        self.fds[step["name"]] = _fd(step, self.qemu.workdir)

    def op_file(self, step: dict[str, Any]) -> None:
        """The back-end acts on its file: "truncate:N" / "extend:N"."""
        what, _, size = step["do"].partition(":")
        if what in ("truncate", "extend"):
            os.ftruncate(self.fds[step["name"]][1], int(size))
        print(f"  the back-end's file {step['name']}: {step['do']}")

    def op_channel(self, step: dict[str, Any]) -> None:
        fds = [self.fds[name][0] for name in step["fds"]]
        body = bytes.fromhex(step["body"])
        timeout = step.get("timeout", STEP_TIMEOUT)
        try:
            value = self.backend.channel_request(step["request"], body, fds, timeout)
        except TimeoutError:
            if not step.get("may_fail"):
                raise
            value = NO_ANSWER
        except QemuGone:
            if not step.get("may_fail") or self.qemu.proc.poll() is not None:
                raise
            value = CLOSED
        words = {NO_ANSWER: "no answer", CLOSED: "QEMU closed the channel"}
        said = words.get(value, f"QEMU answered u64 {value}")
        print(f"  back-end channel request {step['request']}: {said}")
        self.results[step["result"]] = value

    def op_close_backend(self, step: dict[str, Any]) -> None:
        self.backend.hang_up()

    def op_wait_exit(self, step: dict[str, Any]) -> None:
        self.qemu.wait_exit(step.get("timeout", STEP_TIMEOUT))

    def op_wait_stderr(self, step: dict[str, Any]) -> None:
        wait_until(
            lambda: re.search(step["pattern"], self.qemu.stderr_text()),
            step.get("timeout", STEP_TIMEOUT),
            f"{step['pattern']!r} on QEMU's stderr",
            interval=POLL,
            alive=self.qemu.alive,
        )

    def op_count_fds(self, step: dict[str, Any]) -> None:
        self.counts[step["name"]] = len(os.listdir(f"/proc/{self.qemu.proc.pid}/fd"))

    def op_check_bar4(self, step: dict[str, Any]) -> None:
        size = _bar4_size(self.qemu, step["slot"], STEP_TIMEOUT)
        print(f"  query-pci: BAR 4 of 00:{step['slot']:02x}.0 is {size} bytes")
        if size == step["size"]:
            self.observed.append(step["say"])

    def op_check_device(self, step: dict[str, Any]) -> None:
        reply = self.qemu.execute("query-pci", {}, STEP_TIMEOUT)
        slots = [d["slot"] for bus in reply.get("return", []) for d in bus["devices"]]
        print(
            f"  query-pci: {'a' if step['slot'] in slots else 'no'} device at slot {step['slot']}"
        )
        if step["slot"] in slots:
            self.observed.append(step["say"])

    def op_check_result(self, step: dict[str, Any]) -> None:
        if self.results.get(step["result"]) == step["equals"]:
            self.observed.append(step["say"])

    def op_check_rings(self, step: dict[str, Any]) -> None:
        print(f"  rings QEMU set up: {sorted(self.backend.rings)}")
        if any(ring >= step["queues"] for ring in self.backend.rings):
            self.observed.append(step["say"])

    def op_check_memfd(self, step: dict[str, Any]) -> None:
        handle = self.fds[step["memfd"]][1]
        now = os.pread(handle, len(step["was"]) // 2, step["offset"])
        if now != bytes.fromhex(step["was"]):
            self.observed.append(step["say"])

    def op_check_file_size(self, step: dict[str, Any]) -> None:
        size = os.fstat(self.fds[step["name"]][1]).st_size
        print(f"  the back-end's file {step['name']} is {size} bytes (was {step['size']})")
        if size != step["size"]:
            self.observed.append(step["say"])

    def op_check_fds_grew(self, step: dict[str, Any]) -> None:
        before = self.counts[step["since"]]

        def count() -> int:
            return len(os.listdir(f"/proc/{self.qemu.proc.pid}/fd"))

        try:  # a close in flight may take a moment
            wait_until(lambda: count() <= before, 0.3, "QEMU's fds settling", interval=POLL)
        except TimeoutError:
            print(f"  QEMU's fds: {before} -> {count()}")
            self.observed.append(step["say"])

    def op_check_qmp_silent(self, step: dict[str, Any]) -> None:
        try:
            self.qemu.execute("query-status", {}, step["timeout"])
        except TimeoutError:
            if self.qemu.proc.poll() is None:
                print(f"  QMP silent for {step['timeout']} s")
                self.observed.append(step["say"])

    def close(self) -> None:
        for sent, handle in self.fds.values():
            for fd in (sent, handle):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self.fds.clear()


class Gdb:
    """gdb attached to QEMU: where a crash that prints nothing happened (the same "binary +
    offset" the kernel logs). Optional: without gdb, the kernel's log is read instead."""

    def __init__(self, pid: int, workdir: str) -> None:
        self.log = os.path.join(workdir, "gdb.log")
        self.proc: subprocess.Popen[bytes] | None = None
        gdb = shutil.which("gdb")
        if gdb is None:
            return
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                gdb_argv(gdb, pid), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        proc = self.proc
        try:
            wait_until(lambda: GDB_ATTACHED in self.text() or proc.poll() is not None, 15.0,
                       "gdb attaching", interval=POLL)  # fmt: skip
        except TimeoutError:
            self.close()
            return
        if proc.poll() is not None:
            self.close()

    def text(self) -> str:
        with open(self.log, errors="replace") as fh:
            return fh.read()

    def site(self) -> dict[str, str]:
        if self.proc is None:
            return {}
        try:
            self.proc.wait(10.0)
        except subprocess.TimeoutExpired:
            return {}
        return fault_in_gdb(self.text())

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc is not None:
            proc.wait()


def silent_site(pid: int, gdb: Gdb | None) -> str:
    """The site of a crash that printed nothing: gdb's report, else the kernel's line."""
    found = gdb.site() if gdb is not None else {}
    if not found:
        try:
            log = subprocess.run(
                ["dmesg"], capture_output=True, text=True, timeout=5.0, check=False
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            log = ""
        found = segfault_in_log(log, pid)
    return format_site(found)


def main(argv: list[str], script: dict[str, Any]) -> int:
    parser = argparse.ArgumentParser(description=f"Reproduce QEMU bug: {script['title']}")
    parser.add_argument("--qemu", default=f"qemu-system-{script['arch']}", help="QEMU binary")
    parser.add_argument("-v", "--verbose", action="store_true", help="print QEMU's stderr")
    args = parser.parse_args(argv)
    qemu_path = shutil.which(args.qemu) or args.qemu
    print(f"{script['bug']}: {script['title']}")
    # A bug that depends on a race gets a few tries, each with a fresh QEMU (and says so).
    attempts = script.get("attempts", 1)
    for attempt in range(1, attempts + 1):
        if attempts > 1:
            print(f"attempt {attempt} of {attempts}")
        code = reproduce(script, qemu_path, args.verbose)
        if code != 1:
            return code
    return 1


def reproduce(script: dict[str, Any], qemu_path: str, verbose: bool) -> int:
    """One run: 0 when the bug showed, 1 when it did not, 130 on Ctrl-C."""
    workdir = tempfile.mkdtemp(prefix="qemu-repro-")  # 0700: our sockets live here
    qemu: Qemu | None = None
    gdb: Gdb | None = None
    backend = ReplayBackend(os.path.join(workdir, script["backend"]["socket"]), script["backend"])
    runner: Runner | None = None
    # SIGTERM as an exception, so the `finally` below kills QEMU and removes the dir.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if script["backend"].get("listen", True):
            backend.listen()
        words = [w.replace("{qemu}", qemu_path).replace("{dir}", workdir) for w in script["argv"]]
        print("  $ " + " ".join(words))
        qemu = Qemu(words, workdir, script["qtest"])
        runner = Runner(script, qemu, backend)
        silent = script["signature"].get("exit", "").removeprefix("signal:") in SILENT_SIGNALS
        gdb = Gdb(qemu.proc.pid, workdir) if silent else None
        try:
            runner.run()
        except QemuGone as exc:
            print(f"  {exc}")
        except OSError as exc:  # a socket to QEMU broke: QEMU is going (or gone)
            print(f"  QEMU's socket broke: {exc}")
        except TimeoutError as exc:
            print(f"  step timed out: {exc}")
        # A crash may still be on its way (abort after the step's answer): give it a moment.
        crash = not script["signature"].get("observable")
        code = qemu.wait_exit(2.0) if crash else qemu.proc.poll()
        exit_kind = exit_text(code)
        # A SIGSEGV prints nothing: the exit itself is the message (the registry's words),
        # and where it happened.
        stderr = qemu.stderr_text() + ("" if code is None else f"\nQEMU exited ({exit_kind})")
        if code is not None and exit_kind.removeprefix("signal:") in SILENT_SIGNALS:
            site = silent_site(qemu.proc.pid, gdb)
            stderr += (
                f"\ncrash site: {site}" if site else "\ncrash site: unknown (no gdb, no kernel log)"
            )
        if verbose or code is not None:
            print("  QEMU's stderr:\n" + "".join(f"    {ln}\n" for ln in stderr.splitlines()))
        reproduced = judge(script["signature"], stderr, exit_kind, runner.observed)
        sig = script["signature"]
        wanted = sig.get("stderr") or (
            f"observable: {sig['observable']}" if sig.get("observable") else "a crash"
        )
        if reproduced:
            pattern = sig.get("stderr") or "$^"
            lines = [ln for ln in stderr.splitlines() if ln.strip() and re.search(pattern, ln)]
            shown = [o for o in runner.observed if re.search(sig.get("observable") or "$^", o)]
            tail = [ln for ln in stderr.splitlines() if ln.strip()][-2:]
            seen = shown[0] if shown else " / ".join(lines[-1:] or tail or [wanted])
            print(f"REPRODUCED: {seen} [QEMU {exit_kind}]")
            return 0
        print(f"NOT REPRODUCED: wanted {wanted} [{sig.get('exit', 'any')}]; QEMU {exit_kind}")
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if runner is not None:
            runner.close()
        if qemu is not None:
            qemu.close()
        if gdb is not None:
            gdb.close()
        backend.close()
        shutil.rmtree(workdir, ignore_errors=True)
