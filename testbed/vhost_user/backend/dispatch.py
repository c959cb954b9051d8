"""The dispatcher: checks each front-end request before a handler sees it, owns feature
negotiation, answers replies and REPLY_ACK.

Two kinds of check, as rust-vmm's backend_req_handler does them: a message a handler cannot
use (a payload that does not decode, a wrong fd count where the handler takes fds) is a
ProtocolError and the connection is dropped; a well-formed request QEMU should not have sent
(a feature not negotiated, NEED_REPLY without REPLY_ACK, fds the spec does not want) is
flagged -- in the trace and in ``violations`` -- and answered all the same.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from testbed.errors import ProtocolError
from testbed.vhost_user import rules
from testbed.vhost_user.backend import offer
from testbed.vhost_user.backend.handlers import HANDLERS, TAKES_FDS, DeviceHandler, Reply, u64
from testbed.vhost_user.backend.session import Session
from testbed.vhost_user.codes import ProtocolFeature, Request
from testbed.vhost_user.connection import Message
from testbed.vhost_user.protocol import U64, Header, Payload, decode_payload
from testbed.vhost_user.rules import Negotiation, Violation
from testbed.vhost_user.trace import FROM_QEMU, TO_QEMU, Trace, TraceEntry

log = logging.getLogger(__name__)

D = TypeVar("D", bound="Dispatcher")


class Dispatcher:
    def __init__(
        self,
        device: DeviceHandler,
        trace: Trace,
        lock: threading.Condition,
        notify: Callable[[TraceEntry], None],
    ) -> None:
        self.device = device
        self.faults = device.faults
        self.trace = trace
        self._lock = lock  # the back-end's: waiters see a request's effects at once
        self._notify = notify
        self.violations: list[Violation] = []  # guarded by the lock

    def offered_features(self) -> int:
        return offer.device_features(self.device.model.features)

    def build_like(self, make: Callable[..., D]) -> D:
        """The dispatcher ``make`` builds (a subclass, or a partial of one) from what this
        one was built with -- its device, trace, lock and waiters: how Backend's
        ``wrap_dispatcher`` hook puts a subclass in this one's place (the fuzzer's, which
        bends replies), without knowing that list."""
        return make(self.device, self.trace, self._lock, self._notify)

    def send(
        self,
        s: Session,
        header: Header,
        body: bytes,
        fds: Sequence[int] = (),
        *,
        allow_size_mismatch: bool = False,
    ) -> None:
        """Send one message to QEMU on ``s``: recorded in the trace and shown to waiters
        first. Every reply leaves through here, a subclass's bent ones too."""
        self._notify(self.trace.record(TO_QEMU, header, body, len(fds)))
        s.conn.send(header, body, fds, allow_size_mismatch=allow_size_mismatch)

    def offered_protocol_features(self) -> int:
        return offer.protocol_features(self.faults, config=self.device.model.config_size > 0)

    def add_violations(self, found: list[Violation], who: str = "the driver") -> None:
        """Flag what was found outside a front-end request: a virtqueue's content (the
        guest's driver), or a back-end channel request of our own (``who``)."""
        for v in found:
            log.warning("%s broke a rule: %s: %s: %s", who, v.request, v.rule, v.detail)
        with self._lock:
            self.violations.extend(found)

    def negotiation(self, s: Session) -> Negotiation:
        return Negotiation(
            offered_features=self.offered_features(),
            acked_features=s.features,
            offered_protocol=self.offered_protocol_features(),
            acked_protocol=s.protocol_features,
            queues=s.queues,
        )

    def receive(self, s: Session, msg: Message) -> Request:
        """Trace a received request with the rules it breaks; returns the request."""
        request = Request(msg.header.request)
        payload: Payload | None
        try:
            payload = decode_payload(request, msg.body)
        except ProtocolError:
            payload = None  # dispatch() drops the connection; no rule needs the body then
        found = rules.check_request(
            request,
            need_reply=msg.header.need_reply,
            is_reply=msg.header.is_reply,
            nfds=len(msg.fds),
            payload=payload,
            n=self.negotiation(s),
        )
        violations = [v.to_json() for v in found]
        self._notify(self.trace.record(FROM_QEMU, msg.header, msg.body, len(msg.fds), violations))
        for v in found:
            log.warning("QEMU broke a vhost-user rule: %s: %s: %s", v.request, v.rule, v.detail)
        if found:
            with self._lock:
                self.violations.extend(found)
        return request

    def dispatch(self, s: Session, msg: Message, request: Request) -> None:
        """Answer one request. ProtocolError: malformed (drop the connection); PeerClosed:
        QEMU went away while we answered."""
        payload = decode_payload(request, msg.body)
        if request in TAKES_FDS:
            expected = rules.expected_fds(request, payload, self.negotiation(s))
            if len(msg.fds) != expected:
                raise ProtocolError(
                    f"{request.name}: expected {expected} fd(s), got {len(msg.fds)}", msg.body
                )
        with self._lock:
            result = self._negotiate(s, request, payload)
            if result is None:
                handler = HANDLERS.get(request)
                if handler is None:
                    log.warning("front-end request %s is not supported; failing it", request.name)
                    result = False
                else:
                    result = handler(self.device, s, msg, payload)
        if isinstance(result, Reply):
            self._reply(s, request, result)
        elif msg.header.need_reply and s.protocol_features & ProtocolFeature.REPLY_ACK:
            self._reply(s, request, u64(0 if result else 1))

    def _negotiate(self, s: Session, request: Request, payload: object) -> Reply | bool | None:
        """The feature requests; None for any other. Caller holds the lock."""
        if request is Request.GET_FEATURES:
            return u64(self.offered_features())
        if request is Request.GET_PROTOCOL_FEATURES:
            return u64(self.offered_protocol_features())
        if request is Request.SET_FEATURES:
            assert isinstance(payload, U64)
            s.features = payload.value
            return True
        if request is Request.SET_PROTOCOL_FEATURES:
            assert isinstance(payload, U64)
            unoffered = payload.value & ~self.offered_protocol_features()
            if unoffered:
                log.warning("QEMU acked protocol features 0x%x we did not offer", unoffered)
            s.protocol_features = payload.value
            return True
        return None

    def _reply(self, s: Session, request: Request, reply: Reply) -> None:
        header = Header.make(request, len(reply.body), reply=True)
        if reply.flags is not None:
            header = Header(header.request, reply.flags, header.size)
        # A truncated GET_SHMEM_CONFIG reply is a fault we inject on purpose.
        truncating = self.faults.shmem_truncate is not None
        self.send(s, header, reply.body, allow_size_mismatch=truncating)
