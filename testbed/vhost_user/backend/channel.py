"""The back-end channel's client side (the socket QEMU gave us with SET_BACKEND_REQ_FD):
Backend's map()/unmap()/channel_request(), one request at a time, need_reply set, each
answered by QEMU's u64 verdict (0 = ok).

Requests go out from the caller's thread while the serving thread keeps answering QEMU,
because QEMU sends a new SET_MEM_TABLE while it handles a SHMEM_MAP.

Every request is judged before it goes out by the rules the relay applies to any back-end
(shmid in the served config, the range inside its region, fds, flags, the SHMEM bit): what
it breaks is on its trace entry. Requests the device model sends (:class:`ModelHost`) are
the back-end's own behaviour, so what they break is also a Violation of the back-end
(``Backend.violations``: it fails a scenario). A test or scenario calling map()/unmap()/
channel_request() directly may send a bad request on purpose (QEMU's answer is the point):
that is only traced.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from testbed.errors import PeerClosed, ProtocolError, StateError, WaitTimeout
from testbed.vhost_user.backend.session import Session
from testbed.vhost_user.codes import BackendRequest
from testbed.vhost_user.connection import Connection
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import U64, Header, MMap
from testbed.vhost_user.rules import Violation, check_channel_request
from testbed.vhost_user.trace import CHANNEL_FROM_QEMU, CHANNEL_TO_QEMU, Trace, TraceEntry

CHANNEL_REPLY_TIMEOUT = 10.0

log = logging.getLogger(__name__)


def ready_channel(
    session: Session | None, request: BackendRequest, shmem_bit: int, *, started: bool = True
) -> Connection:
    """The channel to send ``request`` on, or StateError naming what is missing (``started``
    False: the device need not be started, nor SHMEM negotiated -- a reproducer of what
    QEMU does then)."""
    if session is None:
        raise StateError("disconnected", "connected", f"{request.name}")
    if session.channel is None:
        raise StateError("no back-end channel", "SET_BACKEND_REQ_FD received", request.name)
    if not started:
        return session.channel
    if not session.protocol_features & (1 << shmem_bit):
        raise StateError(
            "SHMEM not negotiated", "SHMEM acked by SET_PROTOCOL_FEATURES", request.name
        )
    if not session.driver_ok:
        raise StateError(
            "device not started", "DRIVER_OK (QEMU 11.1.3 crashes otherwise)", request.name
        )
    return session.channel


class ChannelRequests:
    """Mixed into Backend, whose serving thread keeps the session and its channel."""

    trace: Trace
    faults: Faults
    _cond: threading.Condition
    _session: Session | None
    _channel_lock: threading.Lock  # one request in flight

    def _notify(self, entry: TraceEntry) -> None:
        raise NotImplementedError

    def _own_violations(self, found: list[Violation]) -> None:
        """Record rules the back-end itself broke (Backend.violations)."""
        raise NotImplementedError

    def defer(self, what: str, action: Callable[[], None]) -> None:
        raise NotImplementedError

    def map(
        self,
        shmid: int,
        shm_offset: int,
        length: int,
        fd: int,
        fd_offset: int = 0,
        writable: bool = True,
        *,
        timeout: float = CHANNEL_REPLY_TIMEOUT,
        own: bool = False,
    ) -> int:
        """SHMEM_MAP ``fd`` (not consumed: the kernel duplicates it) into region ``shmid``.

        Returns QEMU's u64 verdict, 0 = mapped. QEMU 11.1.3 segfaults on a MAP before
        DRIVER_OK, so this insists on DRIVER_OK; wait_driver_ok() first. ``own``: the
        back-end's own request (its device model's), see the module doc.
        """
        payload = MMap(shmid, fd_offset, shm_offset, length, 1 if writable else 0)
        return self.channel_request(
            BackendRequest.SHMEM_MAP, payload.pack(), [fd], timeout=timeout, own=own
        )

    def unmap(
        self,
        shmid: int,
        shm_offset: int,
        length: int,
        *,
        timeout: float = CHANNEL_REPLY_TIMEOUT,
        own: bool = False,
    ) -> int:
        """SHMEM_UNMAP a range of region ``shmid``; returns QEMU's u64 verdict (0 = ok)."""
        payload = MMap(shmid, 0, shm_offset, length, 0)
        return self.channel_request(
            BackendRequest.SHMEM_UNMAP, payload.pack(), [], timeout=timeout, own=own
        )

    def channel_request(
        self,
        request: BackendRequest,
        body: bytes,
        fds: Sequence[int] = (),
        *,
        timeout: float = CHANNEL_REPLY_TIMEOUT,
        unguarded: bool = False,
        own: bool = False,
    ) -> int:
        """Send ``request`` with an arbitrary ``body`` and ``fds`` on the back-end channel
        (need_reply set) and return QEMU's u64 verdict. map()/unmap() build well-formed
        bodies; fault tests pass malformed ones (wrong size, missing fd, odd flags).
        ``unguarded``: send even to a device that is not started (QEMU 11.1.3 crashes on
        that: its reproducer needs exactly that). PeerClosed if QEMU drops the channel
        instead of answering. What the request breaks is traced; with ``own`` it is the
        back-end's Violation too (module doc)."""
        with self._cond:
            session = self._session
            channel = ready_channel(session, request, self.faults.shmem_bit, started=not unguarded)
            assert session is not None
            acked, served = session.protocol_features, session.served
        header = Header.make(request, len(body), need_reply=True)
        found = check_channel_request(header, body, len(fds), acked, served)
        for v in found:
            log.warning("%s back-end channel request breaks a rule: %s: %s: %s",
                        "our" if own else "a deliberate", v.request, v.rule, v.detail)  # fmt: skip
        if own and found:
            self._own_violations(found)
        with self._channel_lock:
            try:
                self.trace.record(
                    CHANNEL_TO_QEMU, header, body, len(fds), [v.to_json() for v in found]
                )
                channel.settimeout(timeout)
                channel.send(header, body, fds)
                reply = channel.recv()
            except TimeoutError as exc:
                raise WaitTimeout(
                    f"QEMU did not answer {request.name} within {timeout:.1f}s"
                ) from exc
            except OSError as exc:
                raise PeerClosed(f"back-end channel broke during {request.name}: {exc}") from exc
        with reply:
            entry = self.trace.record(CHANNEL_FROM_QEMU, reply.header, reply.body, len(reply.fds))
            self._notify(entry)
            if not reply.header.is_reply_for(request):
                raise ProtocolError(
                    f"expected a reply to {request.name}, got request {reply.header.request} "
                    f"flags 0x{reply.header.flags:x}",
                    reply.header.pack() + reply.body,
                )
            return U64.unpack(reply.body).value


class ModelHost:
    """What the back-end lends its device model (a DeviceHost): the back-end channel, every
    request judged as the back-end's own, and the deferred worker."""

    def __init__(self, backend: ChannelRequests) -> None:
        self._backend = backend

    def map(
        self,
        shmid: int,
        shm_offset: int,
        length: int,
        fd: int,
        fd_offset: int = 0,
        writable: bool = True,
    ) -> int:
        return self._backend.map(shmid, shm_offset, length, fd, fd_offset, writable, own=True)

    def unmap(self, shmid: int, shm_offset: int, length: int) -> int:
        return self._backend.unmap(shmid, shm_offset, length, own=True)

    def defer(self, what: str, action: Callable[[], None]) -> None:
        self._backend.defer(what, action)
