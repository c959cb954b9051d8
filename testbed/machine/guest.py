"""A QEMU with a guest: booted from a MachineConfig, its serial console read back from a
file, ssh forwarded to a host port. The process, QMP and teardown are QemuMachine's
(testbed.machine.qemu); this module adds what only a guest has.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from testbed.errors import ConsoleFailure, QemuExited
from testbed.machine.cmdline import MachineConfig, build_command
from testbed.machine.qemu import POLL_INTERVAL, QemuMachine, free_tcp_port, tail
from testbed.waiting import wait_until

log = logging.getLogger(__name__)

DEFAULT_FAILURE_PATTERNS: tuple[str, ...] = (
    "Kernel panic",
    "end Kernel panic",
    "Oops:",
    "BUG: ",
    "testbed-init: FATAL",
)
"""Console text that means the guest is lost: waits fail at once instead of timing out."""

HOSTFWD_CLASH = "Could not set up host forwarding rule"
PORT_ATTEMPTS = 4


class GuestMachine(QemuMachine):
    """A guest booted from a MachineConfig: started paused (-S), QMP, then `cont`; its
    serial console in a file; ssh forwarded to config.ssh_port. ``before_cont`` runs once
    QMP is up, before `cont` (testbed.snapshot loads a restored guest there)."""

    def __init__(
        self,
        config: MachineConfig,
        logdir: Path,
        *,
        qmp_timeout: float = 10.0,
        port_factory: Callable[[], int] = free_tcp_port,
        before_cont: Callable[[GuestMachine, float], None] | None = None,
    ) -> None:
        super().__init__(logdir, qmp_socket=config.qmp_socket, qmp_timeout=qmp_timeout)
        self.config = config
        self._port_factory = port_factory
        self.before_cont = before_cont
        self._console_buf = ""
        self._console_read = 0  # bytes of console.log consumed into _console_buf
        self._console_cursor = 0  # chars of _console_buf already matched by wait_console

    @property
    def ssh_port(self) -> int:
        return self.config.ssh_port

    @property
    def console_path(self) -> Path:
        return self.config.console_log

    def _command(self) -> list[str]:
        return build_command(self.config, paused=True, dial_qmp=True)

    def _launch_and_connect(self, deadline: float) -> None:
        """A hostfwd port taken by someone else between our probe and QEMU's bind is
        retried with a fresh port (the config's ssh_port changes accordingly)."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                super()._launch_and_connect(deadline)
                return
            except QemuExited as exc:
                if HOSTFWD_CLASH not in exc.stderr_tail or attempt + 1 == PORT_ATTEMPTS:
                    raise
                log.info("ssh port %d taken; retrying", self.config.ssh_port)
                self._reap()
                self.config = dataclasses.replace(self.config, ssh_port=self._port_factory())

    def _post_launch(self, deadline: float) -> None:
        if self.before_cont is not None:
            # e.g. testbed.snapshot.load: a restored guest is loaded before it runs.
            self.before_cont(self, max(deadline - time.monotonic(), 1.0))
        self.qmp("cont")

    def _console_tail(self) -> str:
        self._pump_console()
        return tail(self._console_buf)

    def _pump_console(self) -> None:
        try:
            with self.config.console_log.open("rb") as fh:
                fh.seek(self._console_read)
                data = fh.read()
        except FileNotFoundError:
            return
        if data:
            self._console_read += len(data)
            self._console_buf += data.decode(errors="replace")

    def skip_console(self) -> None:
        """From now on wait_console only looks at what the guest prints after this point
        (e.g. a restored guest's console holds its maker's boot: a reboot's ready line must
        be a new one)."""
        self._pump_console()
        self._console_cursor = len(self._console_buf)

    def wait_console(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        failure_patterns: Sequence[str] = DEFAULT_FAILURE_PATTERNS,
    ) -> re.Match[str]:
        """Wait for `pattern` (regex) in console output after the previous match.

        Fails at once with ConsoleFailure when a failure pattern shows up, and with
        QemuExited when QEMU exits; WaitTimeout at the deadline.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        def look() -> re.Match[str] | None:
            self._pump_console()
            text = self._console_buf
            found = regex.search(text, self._console_cursor)
            for failure in failure_patterns:
                at = text.find(failure, self._console_cursor)
                if at >= 0 and (found is None or at < found.start()):
                    raise ConsoleFailure(
                        f"guest console shows {failure!r} while waiting for "
                        f"{regex.pattern!r}; see {self.console_path}:\n"
                        + tail(text[self._console_cursor :])
                    )
            if found is not None:
                self._console_cursor = found.end()
            return found

        def alive() -> None:
            if self.returncode is not None:
                self.check_alive(f"while waiting for {regex.pattern!r} on the console")

        return wait_until(
            look,
            timeout,
            f"{regex.pattern!r} on the console",
            interval=POLL_INTERVAL,
            seen=lambda: (
                f"({self.console_path}):\n" + tail(self._console_buf[self._console_cursor :])
            ),
            alive=alive,
        )
