"""A vhost-user relay: sits between QEMU and any back-end socket, passes every message and
fd through in both directions, records the same JSON-lines trace as our back-end, and
checks both sides against the spec as it goes.

QEMU connects to the relay's socket; for each QEMU connection the relay connects to the
back-end's socket. The back-end channel (SET_BACKEND_REQ_FD) is relayed too: the relay keeps
QEMU's fd and hands the back-end one end of a socketpair of its own, so every back-end
request (SHMEM_MAP/UNMAP, ...) and QEMU's answer pass through here.

Every message is judged by testbed.vhost_user.rules (pure): front-end requests by the
rule table our own back-end uses, against what the back-end offered; the back-end's
replies and channel requests by the relay's checks there (reply shapes and sizes,
REPLY_ACK, the SHMEM bit, SHMEM_MAP/UNMAP against the served config, fds). A violation is
only recorded (``Relay.violations``, the trace); the message is passed on unchanged, so the
relay never changes what either side sees.

With ``inject`` the relay offers SHMEM itself (bit 22) in front of a back-end without it:
it sets the bit in GET_PROTOCOL_FEATURES, strips it from SET_PROTOCOL_FEATURES on the way
back, and answers GET_SHMEM_CONFIG with the caller's layout; everything else passes through.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from testbed.device import ShmemLayout
from testbed.errors import PeerClosed, ProtocolError, StateError, TestbedError, WaitTimeout
from testbed.resource import Closeable
from testbed.vhost_user import connection as conn_mod
from testbed.vhost_user.backend import offer
from testbed.vhost_user.connection import Connection, Listener, Message, OwnedFd, close_all
from testbed.vhost_user.faults import NO_FAULTS
from testbed.vhost_user.protocol import (
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    U64,
    Header,
    ProtocolFeature,
    Request,
    ShMemConfig,
    decode_payload,
)
from testbed.vhost_user.rules import (
    SHMEM,
    Negotiation,
    Violation,
    check_channel_reply,
    check_channel_request,
    check_offer,
    check_reply,
    check_request,
    expects_reply,
    header_violations,
)
from testbed.vhost_user.trace import (
    CHANNEL_FROM_QEMU,
    CHANNEL_TO_QEMU,
    FROM_QEMU,
    TO_QEMU,
    Trace,
    TraceEntry,
)

log = logging.getLogger(__name__)


# --- framing that passes on what it cannot name -------------------------------------------


def recv_any(conn: Connection) -> Message:
    """One message, whatever its request code, version or flags: where Connection.recv()
    refuses what it cannot name, the relay passes it on (the peer may know it) and flags it
    (header_violations). Only a size beyond MAX_PAYLOAD_SIZE stays fatal: no peer frames
    such a message, so the stream is lost. Uses Connection's own exact reader, so fds are
    owned and closed the same way."""
    fds: list[OwnedFd] = []
    try:
        raw = conn._recv_exact(HEADER_SIZE, fds, "header")
        request, flags, size = Header.FORMAT.unpack(raw)
        if size > MAX_PAYLOAD_SIZE:
            raise ProtocolError(
                f"{conn.name}: payload size {size} exceeds {MAX_PAYLOAD_SIZE}", bytes(raw)
            )
        body = conn._recv_exact(size, fds, "payload") if size else b""
    except BaseException:
        close_all(fds)
        raise
    return Message(Header(request, flags, size), body, fds)


# --- the relay --------------------------------------------------------------------------


@dataclass
class RelaySession:
    """One QEMU connection and the back-end connection made for it."""

    number: int
    qemu: Connection
    backend: Connection
    qemu_channel: Connection | None = None  # QEMU's end, from SET_BACKEND_REQ_FD
    backend_channel: Connection | None = None  # our end of the pair the back-end got
    pending: collections.deque[Header] = field(default_factory=collections.deque)
    channel_pending: collections.deque[Header] = field(default_factory=collections.deque)
    offered_features: int = 0
    acked_features: int = 0
    offered_protocol: int = 0  # as QEMU saw it (with an injected SHMEM bit)
    backend_protocol: int = 0  # as the back-end sent it
    acked_protocol: int = 0  # as QEMU sent it
    served: dict[int, int] | None = None  # the shared-memory config QEMU received

    def negotiation(self) -> Negotiation:
        return Negotiation(
            self.offered_features, self.acked_features, self.offered_protocol, self.acked_protocol
        )

    def connections(self) -> list[Connection]:
        return [
            c
            for c in (self.qemu, self.backend, self.qemu_channel, self.backend_channel)
            if c is not None
        ]

    def is_channel(self, conn: Connection) -> bool:
        return conn is self.qemu_channel or conn is self.backend_channel

    def close_channel(self) -> None:
        """End the back-end channel only: each side sees its end hang up, as it would
        without the relay; the main connection goes on."""
        for conn in (self.qemu_channel, self.backend_channel):
            if conn is not None:
                conn.shutdown()
                conn.close()
        self.qemu_channel = self.backend_channel = None

    def close(self) -> None:
        for conn in self.connections():
            conn.shutdown()
            conn.close()


class Relay(Closeable):
    """Listens on ``socket_path`` for QEMU, connects to ``backend_path`` per connection.

    ``inject``: offer SHMEM and answer GET_SHMEM_CONFIG with this layout (the back-end
    never sees request 44). Without it, nothing is changed on the way through.
    """

    def __init__(
        self,
        socket_path: Path | str,
        backend_path: Path | str,
        *,
        trace_path: Path | None = None,
        inject: ShmemLayout | None = None,
        backend_timeout: float = 10.0,
        on_message: Callable[[TraceEntry], None] | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.backend_path = Path(backend_path)
        self.inject = inject
        self.backend_timeout = backend_timeout
        self.trace = Trace(trace_path)
        self._on_message = on_message
        self._cond = threading.Condition()
        self._violations: list[Violation] = []
        self._seen: list[Request] = []
        self._sessions = 0
        self._ended = 0
        self._session: RelaySession | None = None
        self._failure: BaseException | None = None
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener: Listener | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> Relay:
        if self._closed:
            raise StateError("closed", "new", "relay")
        if self._thread is not None:
            return self
        try:
            self._listener = Listener(self.socket_path)
            thread = threading.Thread(target=self._run, name="vhost-user-relay", daemon=True)
            thread.start()
            self._thread = thread
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Relay:
        return self.start()

    def close(self) -> None:
        """Stop relaying, close every socket and fd, remove the socket path. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None and not self._finished.wait(timeout=10):
            log.error("relay thread did not stop within 10 s; closing under it")
        with self._cond:
            self._end_session()
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self.trace.close()

    # --- what was observed, and waits -----------------------------------------------------

    @property
    def violations(self) -> list[Violation]:
        """Every rule either side broke, in order."""
        with self._cond:
            return list(self._violations)

    @property
    def requests_seen(self) -> list[Request]:
        with self._cond:
            return list(self._seen)

    @property
    def session(self) -> RelaySession | None:
        return self._session

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                if self._failure is not None:
                    raise TestbedError(f"relay thread failed: {self._failure}") from self._failure
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = ", ".join(r.name for r in self._seen[-12:]) or "nothing"
                    raise WaitTimeout(
                        f"relay on {self.socket_path}: {what} did not happen within "
                        f"{timeout:.1f}s (last requests: {seen}); is QEMU attached and the "
                        f"back-end listening on {self.backend_path}?"
                    )
                self._cond.wait(remaining)

    def wait_for_request(self, request: Request, timeout: float, count: int = 1) -> None:
        """Until QEMU has sent ``request`` ``count`` times (all connections)."""
        self._wait(lambda: self._seen.count(request) >= count, timeout, f"{request.name} x{count}")

    def wait_connected(self, timeout: float, count: int = 1) -> None:
        self._wait(lambda: self._sessions >= count, timeout, f"connection #{count}")

    def wait_disconnected(self, timeout: float, count: int = 1) -> None:
        self._wait(lambda: self._ended >= count, timeout, f"disconnect #{count}")

    # --- the relaying thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            log.exception("vhost-user relay thread failed")
            with self._cond:
                self._failure = exc
                self._cond.notify_all()
        finally:
            with self._cond:
                self._end_session()
            self._finished.set()

    def _serve(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            while not self._stop.is_set():
                session = self._session
                watched: list[tuple[Connection | Listener, str]] = (
                    [(c, "conn") for c in session.connections()]
                    if session is not None
                    else [(self._listener, "listen")]
                )
                for obj, kind in watched:
                    sel.register(obj, selectors.EVENT_READ, (kind, obj))
                try:
                    events = sel.select()
                finally:
                    for obj, _ in watched:
                        sel.unregister(obj)
                for key, _ in events:
                    if key.data == "wake":
                        return
                    kind, obj = key.data
                    if kind == "listen":
                        self._accept()
                    elif self._session is session and session is not None:
                        assert isinstance(obj, Connection)
                        if not obj.closed:  # replaced by a new SET_BACKEND_REQ_FD
                            self._relay_one(session, obj)

    def _accept(self) -> None:
        assert self._listener is not None
        qemu = self._listener.accept()
        try:
            backend = conn_mod.connect(self.backend_path, self.backend_timeout, self._stop.wait)
        except TestbedError as exc:
            # No back-end: QEMU sees the connection drop, as it would without the relay.
            log.error("relay: cannot reach the back-end at %s: %s", self.backend_path, exc)
            qemu.close()
            return
        backend.name = "backend"
        qemu.name = "qemu"
        with self._cond:
            self._sessions += 1
            self._session = RelaySession(self._sessions, qemu, backend)
            self._cond.notify_all()
        log.info("relay: QEMU connected, relaying to %s", self.backend_path)

    def _end_session(self) -> None:
        """Caller holds self._cond."""
        session, self._session = self._session, None
        if session is None:
            return
        session.close()
        self._ended += 1
        self._cond.notify_all()

    def _relay_one(self, s: RelaySession, conn: Connection) -> None:
        try:
            msg = recv_any(conn)
        except (PeerClosed, ProtocolError, OSError) as exc:
            if not isinstance(exc, PeerClosed):
                self._flag(Violation("?", "framing", f"{conn.name}: {exc}"))
            log.info("relay: %s ended the connection (%s)", conn.name, exc)
            self._hang_up(s, conn)
            return
        try:
            with msg:
                if conn is s.qemu:
                    self._from_qemu(s, msg)
                elif conn is s.backend:
                    self._from_backend(s, msg)
                elif conn is s.backend_channel:
                    self._channel_from_backend(s, msg)
                else:
                    self._channel_from_qemu(s, msg)
        except (PeerClosed, ProtocolError, OSError) as exc:
            log.info("relay: connection ended while passing a message on (%s)", exc)
            self._hang_up(s, conn)

    def _hang_up(self, s: RelaySession, conn: Connection) -> None:
        """``conn`` ended (or its message could not be passed on). A back-end channel's end
        ends the channel only: QEMU closes its end on unrealize before the main socket,
        and a relay that dropped the main connection then would hang up under QEMU's
        cleanup, which no direct back-end does (QEMU 11.1.3 segfaults on it). Any other
        connection ends the session."""
        if s.is_channel(conn):
            s.close_channel()
            return
        with self._cond:
            self._end_session()

    def _record(
        self, direction: str, header: Header, body: bytes, nfds: int, found: list[Violation]
    ) -> None:
        entry = self.trace.record(direction, header, body, nfds, [v.to_json() for v in found])
        for v in found:
            self._flag(v)
        if self._on_message is not None:
            self._on_message(entry)

    def _flag(self, v: Violation) -> None:
        log.warning("vhost-user rule broken: %s: %s: %s", v.request, v.rule, v.detail)
        with self._cond:
            self._violations.append(v)
            self._cond.notify_all()

    def _from_qemu(self, s: RelaySession, msg: Message) -> None:
        header, body = msg.header, msg.body
        odd = header_violations(header, backend_channel=False)
        if odd:
            # Not ours to judge further: passed on as it came, no reply expected of it.
            self._record(FROM_QEMU, header, body, len(msg.fds), odd)
            s.backend.send(header, body, [f.fileno() for f in msg.fds], allow_size_mismatch=True)
            return
        request = Request(header.request)
        try:
            payload = decode_payload(request, body)
        except ProtocolError:
            payload = None
        found = check_request(
            request,
            need_reply=header.need_reply,
            is_reply=header.is_reply,
            nfds=len(msg.fds),
            payload=payload,
            n=s.negotiation(),
        )
        if isinstance(payload, U64):
            if request is Request.SET_FEATURES:
                s.acked_features = payload.value
            elif request is Request.SET_PROTOCOL_FEATURES:
                s.acked_protocol = payload.value
        self._record(FROM_QEMU, header, body, len(msg.fds), found)
        with self._cond:
            self._seen.append(request)
            self._cond.notify_all()

        injecting = self.inject is not None and not s.backend_protocol & SHMEM
        if injecting and request is Request.GET_SHMEM_CONFIG:
            assert self.inject is not None
            reply = offer.shmem_config_body(self.inject, NO_FAULTS)
            s.served = dict(self.inject.regions)
            out = Header.make(request, len(reply), reply=True)
            self._record(TO_QEMU, out, reply, 0, [])
            s.qemu.send(out, reply)
            return
        if injecting and request is Request.SET_PROTOCOL_FEATURES and isinstance(payload, U64):
            # The back-end never offered SHMEM: it must not see it acked.
            body = U64(payload.value & ~SHMEM).pack()
        fds = [f.fileno() for f in msg.fds]
        if request is Request.SET_BACKEND_REQ_FD and len(msg.fds) == 1:
            fds = self._split_channel(s, msg)
        # REPLY_ACK counts only if the back-end itself offered it (not an injected bit).
        if expects_reply(header, s.acked_protocol & s.backend_protocol):
            s.pending.append(header)
        s.backend.send(header, body, fds)
        if request is Request.SET_BACKEND_REQ_FD and fds:
            # The back-end has its own copy of our pair's far end now.
            os.close(fds[0])

    def _split_channel(self, s: RelaySession, msg: Message) -> list[int]:
        """Keep QEMU's channel fd; return the far end of a fresh pair for the back-end."""
        for old in (s.qemu_channel, s.backend_channel):
            if old is not None:
                old.close()
        s.qemu_channel = Connection.from_fd(msg.fds[0])
        s.qemu_channel.name = "qemu-channel"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        s.backend_channel = Connection(ours, backend_channel=True, name="backend-channel")
        return [theirs.detach()]

    def _from_backend(self, s: RelaySession, msg: Message) -> None:
        header, body = msg.header, msg.body
        owed = s.pending.popleft() if s.pending else None
        found = header_violations(header, backend_channel=False)
        found += check_reply(owed, header, body, len(msg.fds))
        request = header.request
        if request == Request.GET_FEATURES and len(body) == 8:
            s.offered_features = U64.unpack(body).value
        elif request == Request.GET_PROTOCOL_FEATURES and len(body) == 8:
            value = U64.unpack(body).value
            s.backend_protocol = value
            found += check_offer(value)
            if self.inject is not None:
                value |= SHMEM
                body = U64(value).pack()
            s.offered_protocol = value
        elif request == Request.GET_SHMEM_CONFIG:
            with contextlib.suppress(ProtocolError):
                s.served = ShMemConfig.unpack(body).regions
        self._record(TO_QEMU, header, body, len(msg.fds), found)
        s.qemu.send(header, body, [f.fileno() for f in msg.fds], allow_size_mismatch=True)

    def _channel_from_backend(self, s: RelaySession, msg: Message) -> None:
        header, body = msg.header, msg.body
        # What both sides agreed on: QEMU's ack of what the back-end itself offered.
        agreed = s.acked_protocol & s.backend_protocol
        found = header_violations(header, backend_channel=True)
        found += check_channel_request(header, body, len(msg.fds), agreed, s.served)
        self._record(CHANNEL_TO_QEMU, header, body, len(msg.fds), found)
        if header.need_reply and agreed & ProtocolFeature.REPLY_ACK:
            s.channel_pending.append(header)
        assert s.qemu_channel is not None
        s.qemu_channel.send(header, body, [f.fileno() for f in msg.fds], allow_size_mismatch=True)

    def _channel_from_qemu(self, s: RelaySession, msg: Message) -> None:
        header, body = msg.header, msg.body
        owed = s.channel_pending.popleft() if s.channel_pending else None
        found = header_violations(header, backend_channel=True)
        found += check_channel_reply(owed, header, body, len(msg.fds))
        self._record(CHANNEL_FROM_QEMU, header, body, len(msg.fds), found)
        assert s.backend_channel is not None
        s.backend_channel.send(
            header, body, [f.fileno() for f in msg.fds], allow_size_mismatch=True
        )

    def __repr__(self) -> str:
        injected = f", injecting {self.inject.describe()}" if self.inject else ""
        return f"Relay({self.socket_path} -> {self.backend_path}{injected})"
