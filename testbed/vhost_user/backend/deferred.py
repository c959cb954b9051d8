"""A worker thread for what the serving thread must not wait for itself.

The case it exists for: a device model maps its memory (SHMEM_MAP) when the device starts.
The start happens while QEMU is inside vhost_dev_start, sending requests with need_reply
and blocking on each answer; QEMU reads the back-end channel only from its main loop, after
vhost_dev_start returns -- and a SHMEM_MAP makes QEMU send a new SET_MEM_TABLE to the
serving thread before it answers. If the serving thread sent the map and waited, QEMU and
it would each wait for the other. Deferred to this worker, the map goes out at once and
its reply comes whenever QEMU gets to it, with the serving thread free to answer QEMU.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from testbed.resource import Closeable

log = logging.getLogger(__name__)

_STOP = None
STOP_TIMEOUT = 10.0


class Deferred(Closeable):
    """Runs submitted actions one at a time, in order, on one lazily started thread.

    ``on_done`` runs after each action (the back-end wakes its waiters). An action that
    raises is logged and kept in ``failures``; the worker goes on with the next.
    """

    def __init__(self, on_done: Callable[[], None], name: str = "vhost-user-deferred") -> None:
        self._on_done = on_done
        self._name = name
        self._queue: queue.SimpleQueue[tuple[str, Callable[[], None]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False
        self.failures: list[tuple[str, BaseException]] = []

    @property
    def pending(self) -> int:
        """Actions submitted and not finished yet."""
        with self._lock:
            return self._pending

    def submit(self, what: str, action: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                log.warning("deferred action %r dropped: the back-end is closing", what)
                return
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put((what, action))

    def _run(self) -> None:
        # Blocks until an action or close()'s stop marker comes: idle, not a wait on QEMU.
        while (item := self._queue.get()) is not _STOP:
            what, action = item
            try:
                action()
            except Exception as exc:
                log.exception("deferred action %r failed", what)
                self.failures.append((what, exc))
            finally:
                with self._lock:
                    self._pending -= 1
                self._on_done()

    def close(self) -> None:
        """Stop after the actions already submitted; wait up to STOP_TIMEOUT for them (the
        caller first closes what they may be blocked on). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            log.error(
                "%s did not stop within %.0f s (an action is stuck)", self._name, STOP_TIMEOUT
            )
