"""Our back-end: listen (or connect), one serving thread with a session per front-end
connection (the lifecycle and the waits are the Endpoint's, shared with the relay).

The serving thread waits in one selector on the socket, the wake-up pair, the kick
eventfd of every ring that is started and enabled, and the ring service's answers socket;
a kick serves that ring (backend/vrings.py) for the device model. The model is started
when the vhost device starts (Session.driver_ok turns true) and stopped when it stops or
the connection ends; what it must wait on QEMU for runs on the Deferred worker
(backend/deferred.py), and a chain it answers Later is completed by the serving thread
when the answers socket says the answer is there."""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from testbed.device import ShmemLayout
from testbed.errors import ConfigError, PeerClosed, ProtocolError, StateError, TestbedError
from testbed.vhost_user import connection as conn_mod
from testbed.vhost_user.backend.channel import ChannelRequests, ModelHost
from testbed.vhost_user.backend.deferred import Deferred
from testbed.vhost_user.backend.dispatch import Dispatcher
from testbed.vhost_user.backend.handlers import DeviceHandler
from testbed.vhost_user.backend.session import DisconnectKind, Session
from testbed.vhost_user.backend.vrings import RingService, kick_fd
from testbed.vhost_user.connection import Connection, Listener
from testbed.vhost_user.devices.base import DeviceModel
from testbed.vhost_user.devices.test import TestDevice
from testbed.vhost_user.endpoint import Endpoint
from testbed.vhost_user.faults import NO_FAULTS, Faults
from testbed.vhost_user.rules import Violation
from testbed.vhost_user.trace import TraceEntry

log = logging.getLogger(__name__)

CHANNEL_POLL = 0.05
"""Poll interval while a reply waits on the back-end channel (hang_up_on_channel_close)."""


