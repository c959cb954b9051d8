"""Signatures: how QEMU ended and where it died, in the words the known-bug registry, the
scenarios and the fuzzer all match on. Pure: text in, text out (reading the host's kernel
log is testbed.host.kernel_log's job).

- ``exit_of``: a return code as the registry spells an exit: "signal:SIGABRT", "status:1",
  "running" (no return code: QEMU did not exit).
- ``crash_site``: what tells crashes apart: the assertion QEMU printed, else the faulting
  instruction's offset in the binary (from the kernel's segfault line, ``segfault_in_log``).
- ``Evidence``: what a failed run showed, the one thing ``Bug.matches`` looks at, always put
  together by ``Evidence.gather`` (a scenario's exception, a recipe's run, a fuzz case's
  findings, a rerun scenario).
- ``KnownBugSeen``: what a scenario raises when it saw a silent misbehaviour, naming the bug.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from testbed.bugs.standalone_site import (
    SILENT_SIGNALS,
    fault_in_gdb,
    format_site,
    segfault_in_log,
)
from testbed.errors import QemuExited

__all__ = ["fault_in_gdb", "segfault_in_log"]

RUNNING = "running"
"""The exit of a QEMU that did not exit (a silent misbehaviour, a hang)."""
SILENT_EXITS = tuple(f"signal:{name}" for name in SILENT_SIGNALS)
"""Deaths that print nothing: the site (a debugger's report, or the kernel's segfault line)
is what tells them apart."""

ASSERTION = re.compile(r"(\w+): Assertion `(.+?)' failed")
"""glibc's assert(): "pci_register_bar: Assertion `is_power_of_2(size)' failed"."""
G_ASSERTION = re.compile(r"(\w+): assertion failed: \((.+?)\)")
"""GLib's g_assert(): "vub_get_features: assertion failed: (backend_features)"."""


def exit_of(returncode: int | None) -> str:
    """A Popen return code as the registry spells an exit (None: QEMU is running)."""
    if returncode is None:
        return RUNNING
    if returncode < 0:
        try:
            return f"signal:{signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal:{-returncode}"
    return f"status:{returncode}"


def exited_line(exit: str) -> str:
    """The line that stands for a crash that printed nothing (a SIGSEGV): its exit."""
    return f"QEMU exited ({exit})"


def assertion(text: str) -> re.Match[str] | None:
    """The first assertion failure in ``text`` (glibc's, else GLib's): group 1 is the
    function, group 0 the whole message."""
    return ASSERTION.search(text) or G_ASSERTION.search(text)


def crash_site(stderr: str, segfault: dict[str, str]) -> str:
    """What tells crash sites apart: the assertion, else the faulting instruction's offset
    in the binary ("qemu-system-x86_64+0x9cadd4", from the kernel's segfault line or a
    debugger's report), and where QEMU called the routine that faulted, if that lies in
    a library ("libc.so.6+0x1717c0 from qemu-system-x86_64+0x5c2ab1"), else ""."""
    found = assertion(stderr)
    if found:
        return found[0]
    return format_site(segfault)


@dataclass(frozen=True)
class Evidence:
    """What a failed run showed: the text to match (error messages, QEMU's stderr, what a
    check or an oracle saw) and how QEMU ended ("signal:SIGABRT", "status:1", "running")."""

    text: str
    exit: str = RUNNING
    bug: str | None = None
    """The registry id named by whoever saw a silent misbehaviour (a scenario raising
    KnownBugSeen, a recipe's check, the fuzzer's oracle): only such evidence can show an
    ``observable`` bug."""
    where: str | None = None
    """Where the fuzzer's case was when QEMU showed it ("<REQUEST>@<state>"); None
    elsewhere. A registry entry with ``fuzz_where`` matches only there."""

    @classmethod
    def gather(
        cls,
        texts: Iterable[str],
        ended: int | str | None = None,
        *,
        names: str | None = None,
        where: str | None = None,
    ) -> Evidence:
        """The one way evidence is put together: the texts, one per line; how QEMU ended
        (a return code, an exit already spelled by exit_of, or None: running); the bug an
        observer named; the fuzzer's place."""
        exit = ended if isinstance(ended, str) else exit_of(ended)
        return cls("\n".join(texts), exit, names, where)

    @classmethod
    def of(cls, exc: BaseException) -> Evidence:
        """Collect the evidence along an exception's chain (QemuExited keeps stderr)."""
        texts: list[str] = []
        ended: int | None = None
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            texts.append(str(current))
            if isinstance(current, QemuExited):
                texts.append(current.stderr_tail)
                if current.returncode is not None and ended is None:
                    ended = current.returncode
            current = current.__cause__ or current.__context__
        named = exc.bug if isinstance(exc, KnownBugSeen) else None
        return cls.gather(texts, ended, names=named)

    def headline(self) -> str:
        """One line for reports: the most telling stderr/error line and the exit."""
        lines = [ln.strip() for ln in self.text.splitlines() if ln.strip()]
        telling = next((ln for ln in lines if "Assertion" in ln or "assertion" in ln), None)
        telling = telling or next((ln for ln in lines if ln.startswith("crash site:")), None)
        return f"{telling or (lines[0] if lines else '(no message)')} [{self.exit}]"


class KnownBugSeen(Exception):
    """Raised by a scenario that observed a silent misbehaviour (QEMU accepted what it
    should refuse): ``bug`` names the registry entry, the message says what was seen."""

    def __init__(self, bug: str, seen: str) -> None:
        super().__init__(f"{bug}: {seen}")
        self.bug = bug
