"""vhost-user framing over an AF_UNIX stream socket, with fds passed as SCM_RIGHTS.

The connection only frames messages: it knows nothing of what a request means. Received fds
are wrapped in :class:`OwnedFd` and closed exactly once, by whoever ends up holding them.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testbed.errors import ConfigError, PeerClosed, ProtocolError, StateError
from testbed.resource import Closeable
from testbed.vhost_user.protocol import HEADER_SIZE, MAX_FDS, MAX_PAYLOAD_SIZE, Header
from testbed.waiting import wait_steps

log = logging.getLogger(__name__)

CONNECT_RETRY = 0.02

_FD_SIZE = array.array("i").itemsize


class OwnedFd(Closeable):
    """A received fd that we own. close() is idempotent; take() hands ownership on."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def fileno(self) -> int:
        if self._fd is None:
            raise StateError("closed", "open", "fd")
        return self._fd

    def take(self) -> int:
        """Give up ownership: the caller now closes the returned fd."""
        fd = self.fileno()
        self._fd = None
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})"


def close_all(fds: Iterable[OwnedFd]) -> None:
    for fd in fds:
        fd.close()


@dataclass
class Message(Closeable):
    """One received message. The fds stay owned here until a handler takes or closes them."""

    header: Header
    body: bytes
    fds: list[OwnedFd] = field(default_factory=list)

    def close(self) -> None:
        close_all(self.fds)