class Backend(Endpoint, ChannelRequests):
    """vhost-user back-end for vhost-user-test-device(-pci), serving ``layout``.

    ``device``: the device model behind it (features, config space, queues, requests;
    testbed.vhost_user.devices). Default: the plain test device with ``layout`` and
    ``num_queues`` queues (1), which never serves a kick. With a model, ``layout`` and
    ``num_queues`` may be left out; given, they must agree with the model. The caller keeps
    ownership of a model it passes (close it after the back-end).

    Listen mode (default): we own ``socket_path`` (in a 0700 dir); QEMU connects as client,
    and may reconnect after a disconnect (hot-plug cycles). Connect mode (``connect=True``):
    QEMU listens (chardev server=on) and we connect once.

    ``wrap_dispatcher``, if given, is called once with the dispatcher built for this
    back-end and returns the one that serves every request instead (a subclass or wrapper
    that bends replies: the fuzzer's hook). Default: the dispatcher as built.
    """

    def __init__(
        self,
        socket_path: Path | str,
        layout: ShmemLayout | None = None,
        *,
        device: DeviceModel | None = None,
        trace_path: Path | None = None,
        faults: Faults | None = None,
        connect: bool = False,
        num_queues: int | None = None,
        connect_timeout: float = 30.0,
        on_message: Callable[[TraceEntry], None] | None = None,
        wrap_dispatcher: Callable[[Dispatcher], Dispatcher] | None = None,
    ) -> None:
        super().__init__(socket_path, trace_path, on_message)
        self.device = _device_model(device, layout, num_queues)
        self.layout = self.device.layout
        self.faults = faults or NO_FAULTS
        self.connect_mode = connect
        self.connect_timeout = connect_timeout
        handler = DeviceHandler(self.device, self.faults)
        dispatcher = Dispatcher(handler, self.trace, self._cond, self._notify)
        self._dispatcher = dispatcher if wrap_dispatcher is None else wrap_dispatcher(dispatcher)
        self._rings = RingService(
            self.device, self.trace, self._notify, self._dispatcher.add_violations
        )
        self._deferred = Deferred(self._wake_waiters)
        self._host = ModelHost(self)
        self._channel_lock = threading.Lock()
        self._session: Session | None = None
        self._fault_fired: set[str] = set()

    kind = "back-end"

    def _open(self) -> None:
        if not self.connect_mode:
            super()._open()

    def close(self) -> None:
        super().close()
        # After the session: its channel is closed, so a deferred map waiting on it ends.
        self._deferred.close()
        # After the worker: nothing delivers an answer any more.
        self._rings.close()

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._session is not None

    @property
    def session(self) -> Session | None:
        return self._session

    @property
    def violations(self) -> list[Violation]:
        """Every rule QEMU (or the guest's rings) broke (testbed/vhost_user/rules.py), and
        every rule our device model's own channel requests broke (backend/channel.py)."""
        with self._cond:
            return list(self._dispatcher.violations)

    def _own_violations(self, found: list[Violation]) -> None:
        self._dispatcher.add_violations(found, who="our back-end (its device model)")

    def wait_driver_ok(self, timeout: float) -> None:
        """Until the current connection's device was started (the guest set DRIVER_OK)."""
        self.wait_until(
            lambda: self._session is not None and self._session.driver_ok,
            timeout,
            "DRIVER_OK (vhost device start)",
        )

    def serve_forever(self) -> None:
        """Block until the serving thread ends (connect mode: QEMU went away), re-raising
        its failure. Interruptible by Ctrl-C; the caller's close() then tears down."""
        if self._thread is None:
            raise StateError("new", "started", "Backend.serve_forever")
        # Not Thread.join(): a signal interrupting join() can leave the thread looking
        # finished to the join() in close(), which then tears sockets down under it.
        self._finished.wait()
        if self._failure is not None:
            raise TestbedError(f"back-end thread failed: {self._failure}") from self._failure

    def defer(self, what: str, action: Callable[[], None]) -> None:
        """Run ``action`` on the back-end's worker thread (DeviceHost; see deferred.py)."""
        self._deferred.submit(what, action)

    def _wake_waiters(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- serving thread -----------------------------------------------------------------

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            sel.register(self._rings.answers, selectors.EVENT_READ, "answers")
            if self.connect_mode:
                conn = conn_mod.connect(self.socket_path, self.connect_timeout, self._stop.wait)
                self._begin_session(conn)
            while not self._stop.is_set():
                session = self._session
                if session is None and self.connect_mode:
                    return  # QEMU's server socket does not come back to us
                want = session.conn if session else self._listener
                assert want is not None
                watched: list[tuple[Connection | Listener | int, str | int]] = [
                    (want, "conn" if session else "listen")
                ]
                # A reply waiting for map() on the channel keeps it readable: poll it then,
                # do not spin on it.
                channel = self._channel_to_watch(session)
                pending = channel is not None and _peek(channel) == "data"
                if channel is not None and not pending:
                    watched.append((channel, "channel"))
                watched += self._kicks_to_watch(session)
                for fileobj, data in watched:
                    sel.register(fileobj, selectors.EVENT_READ, data)
                try:
                    events = sel.select(CHANNEL_POLL if pending else None)
                finally:
                    for fileobj, _ in watched:
                        sel.unregister(fileobj)
                if any(key.data == "wake" for key, _ in events):
                    return
                # The channel's hang-up ends the session: the main connection's own event
                # (if any) is then the closed session's.
                events.sort(key=lambda event: event[0].data != "channel")
                for key, _ in events:
                    if key.data == "channel":
                        assert session is not None and channel is not None
                        if _peek(channel) == "eof":
                            self._hang_up_on_channel_close()
                            break
                    elif key.data == "answers":
                        self._finish_answers(session)
                    elif key.data == "listen":
                        assert self._listener is not None
                        self._begin_session(self._listener.accept())
                    elif isinstance(key.data, int):
                        if session is self._session:  # not one that just ended
                            assert session is not None
                            self._serve_kick(session, key.data)
                    else:
                        assert session is not None
                        self._serve_one(session)

    def _begin_session(self, conn: Connection) -> None:
        with self._cond:
            self._session = Session(self._sessions + 1, conn)
        self._began()
        log.info("QEMU connected on %s (connection %d)", self.socket_path, self._sessions)

    def _drop_session(self, kind: DisconnectKind) -> None:
        """Caller holds self._cond. Nothing to do without a session."""
        session, self._session = self._session, None
        if session is None:
            return
        if session.started:
            session.started = False
            self.device.stop()
        session.close()
        self._ended(kind)
        log.info("connection %d on %s ended: %s", session.number, self.socket_path, kind.value)

    def _serve_one(self, session: Session) -> None:
        ended: DisconnectKind | None = None
        try:
            msg = session.conn.recv()
        except PeerClosed:
            ended = DisconnectKind.CLEAN
        except (ProtocolError, OSError) as exc:
            log.error("front-end channel: %s; dropping the connection", exc)
            ended = DisconnectKind.ERROR
        if ended is not None:
            with self._cond:
                self._drop_session(ended)
            return
        with msg:
            was_started = session.driver_ok
            request = self._dispatcher.receive(session, msg)
            if self._fault_once("disconnect", self.faults.disconnect_at == request):
                log.warning("fault: closing the connection at %s", request.name)
                ended = DisconnectKind.LOCAL
            elif self._fault_once("delay", self.faults.delay_request == request):
                log.warning("fault: delaying %s by %.1fs", request.name, self.faults.delay_seconds)
                if self._stop.wait(self.faults.delay_seconds):
                    return
            if ended is None:
                try:
                    self._dispatcher.dispatch(session, msg, request)
                except ProtocolError as exc:
                    log.error("front-end %s: %s; dropping the connection", request.name, exc)
                    ended = DisconnectKind.ERROR
                except PeerClosed:
                    ended = DisconnectKind.CLEAN
            # Marked seen once answered, so a waiter may act on QEMU's next step at once.
            with self._cond:
                session.requests.append(request)
                self._seen.append(request)
                if ended is None:
                    self._start_or_stop(session, was_started)
                self._cond.notify_all()
                if ended is not None:
                    self._drop_session(ended)
            if ended is None:
                self._catch_up(session)

    def _start_or_stop(self, session: Session, was_started: bool) -> None:
        """Start or stop the device model as the vhost device did. Caller holds the lock."""
        now = session.driver_ok
        if now and not was_started and not session.started:
            session.started = True
            log.info("device %s started", self.device.describe())
            self.device.start(self._host)
        elif was_started and not now and session.started:
            session.started = False
            log.info("device %s stopped", self.device.describe())
            self.device.stop()

    def _kicks_to_watch(self, session: Session | None) -> list[tuple[int, int]]:
        """(kick fd, ring index) of every ring to serve now."""
        if session is None or not self.device.serves_queues:
            return []
        kicks = []
        for ring in session.rings.values():
            fd = kick_fd(session.mappings, session.features, ring)
            if fd is not None:
                kicks.append((fd, ring.index))
        return kicks

    def _catch_up(self, session: Session) -> None:
        """Serve each ring once as it becomes servable: chains made available before its
        kick fd was watched (a driver that kicked QEMU early) are not left waiting."""
        if not self.device.serves_queues:
            return
        for ring in session.rings.values():
            servable = kick_fd(session.mappings, session.features, ring) is not None
            if servable and not ring.caught_up:
                ring.caught_up = True
                self._rings.serve(session.mappings, session.features, ring)
                self._wake_waiters()
            elif not servable:
                ring.caught_up = False

    def _serve_kick(self, session: Session, index: int) -> None:
        ring = session.rings.get(index)
        if ring is not None:
            self._rings.kicked(session.mappings, session.features, ring)
            self._wake_waiters()

    def _finish_answers(self, session: Session | None) -> None:
        """Complete the chains whose Later answers arrived (see backend/vrings.py); with
        no session they are only drained (and dropped)."""
        if session is not None and session is self._session:
            self._rings.finish_answers(session.mappings, session.features, session.rings)
        else:
            self._rings.drop_answers()
        self._wake_waiters()

    def _channel_to_watch(self, session: Session | None) -> Connection | None:
        """The back-end channel, when a fault waits for QEMU to close it."""
        if session is None or not self.faults.hang_up_on_channel_close:
            return None
        return session.channel

    def _hang_up_on_channel_close(self) -> None:
        log.warning("fault: QEMU closed the back-end channel; closing the connection")
        with self._cond:
            self._drop_session(DisconnectKind.LOCAL)

    def _fault_once(self, name: str, condition: bool) -> bool:
        if not condition or name in self._fault_fired:
            return False
        self._fault_fired.add(name)
        return True

    def __repr__(self) -> str:
        mode = "connect" if self.connect_mode else "listen"
        return f"Backend({self.socket_path}, {self.layout.describe()}, {mode})"


def _device_model(
    device: DeviceModel | None, layout: ShmemLayout | None, num_queues: int | None
) -> DeviceModel:
    """The model a Backend serves: ``device``, checked against what the caller also said,
    or the plain test device."""
    if device is None:
        return TestDevice(layout or ShmemLayout(), 1 if num_queues is None else num_queues)
    if layout is not None and layout != device.layout:
        raise ConfigError(
            f"back-end layout {layout.describe()} differs from the {device.name} device's "
            f"{device.layout.describe()}: leave the layout out, the device decides it"
        )
    if num_queues is not None and num_queues != device.num_queues:
        raise ConfigError(
            f"{num_queues} queues asked, the {device.name} device has {device.num_queues}: "
            "give QEMU's device num_vqs the model's queue count"
        )
    return device


def _peek(conn: Connection) -> str:
    """Without reading: "eof" (the peer closed its end), "data" or "empty"."""
    try:
        return "data" if conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) else "eof"
    except BlockingIOError:
        return "empty"
    except (OSError, StateError):
        return "eof"
