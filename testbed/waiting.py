"""The one way the test bed waits: for a condition, with a deadline, and a message that says
what it waited for and what it saw last.

Two forms, for the two kinds of condition there are:

- ``wait_until(check, timeout, what)``: a condition only a look can tell (a guest file, a
  console line, QEMU's answer to a QMP query). ``check`` is called, then again after
  ``interval`` (never faster than the condition can change: the caller chooses), until it
  returns something other than None or False, which is returned. ``check`` may itself block
  for up to the time it is given (``step(remaining)`` form: a select() on a socket, a
  guest-side loop), so that an event-driven wait needs no polling at all.
- ``wait_on(cond, predicate, timeout, what)``: state another thread updates under a
  ``threading.Condition`` and notifies (the back-end's and the relay's serving threads):
  no polling, woken by the change itself.

Both raise ``WaitTimeout`` naming ``what`` and, through ``seen``, what was there at the end;
``alive`` is called on every round so that a dead peer (QEMU gone) ends the wait at once
with its own error instead of a timeout. Nothing else in testbed/ writes a deadline loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from testbed.errors import WaitTimeout

T = TypeVar("T")

DEFAULT_INTERVAL = 0.05


class Deadline:
    """A point in time, and what is left of it (never negative)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.at = time.monotonic() + timeout

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at


def _timeout_error(what: str, timeout: float, seen: str | None) -> WaitTimeout:
    tail = f"; last seen: {seen}" if seen else ""
    return WaitTimeout(f"{what} did not happen within {timeout:.1f} s{tail}")


def wait_until(
    check: Callable[[], T | bool | None],
    timeout: float,
    what: str,
    *,
    interval: float = DEFAULT_INTERVAL,
    seen: Callable[[], str] | None = None,
    alive: Callable[[], object] | None = None,
) -> T:
    """Call ``check`` until it returns a value other than None/False, at most every
    ``interval`` s, for at most ``timeout`` s; returns that value. On timeout,
    WaitTimeout(what, seen()). ``check`` is always called at least once, and once more at
    the deadline, so a condition that holds when time runs out is not reported missed."""
    return wait_steps(
        lambda _remaining: check(), timeout, what, interval=interval, seen=seen, alive=alive
    )


def wait_steps(
    step: Callable[[float], T | bool | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.0,
    seen: Callable[[], str] | None = None,
    alive: Callable[[], object] | None = None,
) -> T:
    """Like wait_until, but ``step(remaining)`` may block up to ``remaining`` s itself
    (select on a socket, a guest-side wait): an event-driven wait. ``interval`` is a pause
    between steps that return at once without the condition (0: none)."""
    deadline = Deadline(timeout)
    while True:
        if alive is not None:
            alive()
        last_round = deadline.expired
        result = step(deadline.remaining())
        if result is not None and result is not False:
            return result  # type: ignore[return-value]
        if last_round or deadline.expired:
            raise _timeout_error(what, timeout, seen() if seen is not None else None)
        if interval > 0:
            time.sleep(min(interval, deadline.remaining()))  # the pause of a bounded wait


def wait_on(
    cond: threading.Condition,
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    seen: Callable[[], str] | None = None,
    alive: Callable[[], object] | None = None,
) -> None:
    """Until ``predicate()`` holds, re-checked whenever ``cond`` is notified; the caller
    must NOT hold ``cond``. ``alive`` runs under the lock on every wake-up (e.g. to raise
    the serving thread's failure); ``seen`` too, once, on timeout."""
    deadline = Deadline(timeout)
    with cond:
        while not predicate():
            if alive is not None:
                alive()
            if deadline.expired:
                raise _timeout_error(what, timeout, seen() if seen is not None else None)
            cond.wait(deadline.remaining())
