"""The template of an exported repro.py: a stand-alone reproducer of one known QEMU bug.

STANDARD LIBRARY ONLY: `testbed bugs export` copies this file's text into repro.py with the
recorded script appended as JSON, for a QEMU developer who has QEMU and Python 3 and
nothing of ours. It plays the vhost-user back-end by replaying what our back-end answered
in the recorded run (reply per request, in order), starts QEMU without a guest (QEMU dials
our listening QMP and qtest sockets), replays the recorded QMP/qtest steps and back-end
channel requests, prints the signature when it shows and exits 0 if and only if the bug
reproduced. QEMU is killed and the temp dir removed on every path (Ctrl-C included).

The script (JSON) has: bug, title, arch, signature {stderr, exit, observable}, argv (with
"{qemu}" and "{dir}" placeholders), qtest (bool), backend {socket, exchanges
[[request, reply or null], ...], disconnect_at}, steps [{op: ...}, ...].

Standard library only but for one module: its waits go through testbed.waiting, the test
bed's one waiting helper, whose text `testbed bugs export` puts in repro.py where this file
imports it (``inline_waiting``: that module imports nothing of ours but WaitTimeout, which
becomes TimeoutError there). The generator of repro.py is testbed.bugs.export.
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
import struct
import subprocess
import sys
import tempfile
import threading
from typing import Any

from testbed.waiting import wait_steps, wait_until  # inlined into repro.py by export

HEADER = struct.Struct("<III")
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VERSION = 0x1
SET_BACKEND_REQ_FD = 21
# The per-ring front-end requests (their payload starts with the ring index, a u32).
RING_REQUESTS = {8, 9, 10, 11, 12, 13, 14, 18}
POLL = 0.02
START_TIMEOUT = 20.0
STEP_TIMEOUT = 10.0


class QemuGone(Exception):
    """QEMU exited (or closed a socket) while a step waited on it: time to judge."""


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError("peer closed")
        data += chunk
    return data


class ReplayBackend:
    """The vhost-user back-end, replayed: for the n-th request of a kind, the n-th reply
    our back-end sent to that kind (the last one again when the recording has fewer; a bare
    REPLY_ACK u64 0 when QEMU asks for an ack the recording has none for)."""

    def __init__(self, path: str, spec: dict[str, Any]) -> None:
        self.path = path
        self.replies: dict[int, list[dict[str, Any] | None]] = {}
        for request, reply in spec["exchanges"]:
            self.replies.setdefault(request, []).append(reply)
        self.disconnect_at: int | None = spec.get("disconnect_at")
        self.counts: dict[int, int] = {}
        self.rings: set[int] = set()  # ring indexes QEMU named in per-ring requests
        self.channel: socket.socket | None = None
        self.cond = threading.Condition()
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.stopped = False
        self.thread: threading.Thread | None = None

    def listen(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        assert self.listener is not None
        try:
            while not self.stopped:
                if not select.select([self.listener], [], [], POLL)[0]:
                    continue
                self.conn, _ = self.listener.accept()
                self._serve_conn(self.conn)
        except (OSError, EOFError, ValueError):
            pass  # closed under us (close_backend, teardown) or QEMU went away

    def _serve_conn(self, conn: socket.socket) -> None:
        while not self.stopped:
            if not select.select([conn], [], [], POLL)[0]:
                continue
            data, fds, _, _ = socket.recv_fds(conn, HEADER.size, 16)
            if not data:
                return
            data += _recv_exact(conn, HEADER.size - len(data))
            request, flags, size = HEADER.unpack(data)
            body = _recv_exact(conn, size) if size else b""
            if request in RING_REQUESTS and len(body) >= 4:
                self.rings.add(struct.unpack_from("<I", body)[0] & 0xFF)
            if request == SET_BACKEND_REQ_FD and fds:
                self.channel = socket.socket(fileno=fds.pop(0))
            for fd in fds:
                os.close(fd)  # memory table and vring fds: a replay does not use them
            with self.cond:
                seen = self.counts.get(request, 0)
                self.counts[request] = seen + 1
                self.cond.notify_all()
            if request == self.disconnect_at and seen == 0:
                conn.close()  # the recorded back-end closed here instead of answering
                return
            recorded = self.replies.get(request, [])
            reply = recorded[min(seen, len(recorded) - 1)] if recorded else None
            if reply is not None:
                body = bytes.fromhex(reply["body"])
                conn.sendall(HEADER.pack(request, reply["flags"], reply["size"]) + body)
            elif flags & FLAG_NEED_REPLY:
                conn.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, 8) + bytes(8))

    def wait_request(self, request: int, count: int, timeout: float, alive: Any) -> None:
        # Woken at least every POLL s: QEMU's death must end the wait (``alive``).
        def arrived(remaining: float) -> bool:
            with self.cond:
                if self.counts.get(request, 0) < count:
                    self.cond.wait(min(remaining, POLL))
                return self.counts.get(request, 0) >= count

        wait_steps(arrived, timeout, f"vhost-user request {request} x{count}", alive=alive)

    def channel_request(self, request: int, body: bytes, fds: list[int], timeout: float) -> int:
        if self.channel is None:
            raise QemuGone("no back-end channel (SET_BACKEND_REQ_FD never came)")
        header = HEADER.pack(request, VERSION | FLAG_NEED_REPLY, len(body))
        self.channel.settimeout(timeout)
        try:
            socket.send_fds(self.channel, [header + body], fds)
            reply = _recv_exact(self.channel, HEADER.size)
            _, _, size = HEADER.unpack(reply)
            value = _recv_exact(self.channel, size)
        except (OSError, EOFError) as exc:
            raise QemuGone(f"back-end channel broke: {exc}") from exc
        return int(struct.unpack("<Q", value[:8])[0]) if len(value) >= 8 else -1

    def close(self) -> None:
        self.stopped = True
        for sock in (self.conn, self.channel, self.listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        if self.thread is not None:
            self.thread.join(2.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


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


def _memfd(spec: dict[str, Any]) -> tuple[int, int]:
    """(the memfd, the fd of it that travels: itself, or one opened O_RDONLY)."""
    fd = os.memfd_create(spec.get("name", "repro"), os.MFD_CLOEXEC)
    os.ftruncate(fd, spec["size"])
    if spec.get("fill"):
        os.pwrite(fd, bytes.fromhex(spec["fill"]), 0)
    if spec.get("readonly"):
        return fd, os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    return fd, fd


def _bar4_size(qemu: Qemu, slot: int, timeout: float) -> int | None:
    reply = qemu.execute("query-pci", {}, timeout)
    for bus in reply.get("return", []):
        for dev in bus["devices"]:
            if dev["bus"] == 0 and dev["slot"] == slot and dev["function"] == 0:
                for region in dev.get("regions", []):
                    if region.get("bar") == 4:
                        return int(region["size"])
    return None


class Runner:
    """Plays the recorded steps against one QEMU."""

    def __init__(self, script: dict[str, Any], qemu: Qemu, backend: ReplayBackend) -> None:
        self.script = script
        self.qemu = qemu
        self.backend = backend
        self.results: dict[str, int] = {}
        self.memfds: dict[str, int] = {}
        self.sent: dict[str, int] = {}  # the fd that travels for each memfd
        self.observed: list[str] = []

    def run(self) -> None:
        for step in self.script["steps"]:
            getattr(self, "op_" + step["op"])(step)

    def op_connect(self, step: dict[str, Any]) -> None:
        self.qemu.connect(step.get("timeout", START_TIMEOUT))

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
        self.memfds[step["name"]], self.sent[step["name"]] = _memfd(step)

    def op_truncate(self, step: dict[str, Any]) -> None:
        os.ftruncate(self.memfds[step["memfd"]], step["size"])

    def op_channel(self, step: dict[str, Any]) -> None:
        fds = [self.sent[name] for name in step["fds"]]
        value = self.backend.channel_request(
            step["request"], bytes.fromhex(step["body"]), fds, STEP_TIMEOUT
        )
        print(f"  back-end channel request {step['request']}: QEMU answered u64 {value}")
        self.results[step["result"]] = value

    def op_close_backend(self, step: dict[str, Any]) -> None:
        self.backend.close()

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

    def op_check_bar4(self, step: dict[str, Any]) -> None:
        size = _bar4_size(self.qemu, step["slot"], STEP_TIMEOUT)
        print(f"  query-pci: BAR 4 of 00:{step['slot']:02x}.0 is {size} bytes")
        if size == step["size"]:
            self.observed.append(step["say"])

    def op_check_result(self, step: dict[str, Any]) -> None:
        if self.results.get(step["result"]) == step["equals"]:
            self.observed.append(step["say"])

    def op_check_rings(self, step: dict[str, Any]) -> None:
        print(f"  rings QEMU set up: {sorted(self.backend.rings)}")
        if any(ring >= step["queues"] for ring in self.backend.rings):
            self.observed.append(step["say"])

    def op_check_memfd(self, step: dict[str, Any]) -> None:
        now = os.pread(self.memfds[step["memfd"]], len(step["was"]) // 2, step["offset"])
        if now != bytes.fromhex(step["was"]):
            self.observed.append(step["say"])

    def close(self) -> None:
        for fd in {*self.memfds.values(), *self.sent.values()}:
            os.close(fd)
        self.memfds.clear()
        self.sent.clear()


def main(argv: list[str], script: dict[str, Any]) -> int:
    parser = argparse.ArgumentParser(description=f"Reproduce QEMU bug: {script['title']}")
    parser.add_argument("--qemu", default=f"qemu-system-{script['arch']}", help="QEMU binary")
    parser.add_argument("-v", "--verbose", action="store_true", help="print QEMU's stderr")
    args = parser.parse_args(argv)
    qemu_path = shutil.which(args.qemu) or args.qemu
    print(f"{script['bug']}: {script['title']}")
    workdir = tempfile.mkdtemp(prefix="qemu-repro-")  # 0700: our sockets live here
    qemu: Qemu | None = None
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
        # A SIGSEGV prints nothing: the exit itself is the message (the registry's words).
        stderr = qemu.stderr_text() + ("" if code is None else f"\nQEMU exited ({exit_kind})")
        if args.verbose or code is not None:
            print("  QEMU's stderr:\n" + "".join(f"    {ln}\n" for ln in stderr.splitlines()))
        reproduced = judge(script["signature"], stderr, exit_kind, runner.observed)
        sig = script["signature"]
        wanted = sig.get("stderr") or (
            f"observable: {sig['observable']}" if sig.get("observable") else "a crash"
        )
        if reproduced:
            pattern = sig.get("stderr") or "$^"
            lines = [ln for ln in stderr.splitlines() if ln.strip() and re.search(pattern, ln)]
            seen = runner.observed[0] if sig.get("observable") else (lines or [wanted])[-1]
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
        backend.close()
        shutil.rmtree(workdir, ignore_errors=True)
