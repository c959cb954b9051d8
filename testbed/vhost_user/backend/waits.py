"""What Backend's serving thread observed, and waits on it, each with a deadline (mixed
into Backend, whose thread updates the state under ``_cond`` and notifies)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from testbed.errors import TestbedError, WaitTimeout
from testbed.vhost_user.backend.dispatch import Dispatcher
from testbed.vhost_user.backend.session import DisconnectKind, Session
from testbed.vhost_user.protocol import Request
from testbed.vhost_user.rules import Violation


class Waits:
    socket_path: Path
    _cond: threading.Condition
    _thread: threading.Thread | None
    _session: Session | None
    _sessions: int  # connections accepted so far
    _disconnects: list[DisconnectKind]
    _seen: list[Request]
    _failure: BaseException | None
    _dispatcher: Dispatcher

    @property
    def running(self) -> bool:
        """The serving thread is alive (False before start() and after close())."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._session is not None

    @property
    def requests_seen(self) -> list[Request]:
        """Every front-end request received, all connections, in order."""
        with self._cond:
            return list(self._seen)

    @property
    def violations(self) -> list[Violation]:
        """Every request QEMU sent against the spec's rules (testbed.vhost_user.rules), in order."""
        with self._cond:
            return list(self._dispatcher.violations)

    @property
    def session(self) -> Session | None:
        return self._session

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                if self._failure is not None:
                    raise TestbedError(f"back-end thread failed: {self._failure}") from (
                        self._failure
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = ", ".join(r.name for r in self._seen[-12:]) or "nothing"
                    raise WaitTimeout(
                        f"back-end on {self.socket_path}: {what} did not happen within "
                        f"{timeout:.1f}s (last requests seen: {seen}); check that QEMU is "
                        "running and attached to this socket"
                    )
                self._cond.wait(remaining)

    def wait_connected(self, timeout: float, count: int = 1) -> None:
        """Until ``count`` connections have been accepted in total."""
        self._wait(lambda: self._sessions >= count, timeout, f"connection #{count}")

    def wait_for_request(self, request: Request, timeout: float, count: int = 1) -> None:
        """Until ``request`` has arrived ``count`` times in total (all connections)."""
        self._wait(lambda: self._seen.count(request) >= count, timeout, f"{request.name} x{count}")

    def wait_disconnected(self, timeout: float, count: int = 1) -> DisconnectKind:
        """Until ``count`` connections have ended; returns how the last of them ended."""
        self._wait(lambda: len(self._disconnects) >= count, timeout, f"disconnect #{count}")
        with self._cond:
            return self._disconnects[count - 1]

    def wait_driver_ok(self, timeout: float) -> None:
        """Until the current connection's device was started (the guest set DRIVER_OK)."""
        self._wait(
            lambda: self._session is not None and self._session.driver_ok,
            timeout,
            "DRIVER_OK (vhost device start)",
        )
