"""The waiting helper: returns what the condition gave, times out with what it saw last,
stops at once when the peer is dead, and never sleeps past its deadline."""

from __future__ import annotations

import threading
import time

import pytest

from testbed.errors import QemuExited, WaitTimeout
from testbed.waiting import Deadline, wait_on, wait_steps, wait_until


def test_returns_the_first_true_value() -> None:
    values = iter([None, False, 0, "found"])
    # 0 is falsy but not False: a condition may legitimately return 0 (a count, an index).
    assert wait_until(lambda: next(values), 1.0, "x", interval=0) == 0


def test_timeout_names_what_and_what_was_seen() -> None:
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"the thing did not happen within 0\.2 s; last seen: 7"):
        wait_until(lambda: None, 0.2, "the thing", interval=0.05, seen=lambda: "7")
    assert time.monotonic() - started < 1.0


def test_checks_once_more_at_the_deadline() -> None:
    calls: list[float] = []

    def check() -> bool:
        calls.append(time.monotonic())
        return len(calls) >= 2

    # An interval longer than the timeout: one look at the start, one at the deadline.
    assert wait_until(check, 0.1, "x", interval=10.0) is True
    assert len(calls) == 2


def test_alive_ends_the_wait_with_its_own_error() -> None:
    def dead() -> None:
        raise QemuExited("QEMU", -9, "", "")

    with pytest.raises(QemuExited):
        wait_until(lambda: None, 5.0, "x", alive=dead)


def test_a_step_may_block_for_what_is_left() -> None:
    given: list[float] = []

    def step(remaining: float) -> bool:
        given.append(remaining)
        time.sleep(min(remaining, 0.05))
        return False

    with pytest.raises(WaitTimeout):
        wait_steps(step, 0.2, "x")
    assert given[0] <= 0.2 and all(r >= 0 for r in given)


def test_wait_on_is_woken_by_the_change() -> None:
    cond = threading.Condition()
    state = {"done": False}

    def later() -> None:
        time.sleep(0.05)
        with cond:
            state["done"] = True
            cond.notify_all()

    threading.Thread(target=later).start()
    started = time.monotonic()
    wait_on(cond, lambda: state["done"], 5.0, "x")
    assert time.monotonic() - started < 2.0
    with pytest.raises(WaitTimeout, match=r"never did not happen.*; last seen: nothing"):
        wait_on(cond, lambda: False, 0.05, "never", seen=lambda: "nothing")


def test_deadline_never_goes_negative() -> None:
    deadline = Deadline(0.0)
    assert deadline.expired and deadline.remaining() == 0.0
