"""A vhost-user back-end we did not write (virtiofsd, qemu-storage-daemon, yours): start it
from a command template, wait for its socket, stop and reap it, keep its output.

The command is a template such as ``'virtiofsd --socket-path={socket} --shared-dir=/srv'``,
split by testbed.device.ForeignCommand (shlex, never a shell), ``{socket}`` substituted in
every word here. The process gets
its own process group and SIGKILL when the thread that started it dies, like QEMU: both
are started by testbed.process, the one launcher. It never starts QEMU: that is
testbed.machine's job.

testbed.serving is the one way the test bed puts such a back-end in front of QEMU, for
cold- and hot-plugged devices alike: the back-end, and the relay
(testbed.vhost_user.relay) listening where QEMU connects, recording and checking.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from testbed.errors import ConfigError, HostCapabilityError, TestbedError
from testbed.process import Stopped, launch, stop
from testbed.resource import Closeable
from testbed.waiting import wait_until

log = logging.getLogger(__name__)

SOCKET_PLACEHOLDER = "{socket}"
POLL_INTERVAL = 0.02


def build_argv(words: Sequence[str], socket: Path) -> list[str]:
    """The argv from a template's words (ForeignCommand.of splits a command line), with
    ``{socket}`` substituted."""
    if not any(SOCKET_PLACEHOLDER in w for w in words):
        raise ConfigError(
            f"back-end command {shlex.join(words)!r} has no {SOCKET_PLACEHOLDER}: the test "
            "bed chooses the socket path, put {socket} where the program takes it"
        )
    return [w.replace(SOCKET_PLACEHOLDER, str(socket)) for w in words]


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except FileNotFoundError:
        return False


class ForeignBackend(Closeable):
    """One foreign back-end process listening on ``socket``; stdout and stderr go to
    ``<logdir>/<name>-stdout.log`` and ``-stderr.log`` and stay there."""

    def __init__(
        self,
        command: Sequence[str],
        socket: Path,
        logdir: Path,
        *,
        name: str = "backend",
        ready_timeout: float = 15.0,
        grace: float = 5.0,
    ) -> None:
        self.socket = Path(socket)
        self.argv = build_argv(command, self.socket)
        self.stdout_path = Path(logdir) / f"{name}-stdout.log"
        self.stderr_path = Path(logdir) / f"{name}-stderr.log"
        self.ready_timeout = ready_timeout
        self.grace = grace
        self.stopped: Stopped | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def pid_file(self) -> Path:
        """virtiofsd leaves ``<socket>.pid`` next to its socket."""
        return self.socket.with_name(self.socket.name + ".pid")

    def start(self) -> ForeignBackend:
        """Start the process and wait until its socket exists. Idempotent."""
        if self._proc is not None:
            return self
        if self.socket.exists() or self.socket.is_symlink():
            raise ConfigError(f"{self.socket} already exists: the back-end would not bind it")
        try:
            self._files = [open(p, "wb") for p in (self.stdout_path, self.stderr_path)]  # noqa: SIM115

            def record(proc: subprocess.Popen[bytes]) -> None:
                self._proc = proc

            try:
                launch(self.argv, stdout=self._files[0], stderr=self._files[1], on=record)
            except OSError as exc:
                raise HostCapabilityError(
                    f"cannot start the back-end {shlex.join(self.argv)}: {exc}"
                ) from exc
            assert self._proc is not None
            log.info("back-end started (pid %d): %s", self._proc.pid, shlex.join(self.argv))
            self._wait_socket()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> ForeignBackend:
        return self.start()

    def _wait_socket(self) -> None:
        # Only stat the path: connecting to see if it listens would use up the one
        # connection back-ends like virtiofsd accept (they exit when it closes).
        proc = self._proc
        assert proc is not None

        def alive() -> None:
            code = proc.poll()
            if code is not None:
                raise TestbedError(
                    f"the back-end exited with status {code} before creating {self.socket}; "
                    f"its stderr: {self.stderr_tail()!r} ({self.stderr_path})"
                )

        # A path another process has yet to create: polled, there is no event for it.
        wait_until(
            lambda: is_socket(self.socket),
            self.ready_timeout,
            f"the back-end creating {self.socket}",
            interval=POLL_INTERVAL,
            seen=lambda: f"its stderr: {self.stderr_tail()!r} ({self.stderr_path})",
            alive=alive,
        )

    def stderr_tail(self) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-10:])

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """SIGTERM, SIGKILL after the grace, reap; remove a pid file and socket it left.
        Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self.stopped = stop(proc, self.grace)
            if self.stopped.killed:
                log.warning("back-end %d ignored SIGTERM for %.1fs: killed", proc.pid, self.grace)
        for f in self._files:
            f.close()
        self._files = []
        for leftover in (self.pid_file, self.socket):
            if leftover.is_symlink() or (leftover.exists() and not leftover.is_dir()):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    def __repr__(self) -> str:
        return f"ForeignBackend({shlex.join(self.argv)})"
