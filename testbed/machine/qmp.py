"""QMP for one QEMU: qemu.qmp's async client on an event-loop thread of its own, behind
plain blocking calls, with the JSON-lines log (qmp.log: every command, response and event)
and the list of every event QEMU sent.

`QmpLink` knows nothing of the process: QemuMachine (testbed.machine.qemu) owns it, hands it
the socket QEMU dialled and turns its failures into the test bed's errors, QEMU's exit
status first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.message import Message

T = TypeVar("T")


def data_matches(data: Any, match: Mapping[str, Any]) -> bool:
    """True when every key of `match` is in `data` with an equal (or recursively matching)
    value; a frozenset in `match` accepts any of its members."""
    if not isinstance(data, Mapping):
        return False
    for key, want in match.items():
        if key not in data:
            return False
        have = data[key]
        if isinstance(want, Mapping):
            if not data_matches(have, want):
                return False
        elif isinstance(want, frozenset):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


class _RecordingClient(QMPClient):
    """A QMPClient that hands every event to a callback as it arrives."""

    def __init__(self, name: str, on_event: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(name)
        self._on_event = on_event

    async def _event_dispatch(self, msg: Message) -> None:
        # Not passed on to qemu.qmp's listeners: its default listener would queue every
        # event forever, as nobody reads it; the link keeps its own list.
        self._on_event(dict(msg))


class QmpLink:
    """The QMP side of one QEMU; usable (for its events) before and after a connection."""

    def __init__(self) -> None:
        self._log: IO[str] | None = None
        self._log_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._client: _RecordingClient | None = None
        self._events: list[dict[str, Any]] = []
        self._consumed: set[int] = set()
        self._events_cond = threading.Condition()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def open_log(self, path: Path) -> None:
        self._log = path.open("a", buffering=1)

    def connect(self, conn: socket.socket, timeout: float) -> None:
        """Negotiate QMP over ``conn`` (QEMU's side dialled it); the error of qemu.qmp, or
        TimeoutError, when QEMU hangs up or stays silent (``conn`` is then closed)."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="testbed-qmp", daemon=True)
            thread.start()
            self._loop, self._loop_thread = loop, thread
        client = _RecordingClient("testbed", self._record_event)
        try:
            self._run(client.connect(conn), timeout)
        except BaseException:
            conn.close()
            raise
        self._client = client

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def execute(self, cmd: str, args: dict[str, Any], timeout: float) -> Any:
        """QEMU's answer to ``cmd``; ExecuteError when QEMU refuses it, TimeoutError when
        none comes in ``timeout`` s, whatever qemu.qmp raises when the connection is lost."""
        assert self._client is not None
        self.log("->", {"execute": cmd, "arguments": args})
        try:
            result = self._run(self._client.execute(cmd, args or None), timeout)
        except ExecuteError as exc:
            self.log("<-", {"error": {"class": exc.error_class, "desc": str(exc)}})
            raise
        self.log("<-", {"return": result})
        return result

    def log(self, direction: str, message: Any) -> None:
        if self._log is None:
            return
        line = json.dumps({"t": round(time.time(), 6), "dir": direction, "msg": message})
        with self._log_lock:
            self._log.write(line + "\n")

    # -- events ----------------------------------------------------------------------------

    def _record_event(self, event: dict[str, Any]) -> None:
        # Runs on the QMP thread.
        self.log("event", event)
        with self._events_cond:
            self._events.append(event)
            self._events_cond.notify_all()

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event received so far, oldest first (a copy)."""
        with self._events_cond:
            return list(self._events)

    def take_event(
        self, name: str, match: Mapping[str, Any] | None, wait: float
    ) -> dict[str, Any] | None:
        """The first not yet taken event ``name`` whose data contains ``match``; if there is
        none, waits up to ``wait`` s for a new event and looks once more."""
        with self._events_cond:
            for attempt in (1, 2):
                for i, event in enumerate(self._events):
                    if i in self._consumed or event.get("event") != name:
                        continue
                    if match and not data_matches(event.get("data", {}), match):
                        continue
                    self._consumed.add(i)
                    return event
                if attempt == 1:
                    self._events_cond.wait(wait)
        return None

    def event_names(self) -> str:
        with self._events_cond:
            names = sorted({str(e.get("event")) for e in self._events})
        return ", ".join(names) or "none"

    # -- teardown --------------------------------------------------------------------------

    def disconnect(self) -> None:
        if self._client is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._run(self._client.disconnect(), timeout=2.0)
        self._client = None

    def close(self) -> None:
        """Disconnect, stop the loop thread, close the log. Idempotent."""
        try:
            self.disconnect()
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                if self._loop_thread is not None:
                    self._loop_thread.join(5.0)
                if not self._loop.is_running():
                    self._loop.close()
                self._loop = None
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