class Connection(Closeable):
    """One vhost-user channel (front-end socket, or the back-end request channel)."""

    def __init__(
        self, sock: socket.socket, *, backend_channel: bool = False, name: str = ""
    ) -> None:
        self._sock: socket.socket | None = sock
        self.backend_channel = backend_channel
        self.name = name or ("backend-channel" if backend_channel else "frontend")

    @classmethod
    def from_fd(cls, fd: OwnedFd) -> Connection:
        """Wrap a received socket fd (SET_BACKEND_REQ_FD); takes ownership of it."""
        raw = fd.take()
        try:
            sock = socket.socket(fileno=raw)
        except OSError as exc:
            # A pipe or memfd where a socket belongs (found by fuzzing): the peer's error,
            # not ours -- and the fd is still ours to close.
            os.close(raw)
            raise ProtocolError(f"SET_BACKEND_REQ_FD: the fd is not a socket ({exc})") from exc
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise ProtocolError("SET_BACKEND_REQ_FD: the fd is not an AF_UNIX stream socket")
        return cls(sock, backend_channel=True)

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise StateError("closed", "open", f"connection {self.name}")
        return self._sock

    @property
    def closed(self) -> bool:
        return self._sock is None

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def send(
        self,
        header: Header,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        allow_size_mismatch: bool = False,
    ) -> None:
        """Send header + payload in one go, fds attached to the first byte.

        ``allow_size_mismatch`` is for fault injection only (a truncated payload).
        """
        if header.size != len(payload) and not allow_size_mismatch:
            raise ProtocolError(
                f"header says {header.size} payload bytes, sending {len(payload)}", payload
            )
        if len(fds) > MAX_FDS:
            raise ProtocolError(f"{len(fds)} fds in one message, the limit is {MAX_FDS}")
        data = header.pack() + payload
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        try:
            sent = self.sock.sendmsg([data], ancillary)
            if sent < len(data):
                # The fds went with the first chunk; the rest is plain data.
                self.sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerClosed(f"{self.name}: peer closed while we were sending") from exc

    def _recv_exact(self, count: int, fds: list[OwnedFd], what: str) -> bytes:
        buf = bytearray()
        while len(buf) < count:
            try:
                data, ancdata, msg_flags, _ = self.sock.recvmsg(
                    count - len(buf), socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
                )
            except ConnectionResetError as exc:
                raise PeerClosed(f"{self.name}: connection reset by peer") from exc
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % _FD_SIZE
                    fds.extend(OwnedFd(fd) for fd in array.array("i", cdata[:usable]))
            if msg_flags & socket.MSG_CTRUNC:
                raise ProtocolError(
                    f"{self.name}: more than {MAX_FDS} fds attached to one message "
                    "(control data truncated)",
                    bytes(buf + data),
                )
            if not data:
                if not buf and what == "header":
                    raise PeerClosed(f"{self.name}: peer closed the connection")
                raise ProtocolError(
                    f"{self.name}: peer closed in the middle of a {what} "
                    f"({len(buf)} of {count} bytes)",
                    bytes(buf),
                )
            buf += data
        return bytes(buf)

    def recv(self, *, strict: bool = True) -> Message:
        """Read exactly one message. PeerClosed on a clean EOF between messages.

        ``strict=False``: whatever its request code, version or flags (the relay passes on
        what it cannot name: the peer may know it); only a size beyond MAX_PAYLOAD_SIZE
        stays fatal, as no peer frames such a message and the stream is lost."""
        fds: list[OwnedFd] = []
        try:
            raw = self._recv_exact(HEADER_SIZE, fds, "header")
            if strict:
                header = Header.unpack(raw, backend_channel=self.backend_channel)
            else:
                header = Header(*Header.FORMAT.unpack(raw))
                if header.size > MAX_PAYLOAD_SIZE:
                    raise ProtocolError(
                        f"{self.name}: payload size {header.size} exceeds {MAX_PAYLOAD_SIZE}",
                        bytes(raw),
                    )
            body = self._recv_exact(header.size, fds, "payload") if header.size else b""
        except BaseException:
            close_all(fds)
            raise
        return Message(header, body, fds)

    def shutdown(self) -> None:
        """Wake any thread blocked in recv() on this connection (it sees EOF)."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class Listener(Closeable):
    """A listening UNIX socket (QEMU connects as client). Removes its path on close()."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        parent_mode = self.path.parent.stat().st_mode
        if parent_mode & 0o077:
            raise ConfigError(
                f"socket directory {self.path.parent} is mode {stat.S_IMODE(parent_mode):o}; "
                "vhost-user sockets belong in a 0700 directory (paths.make_private_dir)"
            )
        if self.path.exists() or self.path.is_symlink():
            raise ConfigError(f"socket path {self.path} already exists; remove it or pick another")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            sock.listen(1)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {self.path}: {exc}") from exc
        self._sock: socket.socket | None = sock

    def fileno(self) -> int:
        if self._sock is None:
            raise StateError("closed", "listening", f"listener {self.path}")
        return self._sock.fileno()

    def accept(self) -> Connection:
        if self._sock is None:
            raise StateError("closed", "listening", f"listener {self.path}")
        sock, _ = self._sock.accept()
        sock.setblocking(True)
        return Connection(sock)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def connect(
    path: Path, timeout: float, cancelled: Callable[[float], bool] | None = None
) -> Connection:
    """Connect to a listening UNIX socket (QEMU's chardev server=on), retrying until it
    exists and accepts, or the deadline passes.

    ``cancelled(seconds)`` waits up to that long between attempts and returns True to give
    up (e.g. ``threading.Event.wait`` of a stop event); default: a short bounded nap.
    """
    last: list[OSError] = []

    def attempt(_remaining: float) -> Connection | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
            return Connection(sock)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            last[:] = [exc]
        except OSError:
            sock.close()
            raise
        # Polling a socket path that another process has yet to create: a short, bounded nap.
        if cancelled is not None and cancelled(CONNECT_RETRY):
            raise PeerClosed(f"connecting to {path} was cancelled")
        return None

    return wait_steps(
        attempt,
        timeout,
        f"a connection to {path}",
        interval=0.0 if cancelled is not None else CONNECT_RETRY,
        seen=lambda: (
            f"{last[0] if last else 'no attempt'}; is QEMU listening there "
            "(chardev socket server=on)?"
        ),
    )
