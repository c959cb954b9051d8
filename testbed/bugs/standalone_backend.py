"""The vhost-user back-end of an exported repro.py, replayed (the first part of the
stand-alone template; testbed.bugs.standalone is the second).

STANDARD LIBRARY ONLY: `testbed bugs export` copies this file's text, then standalone.py's,
into repro.py (testbed.bugs.export.render_repro), for a QEMU developer who has QEMU and
Python 3 and nothing of ours.

The back-end answers the n-th front-end request of a kind with the n-th reply our back-end
sent to that kind in the recorded run (the last one again when the recording has fewer): its
header flags, size and bytes, its request code when the recording bent it, the memfds it
attached, and the messages it sent after it (an unsolicited extra REPLY_ACK). A request the
recorded back-end left unanswered ({"silent": true}) is left unanswered again. It listens on
its socket (QEMU connects), or dials QEMU's (QEMU listens: ``dial()``, again after a hang-up).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
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


def make_memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("repro", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


class ReplayBackend:
    """The vhost-user back-end, replayed (module doc)."""

    def __init__(self, path: str, spec: dict[str, Any]) -> None:
        self.path = path
        self.replies: dict[int, list[dict[str, Any] | None]] = {}
        for request, reply in spec["exchanges"]:
            self.replies.setdefault(request, []).append(reply)
        self.disconnect_at: int | None = spec.get("disconnect_at")
        self.hang_up_on_channel_close: bool = spec.get("hang_up_on_channel_close", False)
        """Close the main socket as soon as QEMU closes the back-end channel."""
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

    def dial(self, timeout: float, alive: Any) -> None:
        """Connect to QEMU's socket (QEMU listens) and serve that connection; a recorded
        back-end that came back after a hang-up dials again (a fresh conversation)."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        def connected() -> bool:
            try:
                conn.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                return False
            return True

        try:
            wait_until(connected, timeout, f"QEMU listening on {self.path}", interval=POLL,
                       alive=alive)  # fmt: skip
        except BaseException:
            conn.close()
            raise
        self.stopped = False
        self.counts.clear()
        self.conn = conn
        self.thread = threading.Thread(target=self._serve_quietly, args=(conn,), daemon=True)
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

    def _serve_quietly(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, EOFError, ValueError):
            self._serve_conn(conn)

    def _serve_conn(self, conn: socket.socket) -> None:
        while not self.stopped:
            watched = [conn]
            if self.hang_up_on_channel_close and self.channel is not None:
                watched.append(self.channel)
            ready = select.select(watched, [], [], POLL)[0]
            channel = self.channel
            if channel is not None and channel in ready and not channel.recv(1, socket.MSG_PEEK):
                conn.close()  # the recorded back-end hung up here
                return
            if conn not in ready:
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
            if reply is None:
                if flags & FLAG_NEED_REPLY:  # asked for an ack the recording has none for
                    conn.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, 8) + bytes(8))
                continue
            for message in [reply, *reply.get("then", [])]:
                if not message.get("silent"):
                    self._send(conn, request, message)

    @staticmethod
    def _send(conn: socket.socket, request: int, reply: dict[str, Any]) -> None:
        body = bytes.fromhex(reply["body"])
        head = HEADER.pack(reply.get("request", request), reply["flags"], reply["size"])
        fds = [make_memfd(4096) for _ in range(reply.get("fds", 0))]
        try:
            if fds:
                socket.send_fds(conn, [head + body], fds)
            else:
                conn.sendall(head + body)
        finally:
            for fd in fds:
                os.close(fd)

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
        except TimeoutError:
            raise
        except (OSError, EOFError) as exc:
            raise QemuGone(f"back-end channel broke: {exc}") from exc
        return int(struct.unpack("<Q", value[:8])[0]) if len(value) >= 8 else -1

    def hang_up(self) -> None:
        """Close the connection to QEMU (the back-end dies or goes away)."""
        self.stopped = True
        for sock in (self.conn, self.channel):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        if self.thread is not None:
            self.thread.join(2.0)
        self.conn = self.channel = None

    def close(self) -> None:
        self.hang_up()
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
