"""SSH into the guest (paramiko) with the host key pinned, commands, files, an interactive pty.

The guest's host key is generated when the image is built, so the client knows it in
advance: RejectPolicy plus that one key, no trust on first use, no known_hosts file.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import select
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import paramiko

from testbed.errors import ConfigError, GuestCommandFailed, StateError
from testbed.resource import Closeable
from testbed.waiting import wait_steps

log = logging.getLogger(__name__)

RETRY_INTERVAL = 0.1
CHUNK = 65536

# Errors of a guest that is not listening yet: QEMU's user-net accepts the TCP connection
# and resets it until dropbear listens, which paramiko reports in several ways.
_NOT_YET = (paramiko.SSHException, EOFError, OSError)


def open_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection for SSH with Nagle's algorithm off.

    Why: every request we make is a small packet that waits for an answer (channel open,
    exec, exit status). With Nagle on, each waited for the guest's delayed ACK: opening a
    channel took ~43 ms instead of ~1 ms, and every guest command paid it."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


@dataclass(frozen=True)
class CommandResult:
    stdout: bytes
    stderr: bytes
    returncode: int

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    def check(self, command: str) -> CommandResult:
        if self.returncode != 0:
            raise GuestCommandFailed(command, self.returncode, self.stdout, self.stderr)
        return self


def parse_host_key_line(line: str) -> paramiko.PKey:
    """A public key from "[host] type base64 [comment]" (authorized_keys/known_hosts style)."""
    words = line.split()
    for i, word in enumerate(words[:-1]):
        if word.startswith(("ssh-", "ecdsa-", "sk-")):
            try:
                blob = base64.b64decode(words[i + 1], validate=True)
                return paramiko.PKey.from_type_string(word, blob)
            except Exception as exc:
                raise ConfigError(
                    f"host key line {line!r} does not hold a valid {word} key: {exc}; "
                    "rebuild the guest image (`testbed images build`)"
                ) from exc
    raise ConfigError(f"host key line {line!r} has no 'ssh-<type> <base64>' key in it")


def known_host_name(host: str, port: int) -> str:
    """The name OpenSSH and paramiko look a host key up by."""
    return host if port == 22 else f"[{host}]:{port}"


def _load_client_key(path: Path) -> paramiko.PKey:
    try:
        return paramiko.Ed25519Key.from_private_key_file(str(path))
    except (OSError, paramiko.SSHException) as exc:
        raise ConfigError(
            f"cannot load the client key {path}: {exc}; rebuild the guest image"
        ) from exc


class SSHSession(Closeable):
    """One authenticated SSH connection to the guest. Use as a context manager."""

    def __init__(self, client: paramiko.SSHClient, host: str, port: int) -> None:
        self._client: paramiko.SSHClient | None = client
        self.host = host
        self.port = port

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        client_key: Path,
        host_key_line: str,
        deadline: float,
        *,
        check_alive: Callable[[], None] | None = None,
    ) -> SSHSession:
        """Connect, retrying every RETRY_INTERVAL s until `deadline` (time.monotonic()).

        `check_alive` is called before every attempt (e.g. to raise QemuExited at once
        instead of retrying against a dead VM).
        """
        logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)
        pkey = _load_client_key(client_key)
        host_key = parse_host_key_line(host_key_line)
        last: BaseException | None = None
        attempts = 0

        def attempt(remaining: float) -> SSHSession | None:
            nonlocal last, attempts
            if remaining <= 0:
                return None
            client = paramiko.SSHClient()
            client.get_host_keys().add(known_host_name(host, port), host_key.get_name(), host_key)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            attempts += 1
            sock: socket.socket | None = None
            try:
                sock = open_tcp(host, port, min(remaining, 5.0))
                client.connect(
                    host,
                    port=port,
                    sock=sock,
                    username="root",
                    pkey=pkey,
                    look_for_keys=False,
                    allow_agent=False,
                    timeout=min(remaining, 5.0),
                    banner_timeout=min(remaining, 5.0),
                    auth_timeout=min(remaining, 5.0),
                )
                log.debug("ssh %s:%d up after %d attempts", host, port, attempts)
                return cls(client, host, port)
            except paramiko.BadHostKeyException as exc:
                client.close()
                _close_quietly(sock)
                raise ConfigError(
                    f"the guest at {host}:{port} offered a host key that is not the image's: "
                    "is another VM on that port? rebuild the image if it persists"
                ) from exc
            except paramiko.AuthenticationException as exc:
                client.close()
                _close_quietly(sock)
                raise ConfigError(
                    f"the guest at {host}:{port} refused the client key {client_key}: "
                    "rebuild the guest image"
                ) from exc
            except _NOT_YET as exc:
                client.close()
                _close_quietly(sock)
                last = exc
                return None

        # Before dropbear listens, QEMU's user-net accepts and resets: retried, each try
        # bounded by what is left of the deadline.
        return wait_steps(
            attempt,
            max(0.0, deadline - time.monotonic()),
            f"an SSH session with {host}:{port}",
            interval=RETRY_INTERVAL,
            seen=lambda: f"{attempts} attempts, last error {last!r}; look at the guest console log",
            alive=check_alive,
        )

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    @property
    def transport(self) -> paramiko.Transport:
        if self._client is None:
            raise StateError("closed", "connected", "SSHSession")
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise StateError("disconnected", "connected", "SSHSession")
        return transport

    def run(
        self,
        command: str | Sequence[str],
        *,
        check: bool = False,
        timeout: float = 60.0,
        stdin: bytes | None = None,
    ) -> CommandResult:
        """Run `command` (a shell string, or argv quoted for the guest shell)."""
        text = command if isinstance(command, str) else shlex.join(command)
        chan = self.transport.open_session()
        try:
            chan.exec_command(text)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()

            def drained(remaining: float) -> bool:
                progressed = False
                while chan.recv_ready():
                    out.extend(chan.recv(CHUNK))
                    progressed = True
                while chan.recv_stderr_ready():
                    err.extend(chan.recv_stderr(CHUNK))
                    progressed = True
                if (
                    chan.exit_status_ready()
                    and (chan.eof_received or chan.closed)
                    and not chan.recv_ready()
                    and not chan.recv_stderr_ready()
                ):
                    return True
                if not progressed:
                    # Wakes on stdout data or close; stderr data is picked up on the
                    # next short round.
                    select.select([chan], [], [], min(remaining, 0.05))
                return False

            wait_steps(drained, timeout, f"guest command {text!r} to finish")
            result = CommandResult(bytes(out), bytes(err), chan.recv_exit_status())
        finally:
            chan.close()
        if check:
            result.check(text)
        return result

    def interactive(self) -> int:
        """A shell on a pty wired to our terminal (raw mode) until the guest side closes;
        the shell's exit status."""
        chan = self.transport.open_session()
        size = shutil.get_terminal_size()
        chan.get_pty(term=os.environ.get("TERM", "vt100"), width=size.columns, height=size.lines)
        chan.invoke_shell()
        fd = sys.stdin.fileno()
        out = sys.stdout.buffer
        is_tty = os.isatty(fd)
        old_winch = None
        saved = None
        if is_tty:
            import termios
            import tty

            saved = termios.tcgetattr(fd)
            tty.setraw(fd)

            def on_winch(signum: int, frame: FrameType | None) -> None:
                new = shutil.get_terminal_size()
                with contextlib.suppress(Exception):
                    chan.resize_pty(width=new.columns, height=new.lines)

            old_winch = signal.signal(signal.SIGWINCH, on_winch)
        try:
            stdin_open = True
            while True:
                readers: list[Any] = [chan, fd] if stdin_open else [chan]
                ready, _, _ = select.select(readers, [], [], 0.5)
                if chan in ready or chan.recv_ready():
                    data = chan.recv(CHUNK)
                    if not data:
                        break
                    out.write(data)
                    out.flush()
                if chan.recv_stderr_ready():
                    out.write(chan.recv_stderr(CHUNK))
                    out.flush()
                if stdin_open and fd in ready:
                    data = os.read(fd, CHUNK)
                    if data:
                        chan.sendall(data)
                    else:
                        stdin_open = False
                        chan.shutdown_write()
                if chan.closed or (chan.exit_status_ready() and not chan.recv_ready()):
                    break
            return chan.recv_exit_status()
        except OSError as exc:
            raise StateError("disconnected", "connected", f"SSH shell ({exc})") from exc
        finally:
            if saved is not None:
                import termios

                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            if old_winch is not None:
                signal.signal(signal.SIGWINCH, old_winch)
            chan.close()
