"""The device side of vhost-user-test-device-pci: a back-end serving a shared-memory layout.

One background thread serves the front-end socket with a selector; a test or scenario drives
QEMU meanwhile and waits on observable state (each wait has a deadline). SHMEM_MAP/UNMAP go
out on the back-end channel from the caller's thread; the serving thread keeps answering
QEMU in the meantime, because QEMU sends a new SET_MEM_TABLE while it handles a MAP.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testbed.errors import PeerClosed, ProtocolError, StateError, TestbedError, WaitTimeout
from testbed.resource import Closeable
from testbed.vhost_user import connection as conn_mod
from testbed.vhost_user.connection import Connection, Listener, Message, OwnedFd
from testbed.vhost_user.faults import NO_FAULTS, Faults
from testbed.vhost_user.protocol import (
    STATUS_DRIVER_OK,
    U64,
    BackendRequest,
    ConfigSpace,
    Header,
    MemoryRegion,
    MemoryTable,
    MMap,
    ProtocolFeature,
    Request,
    ShMemConfig,
    SingleMemRegion,
    VhostUserFeature,
    VringAddr,
    VringFile,
    VringState,
    decode_payload,
)
from testbed.vhost_user.shmem import ShmemLayout
from testbed.vhost_user.trace import (
    CHANNEL_FROM_QEMU,
    CHANNEL_TO_QEMU,
    FROM_QEMU,
    TO_QEMU,
    Trace,
    TraceEntry,
)

log = logging.getLogger(__name__)

DEVICE_FEATURES = VhostUserFeature.VERSION_1 | VhostUserFeature.PROTOCOL_FEATURES
# What we offer besides SHMEM. Not CONFIGURE_MEM_SLOTS: with it QEMU switches to
# ADD/REM_MEM_REG, and the measured SET_MEM_TABLE-after-MAP behaviour is what we test.
BASE_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.BACKEND_SEND_FD
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
)
MAX_MEM_SLOTS = 32
CHANNEL_REPLY_TIMEOUT = 10.0


class DisconnectKind(enum.Enum):
    CLEAN = "clean"  # QEMU closed between messages
    ERROR = "error"  # a malformed message or a broken socket
    LOCAL = "local"  # we closed it (fault injection, or close())


@dataclass
class Session:
    """State of one front-end connection; a new connection starts from scratch."""

    number: int
    conn: Connection
    features: int = 0
    protocol_features: int = 0
    owner: bool = False
    status: int = 0
    mem_table: list[tuple[MemoryRegion, OwnedFd]] = field(default_factory=list)
    vring_fds: dict[tuple[str, int], OwnedFd] = field(default_factory=dict)
    vring_num: dict[int, int] = field(default_factory=dict)
    vring_base: dict[int, int] = field(default_factory=dict)
    vring_addr: dict[int, VringAddr] = field(default_factory=dict)
    vring_enabled: dict[int, bool] = field(default_factory=dict)
    channel: Connection | None = None
    requests: list[Request] = field(default_factory=list)

    def close(self) -> None:
        if self.channel is not None:
            # Wake a map()/unmap() blocked on a reply before the fd goes away.
            self.channel.shutdown()
            self.channel.close()
            self.channel = None
        for _, fd in self.mem_table:
            fd.close()
        self.mem_table.clear()
        for fd in self.vring_fds.values():
            fd.close()
        self.vring_fds.clear()
        self.conn.close()

    @property
    def mem_table_set(self) -> bool:
        return any(r in self.requests for r in (Request.SET_MEM_TABLE, Request.ADD_MEM_REG))


class Backend(Closeable):
    """vhost-user back-end for vhost-user-test-device(-pci), serving ``layout``.

    Listen mode (default): we own ``socket_path`` (in a 0700 dir); QEMU connects as client,
    and may reconnect after a disconnect (hot-plug cycles). Connect mode (``connect=True``):
    QEMU listens (chardev server=on) and we connect once.
    """

    def __init__(
        self,
        socket_path: Path | str,
        layout: ShmemLayout,
        *,
        trace_path: Path | None = None,
        faults: Faults | None = None,
        connect: bool = False,
        num_queues: int = 1,
        connect_timeout: float = 30.0,
        on_message: Callable[[TraceEntry], None] | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.layout = layout
        self.faults = faults or NO_FAULTS
        self.connect_mode = connect
        self.num_queues = num_queues
        self.connect_timeout = connect_timeout
        self.trace = Trace(trace_path)
        self._on_message = on_message
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._channel_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._session: Session | None = None
        self._sessions = 0
        self._disconnects: list[DisconnectKind] = []
        self._seen: list[Request] = []
        self._failure: BaseException | None = None
        self._fault_fired: set[str] = set()
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Backend:
        """Listen (listen mode) and start serving on a thread. Idempotent."""
        if self._closed:
            raise StateError("closed", "new", "back-end")
        if self._thread is not None:
            return self
        try:
            if not self.connect_mode:
                self._listener = Listener(self.socket_path)
            thread = threading.Thread(target=self._run, name="vhost-user-backend", daemon=True)
            thread.start()
            self._thread = thread
        except BaseException:
            # `with Backend(...)` does not call __exit__ when __enter__ raises.
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop serving, close every fd and socket, remove the socket path. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None and not self._finished.wait(timeout=10):
            log.error("back-end thread did not stop within 10 s; closing under it")
        with self._cond:
            if self._session is not None:
                self._end_session(DisconnectKind.LOCAL)
            self._cond.notify_all()
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self.trace.close()

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

    def __enter__(self) -> Backend:
        return self.start()

    # --- observable state -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        """The serving thread is alive (False before start() and after close())."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._session is not None

    @property
    def disconnects(self) -> list[DisconnectKind]:
        with self._cond:
            return list(self._disconnects)

    @property
    def requests_seen(self) -> list[Request]:
        """Every front-end request received, all connections, in order."""
        with self._cond:
            return list(self._seen)

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

    def _driver_ok(self) -> bool:
        s = self._session
        if s is None:
            return False
        if s.status & STATUS_DRIVER_OK:
            return True
        # QEMU 11.1.3 never sends SET_STATUS with DRIVER_OK for this device (only
        # FEATURES_OK, from SET_FEATURES), so vhost_dev_start is the proof: features acked,
        # a memory table, an enabled ring -- all sent once the guest wrote DRIVER_OK.
        return (
            Request.SET_FEATURES in s.requests and s.mem_table_set and any(s.vring_enabled.values())
        )

    def wait_driver_ok(self, timeout: float) -> None:
        """Until the current connection's device was started (the guest set DRIVER_OK)."""
        self._wait(self._driver_ok, timeout, "DRIVER_OK (vhost device start)")

    # --- back-end channel: SHMEM_MAP / SHMEM_UNMAP -----------------------------------------

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
    ) -> int:
        """SHMEM_MAP ``fd`` (not consumed: the kernel duplicates it) into region ``shmid``.

        Returns QEMU's u64 verdict, 0 = mapped. QEMU 11.1.3 segfaults on a MAP before
        DRIVER_OK, so this insists on DRIVER_OK; wait_driver_ok() first.
        """
        payload = MMap(shmid, fd_offset, shm_offset, length, 1 if writable else 0)
        return self.channel_request(BackendRequest.SHMEM_MAP, payload.pack(), [fd], timeout=timeout)

    def unmap(
        self, shmid: int, shm_offset: int, length: int, *, timeout: float = CHANNEL_REPLY_TIMEOUT
    ) -> int:
        """SHMEM_UNMAP a range of region ``shmid``; returns QEMU's u64 verdict (0 = ok)."""
        payload = MMap(shmid, 0, shm_offset, length, 0)
        return self.channel_request(BackendRequest.SHMEM_UNMAP, payload.pack(), [], timeout=timeout)

    def channel_request(
        self,
        request: BackendRequest,
        body: bytes,
        fds: Sequence[int] = (),
        *,
        timeout: float = CHANNEL_REPLY_TIMEOUT,
    ) -> int:
        """Send ``request`` with an arbitrary ``body`` and ``fds`` on the back-end channel
        (need_reply set) and return QEMU's u64 verdict. map()/unmap() build well-formed
        bodies; fault tests pass malformed ones (wrong size, missing fd, odd flags).
        PeerClosed if QEMU drops the channel instead of answering."""
        with self._cond:
            session = self._session
            if session is None:
                raise StateError("disconnected", "connected", f"{request.name}")
            channel = session.channel
            if channel is None:
                raise StateError("no back-end channel", "SET_BACKEND_REQ_FD received", request.name)
            shmem_bit = 1 << self.faults.shmem_bit
            if not session.protocol_features & shmem_bit:
                raise StateError(
                    "SHMEM not negotiated", "SHMEM acked by SET_PROTOCOL_FEATURES", request.name
                )
            if not self._driver_ok():
                raise StateError(
                    "device not started",
                    "DRIVER_OK (QEMU 11.1.3 crashes otherwise)",
                    request.name,
                )
        header = Header.make(request, len(body), need_reply=True)
        with self._channel_lock:
            try:
                self.trace.record(CHANNEL_TO_QEMU, header, body, len(fds))
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

    # --- serving thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            log.exception("vhost-user back-end thread failed")
            with self._cond:
                self._failure = exc
                self._cond.notify_all()
        finally:
            with self._cond:
                if self._session is not None:
                    self._end_session(DisconnectKind.LOCAL)
            self._finished.set()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            if self.connect_mode:
                conn = conn_mod.connect(self.socket_path, self.connect_timeout, self._stop.wait)
                self._begin_session(conn)
            while not self._stop.is_set():
                session = self._session
                if session is None and self.connect_mode:
                    return  # QEMU's server socket does not come back to us
                want = session.conn if session else self._listener
                assert want is not None
                sel.register(want, selectors.EVENT_READ, "conn" if session else "listen")
                try:
                    events = sel.select()
                finally:
                    sel.unregister(want)
                for key, _ in events:
                    if key.data == "wake":
                        return
                    if key.data == "listen":
                        assert self._listener is not None
                        self._begin_session(self._listener.accept())
                    else:
                        self._serve_one()

    def _begin_session(self, conn: Connection) -> None:
        with self._cond:
            self._sessions += 1
            self._session = Session(self._sessions, conn)
            self._cond.notify_all()
        log.info("QEMU connected on %s (connection %d)", self.socket_path, self._sessions)

    def _end_session(self, kind: DisconnectKind) -> None:
        """Caller holds self._cond."""
        session, self._session = self._session, None
        if session is None:
            return
        session.close()
        self._disconnects.append(kind)
        self._cond.notify_all()
        log.info("connection %d on %s ended: %s", session.number, self.socket_path, kind.value)

    def _serve_one(self) -> None:
        session = self._session
        assert session is not None
        try:
            msg = session.conn.recv()
        except PeerClosed:
            with self._cond:
                self._end_session(DisconnectKind.CLEAN)
            return
        except (ProtocolError, OSError) as exc:
            log.error("front-end channel: %s; dropping the connection", exc)
            with self._cond:
                self._end_session(DisconnectKind.ERROR)
            return
        with msg:
            entry = self.trace.record(FROM_QEMU, msg.header, msg.body, len(msg.fds))
            self._notify(entry)
            request = Request(msg.header.request)
            if self._fault_once("disconnect", self.faults.disconnect_at == request):
                log.warning("fault: closing the connection at %s", request.name)
                with self._cond:
                    self._mark_seen(session, request)
                    self._end_session(DisconnectKind.LOCAL)
                return
            if self._fault_once("delay", self.faults.delay_request == request):
                log.warning("fault: delaying %s by %.1fs", request.name, self.faults.delay_seconds)
                if self._stop.wait(self.faults.delay_seconds):
                    return
            try:
                self._dispatch(session, msg, request)
            except ProtocolError as exc:
                log.error("front-end %s: %s; dropping the connection", request.name, exc)
                with self._cond:
                    self._mark_seen(session, request)
                    self._end_session(DisconnectKind.ERROR)
                return
            except PeerClosed:
                with self._cond:
                    self._mark_seen(session, request)
                    self._end_session(DisconnectKind.CLEAN)
                return
            # Marked seen once answered, so a waiter may act on QEMU's next step at once.
            with self._cond:
                self._mark_seen(session, request)

    def _mark_seen(self, session: Session, request: Request) -> None:
        """Caller holds self._cond."""
        session.requests.append(request)
        self._seen.append(request)
        self._cond.notify_all()

    def _fault_once(self, name: str, condition: bool) -> bool:
        if not condition or name in self._fault_fired:
            return False
        self._fault_fired.add(name)
        return True

    def _notify(self, entry: TraceEntry) -> None:
        if self._on_message is not None:
            self._on_message(entry)

    def _reply(
        self,
        session: Session,
        request: Request,
        body: bytes,
        *,
        flags: int | None = None,
        size: int | None = None,
    ) -> None:
        header = Header.make(request, len(body) if size is None else size, reply=True)
        if flags is not None:
            header = Header(header.request, flags, header.size)
        entry = self.trace.record(TO_QEMU, header, body, 0)
        self._notify(entry)
        session.conn.send(header, body, allow_size_mismatch=self.faults.shmem_truncate is not None)

    def _ack(self, session: Session, msg: Message, request: Request, ok: bool) -> None:
        """REPLY_ACK: answer a u64 status when negotiated and asked for."""
        if msg.header.need_reply and session.protocol_features & ProtocolFeature.REPLY_ACK:
            self._reply(session, request, U64(0 if ok else 1).pack())

    def _expect_fds(self, msg: Message, request: Request, count: int) -> None:
        if len(msg.fds) != count:
            raise ProtocolError(
                f"{request.name}: expected {count} fd(s), got {len(msg.fds)}", msg.body
            )

    def offered_protocol_features(self) -> int:
        features = int(BASE_PROTOCOL_FEATURES) | self.faults.extra_features
        if not self.faults.no_shmem:
            features |= 1 << self.faults.shmem_bit
        return features & ~self.faults.withhold_features

    def shmem_reply_body(self) -> bytes:
        config = self.layout.to_config()
        if self.faults.shmem_raw_sizes is not None:
            config = ShMemConfig.from_regions(self.faults.shmem_raw_sizes)
        if self.faults.shmem_nregions is not None:
            config = ShMemConfig(self.faults.shmem_nregions, config.sizes)
        return config.pack()

    def _dispatch(self, session: Session, msg: Message, request: Request) -> None:
        payload = decode_payload(request, msg.body)
        R = Request
        ok = True
        if request in (
            R.GET_FEATURES,
            R.GET_PROTOCOL_FEATURES,
            R.GET_QUEUE_NUM,
            R.GET_MAX_MEM_SLOTS,
            R.GET_STATUS,
        ):
            value = {
                R.GET_FEATURES: int(DEVICE_FEATURES),
                R.GET_PROTOCOL_FEATURES: self.offered_protocol_features(),
                R.GET_QUEUE_NUM: self.num_queues,
                R.GET_MAX_MEM_SLOTS: MAX_MEM_SLOTS,
                R.GET_STATUS: session.status,
            }[request]
            self._reply(session, request, U64(value).pack())
            return
        if request is R.GET_SHMEM_CONFIG:
            body = self.shmem_reply_body()
            size = len(body)
            if self.faults.shmem_truncate is not None:
                body = body[: self.faults.shmem_truncate]
                size = len(body)
            self._reply(session, request, body, flags=self.faults.shmem_flags, size=size)
            return
        if request is R.GET_VRING_BASE:
            assert isinstance(payload, VringState)
            # GET_VRING_BASE stops the ring; report where it stands.
            session.vring_enabled[payload.index] = False
            base = session.vring_base.get(payload.index, 0)
            self._reply(session, request, VringState(payload.index, base).pack())
            return
        if request is R.GET_CONFIG:
            assert isinstance(payload, ConfigSpace)
            # The test device has no config space of its own: answer zeros of the asked size.
            reply = ConfigSpace(payload.offset, payload.flags, bytes(len(payload.data)))
            self._reply(session, request, reply.pack())
            return
        with self._cond:
            ok = self._apply(session, msg, request, payload)
        self._ack(session, msg, request, ok)

    def _apply(self, session: Session, msg: Message, request: Request, payload: object) -> bool:
        """State changes of requests without a reply of their own. Caller holds _cond."""
        R = Request
        if request is R.SET_FEATURES:
            assert isinstance(payload, U64)
            session.features = payload.value
        elif request is R.SET_PROTOCOL_FEATURES:
            assert isinstance(payload, U64)
            offered = self.offered_protocol_features()
            if payload.value & ~offered:
                log.warning(
                    "QEMU acked protocol features 0x%x we did not offer", payload.value & ~offered
                )
            session.protocol_features = payload.value
        elif request is R.SET_OWNER:
            session.owner = True
        elif request is R.SET_BACKEND_REQ_FD:
            self._expect_fds(msg, request, 1)
            if session.channel is not None:
                session.channel.close()
            session.channel = Connection.from_fd(msg.fds.pop())
        elif request in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            assert isinstance(payload, VringFile)
            self._expect_fds(msg, request, 0 if payload.nofd else 1)
            key = (request.name, payload.index)
            old = session.vring_fds.pop(key, None)
            if old is not None:
                old.close()
            if not payload.nofd:
                session.vring_fds[key] = msg.fds.pop()
        elif request is R.SET_VRING_NUM:
            assert isinstance(payload, VringState)
            session.vring_num[payload.index] = payload.num
        elif request is R.SET_VRING_BASE:
            assert isinstance(payload, VringState)
            session.vring_base[payload.index] = payload.num
        elif request is R.SET_VRING_ADDR:
            assert isinstance(payload, VringAddr)
            session.vring_addr[payload.index] = payload
        elif request is R.SET_VRING_ENABLE:
            assert isinstance(payload, VringState)
            session.vring_enabled[payload.index] = bool(payload.num)
        elif request is R.SET_MEM_TABLE:
            assert isinstance(payload, MemoryTable)
            self._expect_fds(msg, request, len(payload.regions))
            for _, fd in session.mem_table:
                fd.close()
            session.mem_table = list(zip(payload.regions, msg.fds, strict=True))
            msg.fds = []
        elif request is R.ADD_MEM_REG:
            assert isinstance(payload, SingleMemRegion)
            self._expect_fds(msg, request, 1)
            session.mem_table.append((payload.region, msg.fds.pop()))
        elif request is R.REM_MEM_REG:
            assert isinstance(payload, SingleMemRegion)
            keep = []
            for region, fd in session.mem_table:
                same = (region.guest_addr, region.size) == (
                    payload.region.guest_addr,
                    payload.region.size,
                )
                if same:
                    fd.close()
                else:
                    keep.append((region, fd))
            found = len(keep) != len(session.mem_table)
            session.mem_table = keep
            return found
        elif request is R.SET_STATUS:
            assert isinstance(payload, U64)
            session.status = payload.value
        elif request in (R.RESET_DEVICE, R.RESET_OWNER):
            session.owner = session.owner and request is R.RESET_DEVICE
            session.status = 0
            session.vring_enabled.clear()
        elif request is R.SET_CONFIG:
            pass  # no config space: accept and ignore, as the test device has none
        else:
            log.warning("front-end request %s is not supported; failing it", request.name)
            return False
        return True

    def __repr__(self) -> str:
        mode = "connect" if self.connect_mode else "listen"
        return f"Backend({self.socket_path}, {self.layout.describe()}, {mode})"
