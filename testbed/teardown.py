"""Teardown that always finishes: steps run in order, each may fail without stopping the
next, and a Ctrl-C or SIGTERM during them is deferred until everything is down.

A signal raised between two teardown steps would skip every step after it, and the run dir
and the sockets in it would outlive us. While a ``Teardown`` is open, SIGINT/SIGTERM are
recorded instead of raised; they only interrupt a step marked ``graceful`` (one that may
wait on the guest or on QEMU, and is only nice to have) and are delivered again through the
previous handler on exit, so that a second Ctrl-C still ends the program with 130 (143 for
SIGTERM), after a complete teardown. Python runs signal handlers in the main thread only:
elsewhere the deferral does nothing (the steps still all run).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class _CutShort(BaseException):
    """Raised into a graceful step by a deferred signal (a BaseException, so that no
    `except Exception` on the way swallows it)."""


class Teardown:
    """``with Teardown() as t: t.step("closing SSH", ssh.close); ...``; ``t.failed`` is set
    when a step raised or was cut short (the caller then keeps the evidence)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, failed: bool = False) -> None:
        self.failed = failed
        self.pending: list[int] = []
        self._interruptible = False
        self._saved: dict[int, Any] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)
        if self._interruptible:
            self._interruptible = False
            raise _CutShort()

    def __enter__(self) -> Teardown:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._saved[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        if not self.pending:
            return
        signum = self.pending[0]
        handler = self._saved.get(signum)
        if callable(handler):
            handler(signum, None)  # default_int_handler / the CLI's SIGTERM handler: raises
        else:
            os.kill(os.getpid(), signum)  # SIG_DFL: let it do what it would have done

    def step(self, what: str, action: Callable[[], object], graceful: bool = False) -> None:
        """Run one step; a failure is logged and marks the teardown failed. A ``graceful``
        step is skipped once a signal came, and cut short by one."""
        if graceful and self.pending:
            return  # already asked to hurry: skip what is only nice to have
        try:
            try:
                self._interruptible = graceful
                action()
            finally:
                self._interruptible = False
        except _CutShort:
            log.warning("teardown, %s: cut short by a signal", what)
            self.failed = True
        except Exception as exc:
            log.warning("teardown, %s: %s", what, exc)
            self.failed = True
