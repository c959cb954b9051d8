"""The end of QEMU's vhost-user socket on our side: what our back-end and the relay share.

Both listen on a UNIX socket in a 0700 dir, serve QEMU from one thread, record a trace,
judge what they see against the spec (``violations``) and let the caller wait, with a
deadline, on what the thread observed: connections, requests, disconnects. This base owns
that skeleton; a subclass supplies the serving loop (``_serve``) and how a session ends
(``_drop_session``). One typed interface for the pytest plugin, the VM and the scenarios:
they never need to know which of the two they hold.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Self

from testbed.errors import StateError, TestbedError
from testbed.profile import phase
from testbed.resource import Closeable
from testbed.vhost_user.codes import Request
from testbed.vhost_user.connection import Listener
from testbed.vhost_user.trace import Trace, TraceEntry
from testbed.waiting import wait_on

if TYPE_CHECKING:
    from testbed.vhost_user.rules import Violation

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0


class DisconnectKind(enum.Enum):
    CLEAN = "clean"  # QEMU closed between messages
    ERROR = "error"  # a malformed message or a broken socket
    LOCAL = "local"  # we closed it (fault injection, or close())


class Endpoint(Closeable):
    """Listens on ``socket_path`` (unless ``_open`` is overridden) and serves QEMU from one
    thread; ``close()`` is idempotent and removes the socket path."""

    kind = "endpoint"
    """What it is, in thread names and messages ("back-end", "relay")."""

    def __init__(
        self,
        socket_path: Path | str,
        trace_path: Path | None,
        on_message: Callable[[TraceEntry], None] | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.trace = Trace(trace_path)
        self._on_message = on_message
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._failure: BaseException | None = None
        self._closed = False
        self._sessions = 0  # connections accepted so far
        self._disconnects: list[DisconnectKind] = []
        self._seen: list[Request] = []
        self._violations: list[Violation] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Listen and start serving on a thread. Idempotent."""
        if self._closed:
            raise StateError("closed", "new", self.kind)
        if self._thread is not None:
            return self
        try:
            self._open()
            thread = threading.Thread(target=self._run, name=f"vhost-user-{self.kind}", daemon=True)
            thread.start()
            self._thread = thread
        except BaseException:
            # `with X(...)` does not call __exit__ when __enter__ raises.
            self.close()
            raise
        return self

    def __enter__(self) -> Self:
        return self.start()

    def _open(self) -> None:
        self._listener = Listener(self.socket_path)

    def close(self) -> None:
        """Stop serving, close every fd and socket, remove the socket path. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None and not self._finished.wait(timeout=STOP_TIMEOUT):
            log.error("%s thread did not stop within %.0f s; closing under it", self.kind,
                      STOP_TIMEOUT)  # fmt: skip
        with self._cond:
            self._drop_session(DisconnectKind.LOCAL)
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self.trace.close()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            log.exception("vhost-user %s thread failed", self.kind)
            with self._cond:
                self._failure = exc
                self._cond.notify_all()
        finally:
            with self._cond:
                self._drop_session(DisconnectKind.LOCAL)
            self._finished.set()

    def _serve(self) -> None:
        """The serving loop; returns when woken through ``_wake_r`` (close())."""
        raise NotImplementedError

    def _drop_session(self, kind: DisconnectKind) -> None:
        """End the current session, if any (caller holds ``_cond``); record ``kind`` with
        ``_ended`` when there was one."""
        raise NotImplementedError

    # -- what the serving thread records (it holds no lock when it calls these) -------------

    def _began(self) -> None:
        with self._cond:
            self._sessions += 1
            self._cond.notify_all()

    def _ended(self, kind: DisconnectKind) -> None:
        """Caller holds ``_cond``."""
        self._disconnects.append(kind)
        self._cond.notify_all()

    def _saw(self, request: Request) -> None:
        with self._cond:
            self._seen.append(request)
            self._cond.notify_all()

    def _flag(self, violation: Violation) -> None:
        log.warning("vhost-user rule broken: %s: %s: %s", violation.request, violation.rule,
                    violation.detail)  # fmt: skip
        with self._cond:
            self._violations.append(violation)
            self._cond.notify_all()

    def _notify(self, entry: TraceEntry) -> None:
        if self._on_message is not None:
            self._on_message(entry)

    # -- what was observed ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """The serving thread is alive (False before start() and after close())."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def requests_seen(self) -> list[Request]:
        """Every front-end request received, all connections, in order."""
        with self._cond:
            return list(self._seen)

    @property
    def violations(self) -> list[Violation]:
        """Every vhost-user rule broken (by QEMU, or for the relay by either side)."""
        with self._cond:
            return list(self._violations)

    # -- waits with deadlines ----------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Until ``predicate()`` is true, re-checked whenever the serving thread's state
        moves (a request answered, a ring served, a deferred action done; a device model's
        counters, say); ``what`` names the condition in the timeout's message."""

        def alive() -> None:
            if self._failure is not None:
                raise TestbedError(f"{self.kind} thread failed: {self._failure}") from (
                    self._failure
                )

        def seen() -> str:
            last = ", ".join(r.name for r in self._seen[-12:]) or "nothing"
            return f"requests {last}; check that QEMU is running and attached to {self.socket_path}"

        with phase(f"wait: the {self.kind}'s state"):
            wait_on(self._cond, predicate, timeout, f"{self.kind} on {self.socket_path}: {what}",
                    seen=seen, alive=alive)  # fmt: skip

    def wait_connected(self, timeout: float, count: int = 1) -> None:
        """Until ``count`` connections have been accepted in total."""
        self.wait_until(lambda: self._sessions >= count, timeout, f"connection #{count}")

    def wait_for_request(self, request: Request, timeout: float, count: int = 1) -> None:
        """Until ``request`` has arrived ``count`` times in total (all connections)."""
        self.wait_until(
            lambda: self._seen.count(request) >= count, timeout, f"{request.name} x{count}"
        )

    def wait_disconnected(self, timeout: float, count: int = 1) -> DisconnectKind:
        """Until ``count`` connections have ended; returns how the last of them ended."""
        self.wait_until(lambda: len(self._disconnects) >= count, timeout, f"disconnect #{count}")
        with self._cond:
            return self._disconnects[count - 1]
