"""The one process launcher: how QEMU and the back-ends we did not write are started and
stopped, so that nothing they fork outlives the test bed.

Every child gets:
- its own process group (a Ctrl-C on the terminal reaches us, not it; we tear it down in
  order, and killpg reaches whatever it forked);
- SIGKILL when the thread that started it dies (PR_SET_PDEATHSIG: covers our abrupt
  death, SIGKILL or a crash, where no `finally` runs; the signal follows the *thread*, so
  start children from a long-lived thread, the main one in practice);
- stdin from /dev/null and no inherited fds.

Ctrl-C / SIGTERM are held back around the fork. One landing inside Popen (which runs
Python in the child for preexec_fn) was seen to get lost, or to end up as a QMP connect
failure instead of exit 130; one landing between the fork and the caller's record of the
process would leave a child nobody knows about. Held back, it is delivered right after
Popen returns, once the caller has the process (``launch`` records it through ``on``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

_PR_SET_PDEATHSIG = 1
_HELD = {signal.SIGINT, signal.SIGTERM}


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL when the starting thread dies; the default signal mask (the
    parent holds SIGINT/SIGTERM back around the fork)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back; the caller records the process *inside* the block, so a
    signal (delivered on exit, as an exception) always finds it on record."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def launch(
    argv: Sequence[str], *, stdout: Any, stderr: Any, on: Callable[[subprocess.Popen[bytes]], None]
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as described above; ``on(proc)`` runs before a held-back signal is
    delivered (the place to record the process). OSError when it cannot be started."""
    with signals_held():
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            process_group=0,
            preexec_fn=_die_with_parent,
            close_fds=True,
        )
        on(proc)
    return proc


def kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process group of ``proc`` if it still runs."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


@dataclass(frozen=True)
class Stopped:
    """How a child ended: its exit status, and whether it needed SIGKILL."""

    returncode: int
    killed: bool


def stop(proc: subprocess.Popen[bytes], grace: float) -> Stopped:
    """SIGTERM to the group, SIGKILL after ``grace`` s, reaped either way."""
    killed = False
    if proc.poll() is None:
        kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            killed = True
            kill_group(proc, signal.SIGKILL)
            proc.wait()
    return Stopped(proc.wait(), killed)


def kill(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL the group at once and reap; the exit status."""
    kill_group(proc, signal.SIGKILL)
    return proc.wait()
