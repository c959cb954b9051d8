"""A crash's site from a debugger, for a crash that prints nothing (SIGSEGV, SIGBUS): gdb
attached to QEMU for a replay. Unlike the kernel's segfault line (testbed.host.kernel_log)
it needs no readable kernel log, is not rate-limited, and sees a SIGBUS too, which the
kernel does not log.

``Catcher(pid)`` attaches gdb (``gdb -p``: QEMU stays our child, so its exit status is
still ours to read), lets every signal through but the fatal ones, and on one of those
prints the faulting pc, the fault address, the backtrace and the mappings, then detaches:
the signal is delivered as it would have been, and QEMU dies of it. ``site()`` parses what
gdb printed (testbed.bugs.signature.fault_in_gdb): the same "binary + file offset" the
kernel logs, so both sources give one signature.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from testbed.bugs.signature import SILENT_EXITS, exit_of
from testbed.bugs.standalone_site import GDB_ATTACHED, fault_in_gdb, gdb_argv
from testbed.errors import TestbedError, WaitTimeout
from testbed.host.kernel_log import segfault_site
from testbed.process import launch, stop
from testbed.resource import Closeable
from testbed.waiting import wait_until

ATTACH_TIMEOUT = 15.0
REPORT_TIMEOUT = 10.0
"""How long gdb may take to print its report once the process died (it unwinds a stripped
binary: fast, but on a loaded host not instant)."""


def available() -> bool:
    return shutil.which("gdb") is not None


class Catcher(Closeable):
    """gdb attached to one process, for its fatal signal's site. ``start()`` returns once
    the process runs again under gdb; ``close()`` leaves nothing running."""

    def __init__(self, pid: int, log: Path) -> None:
        self.pid = pid
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Catcher:
        gdb = shutil.which("gdb")
        if gdb is None:
            raise TestbedError("gdb is not installed: no crash site without the kernel log")

        def record(proc: subprocess.Popen[bytes]) -> None:
            self.proc = proc  # before a held-back Ctrl-C: close() must find gdb

        with self.log.open("wb") as out:
            launch(gdb_argv(gdb, self.pid), stdout=out, stderr=subprocess.STDOUT, on=record)
        try:
            wait_until(
                lambda: GDB_ATTACHED in self._text(),
                ATTACH_TIMEOUT,
                f"gdb attached to {self.pid}",
                interval=0.02,
                seen=lambda: self._text()[-300:],
                alive=self._alive,
            )
        except (WaitTimeout, TestbedError):
            self.close()
            raise
        return self

    def _alive(self) -> None:
        if (
            self.proc is not None
            and self.proc.poll() is not None
            and GDB_ATTACHED not in self._text()
        ):
            raise TestbedError(f"gdb could not attach to {self.pid}: {self._text()[-300:]}")

    def _text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def site(self, timeout: float = REPORT_TIMEOUT) -> dict[str, str]:
        """The fatal signal's site once the process died of it (empty: none, or gdb did not
        report in time): binary, offset, addr, signal, and caller when the pc is outside
        the binary (a libc routine QEMU called)."""
        proc = self.proc
        if proc is None:
            return {}
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return {}
        return fault_in_gdb(self._text())

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop(proc, 2.0)


class CrashSites:
    """Where one QEMU process died of a signal that prints nothing (QemuMachine's
    ``silent_site``): gdb's report when one was attached (``wanted`` and gdb installed),
    else the kernel's segfault line (none for a SIGBUS, nor when the log cannot be read or
    the line was rate-limited). Read once, kept: gdb goes when QEMU is reaped."""

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted
        self.catcher: Catcher | None = None
        self._found: dict[str, str] | None = None

    def attach(self, pid: int | None, log: Path) -> None:
        if self.wanted and pid is not None and available():
            self.catcher = Catcher(pid, log).start()

    def site(self, returncode: int | None, pid: int | None) -> dict[str, str]:
        if returncode is None or exit_of(returncode) not in SILENT_EXITS:
            return {}
        if self._found is None:
            found = self.catcher.site() if self.catcher is not None else {}
            if not found and exit_of(returncode) == "signal:SIGSEGV":
                found = segfault_site(pid)
            self._found = found
        return self._found

    def close(self, returncode: int | None, pid: int | None) -> None:
        """The process is gone: read gdb's report (if it died of a silent signal), then
        end gdb."""
        if self.catcher is not None:
            self.site(returncode, pid)  # gdb's report, read before gdb goes
            self.catcher.close()
            self.catcher = None
