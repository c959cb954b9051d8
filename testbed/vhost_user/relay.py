"""A vhost-user relay: sits between QEMU and any back-end socket, passes every message and
fd through in both directions, records the same JSON-lines trace as our back-end, and
checks both sides against the spec as it goes.

QEMU connects to the relay's socket; for each QEMU connection the relay connects to the
back-end's socket. The back-end channel (SET_BACKEND_REQ_FD) is relayed too: the relay keeps
QEMU's fd and hands the back-end one end of a socketpair of its own, so every back-end
request (SHMEM_MAP/UNMAP, ...) and QEMU's answer pass through here.

Front-end requests are judged by the back-end's own rule table (vhost_user/rules.py) against
what the back-end offered; the back-end's replies and channel requests by the checks below
(reply shapes and sizes, REPLY_ACK, the SHMEM bit, SHMEM_MAP/UNMAP against the served
config, fds). A violation is only recorded (``Relay.violations``, the trace); the message is
passed on unchanged, so the relay never changes what either side sees.

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
from dataclasses import dataclass, field
from pathlib import Path

from testbed.device import ShmemLayout
from testbed.errors import PeerClosed, ProtocolError, TestbedError
from testbed.vhost_user import connection as conn_mod
from testbed.vhost_user.backend import offer
from testbed.vhost_user.codes import ProtocolFeature, Request
from testbed.vhost_user.connection import Connection, Listener, Message
from testbed.vhost_user.endpoint import DisconnectKind, Endpoint
from testbed.vhost_user.faults import NO_FAULTS
from testbed.vhost_user.protocol import U64, Header, ShMemConfig, decode_payload
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
from testbed.vhost_user.trace import CHANNEL_FROM_QEMU, CHANNEL_TO_QEMU, FROM_QEMU, TO_QEMU

log = logging.getLogger(__name__)

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
    queues: int | None = None  # the back-end's answer to GET_QUEUE_NUM

    def negotiation(self) -> Negotiation:
        return Negotiation(
            self.offered_features,
            self.acked_features,
            self.offered_protocol,
            self.acked_protocol,
            self.queues,
        )

    def connections(self) -> list[Connection]:
        return [
            c
            for c in (self.qemu, self.backend, self.qemu_channel, self.backend_channel)
            if c is not None
        ]

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


class Relay(Endpoint):
    """Listens on ``socket_path`` for QEMU, connects to ``backend_path`` per connection.

    ``inject``: offer SHMEM and answer GET_SHMEM_CONFIG with this layout (the back-end
    never sees request 44). Without it, nothing is changed on the way through.
    """

    kind = "relay"

    def __init__(
        self,
        socket_path: Path | str,
        backend_path: Path | str,
        *,
        trace_path: Path | None = None,
        inject: ShmemLayout | None = None,
        backend_timeout: float = 10.0,
    ) -> None:
        super().__init__(socket_path, trace_path)
        self.backend_path = Path(backend_path)
        self.inject = inject
        self.backend_timeout = backend_timeout
        self._session: RelaySession | None = None

    @property
    def session(self) -> RelaySession | None:
        return self._session

    @property
    def injecting(self) -> bool:
        """The current session's regions are the relay's (``inject``): the back-end offered
        no SHMEM, so it will never map anything into them."""
        s = self._session
        return self.inject is not None and s is not None and not s.backend_protocol & SHMEM

    # --- the relaying thread ---------------------------------------------------------------

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
            self._session = RelaySession(self._sessions + 1, qemu, backend)
        self._began()
        log.info("relay: QEMU connected, relaying to %s", self.backend_path)

    def _drop_session(self, kind: DisconnectKind) -> None:
        """Caller holds self._cond."""
        session, self._session = self._session, None
        if session is None:
            return
        session.close()
        self._ended(kind)

    def _relay_one(self, s: RelaySession, conn: Connection) -> None:
        try:
            msg = conn.recv(strict=False)
        except (PeerClosed, ProtocolError, OSError) as exc:
            if not isinstance(exc, PeerClosed):
                self._flag(Violation("?", "framing", f"{conn.name}: {exc}"))
            log.info("relay: %s ended the connection (%s)", conn.name, exc)
            clean = isinstance(exc, PeerClosed)
            self._hang_up(s, conn, DisconnectKind.CLEAN if clean else DisconnectKind.ERROR)
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
            self._hang_up(s, conn, DisconnectKind.ERROR)

    def _hang_up(self, s: RelaySession, conn: Connection, kind: DisconnectKind) -> None:
        """``conn`` ended (or its message could not be passed on). A back-end channel's end
        ends the channel only: QEMU closes its end on unrealize before the main socket,
        and a relay that dropped the main connection then would hang up under QEMU's
        cleanup, which no direct back-end does (QEMU 11.1.3 segfaults on it). Any other
        connection ends the session."""
        if conn is s.qemu_channel or conn is s.backend_channel:
            s.close_channel()
            return
        with self._cond:
            self._drop_session(kind)

    def _record(
        self, direction: str, header: Header, body: bytes, nfds: int, found: list[Violation]
    ) -> None:
        entry = self.trace.record(direction, header, body, nfds, [v.to_json() for v in found])
        for v in found:
            self._flag(v)
        self._notify(entry)

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
        self._saw(request)

        injecting = self.injecting
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
        elif request == Request.GET_QUEUE_NUM and len(body) == 8:
            s.queues = U64.unpack(body).value
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
