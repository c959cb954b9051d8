"""The vrings of one connection: what SET_VRING_* said about each, and serving a kicked one.

State (:class:`Vring`) is written by the handlers; serving (:class:`RingService`) runs on
the serving thread when a ring's kick eventfd is readable: it builds the split queue from
the ring's state and the current memory table (rebuilt from scratch each time, so a new
SET_MEM_TABLE -- QEMU sends one after every SHMEM_MAP -- or SET_VRING_ADDR is simply
picked up), pops every available chain, lets the device model answer it, publishes the
used entries and signals the call eventfd when the driver wants an interrupt.

Bad chains are completed with used length 0 and the queue goes on (see virtqueue.py); a
bad ring is marked broken, never served again on this connection, and the err eventfd is
signalled (QEMU prints "vhost vring error in virtqueue N"). Both become Violations.

A chain the model answers :class:`~testbed.vhost_user.devices.base.Later` (its answer waits
on QEMU: virtio-fs's FUSE_SETUPMAPPING is a SHMEM_MAP) stays outstanding on its ring while
the chains after it are served. Its answer comes back through ``deliver`` (any thread: a
queue and a wake-up socket the serving thread watches) and is written and completed by
``finish_answers`` on the serving thread. Why there and not on the thread that has the
answer: the serving thread alone writes the used rings and the guest memory the rings live
in, so no lock has to span a ring's indices, the used ring and the memory table -- which
the serving thread replaces whenever QEMU sends SET_MEM_TABLE, as it does *during* every
SHMEM_MAP; a worker writing into the old mapping would race with its munmap. A chain is
completed once: ``finish_answers`` completes only a Later that is still the outstanding one
for its head on its ring, and a stop (GET_VRING_BASE), a reset or the end of the session
forgets the outstanding chains -- their late answers are dropped, never written into a ring
the driver has started afresh.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue

from testbed.errors import GuestMemoryError, RingError
from testbed.resource import Closeable
from testbed.vhost_user.backend.mappings import Mappings
from testbed.vhost_user.codes import VhostUserFeature
from testbed.vhost_user.devices.base import Completion, DeviceModel, Later, Problem
from testbed.vhost_user.memory import MappedMemory
from testbed.vhost_user.protocol import VringAddr
from testbed.vhost_user.rules import Violation
from testbed.vhost_user.trace import QUEUE_REPLY, QUEUE_REQUEST, Trace, TraceEntry
from testbed.vhost_user.virtqueue import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    Chain,
    RingLayout,
    SplitQueue,
    avail_ring_bytes,
    check_size,
    desc_table_bytes,
    used_ring_bytes,
)

log = logging.getLogger(__name__)

KICK = "SET_VRING_KICK"
CALL = "SET_VRING_CALL"
ERR = "SET_VRING_ERR"
_EVENTFD_ONE = (1).to_bytes(8, "little")


@dataclass
class Vring:
    """One ring's vhost-user state on one connection."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    last_avail: int = 0
    """SET_VRING_BASE's value, then advanced as chains are popped; GET_VRING_BASE's answer."""
    next_used: int = 0
    enabled: bool = False
    started: bool = False
    """A kick fd arrived (the spec's "started"); GET_VRING_BASE stops the ring."""
    broken: str | None = None
    """Why the ring is no longer served (None: it is fine)."""
    caught_up: bool = False
    """Served once since it became servable (the back-end looks before the first kick)."""

    base_high: int = 0
    """SET_VRING_BASE's bits above the split ring's 16-bit index (a packed ring's wrap
    counter and used index: never served here), kept to be answered as they came."""
    outstanding: dict[int, Later] = field(default_factory=dict)
    """Chains taken off the ring and not completed yet, by head (answered Later)."""

    def set_base(self, base: int) -> None:
        # Split rings: the low 16 bits are the next available index. Nothing is
        # outstanding on a ring that starts here.
        self.last_avail = self.next_used = base & 0xFFFF
        self.base_high = base & ~0xFFFF
        self.outstanding.clear()

    def stop(self) -> int:
        """GET_VRING_BASE: stop serving; the index to resume from. Chains still
        outstanding are forgotten: the stop is a reset or a disconnect (QEMU 11.1's
        vhost-user-base stops the device for nothing else we drive), after which the driver
        has no use for their answers."""
        self.started = False
        if self.outstanding:
            log.info("vring %d stopped with %d chain(s) outstanding; their answers will be "
                     "dropped", self.index, len(self.outstanding))  # fmt: skip
            self.outstanding.clear()
        return self.base_high | self.last_avail


def kick_fd(mappings: Mappings, features: int, ring: Vring) -> int | None:
    """The fd to watch for ``ring``'s kicks, if the ring is to be served now. Without
    VHOST_USER_F_PROTOCOL_FEATURES acked (``features``: SET_FEATURES) a ring is enabled
    from the start; with it, only after SET_VRING_ENABLE."""
    enabled = ring.enabled or not features & VhostUserFeature.PROTOCOL_FEATURES
    if not (ring.started and enabled) or ring.broken is not None:
        return None
    fd = mappings.vring_fds.get((KICK, ring.index))
    return None if fd is None else fd.fileno()


def signal(mappings: Mappings, request: str, index: int) -> None:
    """Write 1 to ring ``index``'s call or err eventfd, if QEMU gave one."""
    fd = mappings.vring_fds.get((request, index))
    if fd is None:
        return
    try:
        os.write(fd.fileno(), _EVENTFD_ONE)
    except OSError as exc:
        log.error("vring %d: cannot signal its %s fd: %s", index, request, exc)


class RingService(Closeable):
    """Serves the kicked rings of one back-end for its device model, and completes the
    chains it answered Later once their answers are delivered."""

    def __init__(
        self,
        model: DeviceModel,
        trace: Trace,
        notify: Callable[[TraceEntry], None],
        report: Callable[[list[Violation]], None],
    ) -> None:
        self.model = model
        self.trace = trace
        self._notify = notify
        self._report = report
        self._answers: SimpleQueue[Later] = SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    @property
    def answers(self) -> socket.socket:
        """Readable when delivered answers wait for finish_answers (the serving thread's
        selector watches it)."""
        return self._wake_r

    def deliver(self, later: Later) -> None:
        """A Later's answer is ready (any thread): queue it for the serving thread."""
        self._answers.put(later)
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the socket is full of wake-ups already: the serving thread will look
        except OSError as exc:
            log.warning("answer to %s (chain %d) after the back-end closed: %s", later.name,
                        later.head, exc)  # fmt: skip

    def _delivered(self) -> Iterator[Later]:
        """The delivered answers, taken off the queue. The wake-ups are drained first: an
        answer delivered after the queue was emptied leaves its own wake-up behind."""
        while True:
            try:
                if not self._wake_r.recv(4096):
                    break
            except OSError:  # BlockingIOError: drained
                break
        while True:
            try:
                yield self._answers.get_nowait()
            except Empty:
                return

    def finish_answers(self, mappings: Mappings, features: int, rings: Mapping[int, Vring]) -> None:
        """Complete every delivered chain that is still outstanding (serving thread)."""
        for later in self._delivered():
            ring = rings.get(later.queue)
            if ring is None or ring.outstanding.get(later.head) is not later:
                self._drop(later)
                continue
            del ring.outstanding[later.head]
            self._finish(mappings, features, ring, later)

    def drop_answers(self) -> None:
        """No session: every delivered answer is dropped (serving thread)."""
        for later in self._delivered():
            self._drop(later)

    def _drop(self, later: Later) -> None:
        log.info("answer to %s (queue %d, chain %d) dropped: the chain is no longer "
                 "outstanding (ring stopped or reset, or the connection ended)", later.name,
                 later.queue, later.head)  # fmt: skip

    def _finish(self, mappings: Mappings, features: int, ring: Vring, later: Later) -> None:
        if ring.broken is not None:
            self._drop(later)
            return
        with self._opened(mappings, features, ring) as (memory, queue):
            try:
                done = later.finish(memory)
            except GuestMemoryError as exc:
                # The chain's writable buffers were checked when it was popped; a memory
                # table without them now is QEMU's doing. Give the chain back empty.
                done = Completion(
                    0, later.name, later.code, problems=(Problem("vring-desc-range", str(exc)),)
                )
            found = [Violation(_request(ring.index), p.rule, p.detail) for p in done.problems]
            queue.push(memory, later.head, done.written)
            self._record(
                QUEUE_REPLY, ring.index, later.head, done.code, done.name, done.written,
                done.reply, violations=found,
            )  # fmt: skip
            if found:
                self._report(found)

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def kicked(self, mappings: Mappings, features: int, ring: Vring) -> None:
        """Ring ``ring``'s kick fd is readable: consume the kick, serve the ring."""
        fd = kick_fd(mappings, features, ring)
        if fd is None:
            return
        try:
            os.read(fd, 8)
        except BlockingIOError:
            pass  # another reader took it; serve anyway, nothing is lost by looking
        except OSError as exc:
            # A kick fd we cannot read would wake the selector for ever: stop watching it.
            ring.broken = f"its kick fd cannot be read: {exc}"
            log.error("vring %d: %s; no longer served", ring.index, ring.broken)
            return
        self.serve(mappings, features, ring)

    def serve(self, mappings: Mappings, features: int, ring: Vring) -> None:
        """Answer every available chain of ``ring``; a bad ring is marked broken."""
        if ring.broken is not None:
            return
        with self._opened(mappings, features, ring) as (memory, queue):
            while True:
                self._drain(ring, queue, memory)
                # With EVENT_IDX, a chain made available before avail_event was written came
                # without a kick: look once more after writing it.
                queue.publish_avail_event(memory)
                if not queue.pending(memory):
                    break

    @contextmanager
    def _opened(
        self, mappings: Mappings, features: int, ring: Vring
    ) -> Iterator[tuple[MappedMemory, SplitQueue]]:
        """``ring`` as a SplitQueue over the current memory table, for the block's pops
        and pushes. Afterwards the ring keeps the queue's indices and the driver is
        notified of the completions if it wants to be; a RingError or GuestMemoryError in
        the block breaks the ring (it is not raised further)."""
        queue: SplitQueue | None = None
        old_used = ring.next_used
        try:
            memory = mappings.memory()
            queue = self._queue(memory, features, ring)
            yield memory, queue
            if queue.needs_interrupt(memory, old_used):
                signal(mappings, CALL, ring.index)
        except (RingError, GuestMemoryError) as exc:
            self._break(mappings, ring, exc)
            if queue is not None and queue.next_used != old_used:
                signal(mappings, CALL, ring.index)  # what was completed is the driver's
        finally:
            if queue is not None:
                ring.last_avail, ring.next_used = queue.last_avail_idx, queue.next_used

    def _queue(self, memory: MappedMemory, features: int, ring: Vring) -> SplitQueue:
        if ring.addr is None:
            raise RingError("vring-addr", "kicked before any SET_VRING_ADDR", broken=True)
        check_size(ring.num)
        addr, size = ring.addr, ring.num
        try:
            layout = RingLayout(
                size,
                desc=memory.user_to_guest(addr.descriptor, desc_table_bytes(size)),
                avail=memory.user_to_guest(addr.available, avail_ring_bytes(size)),
                used=memory.user_to_guest(addr.used, used_ring_bytes(size)),
            )
        except GuestMemoryError as exc:
            raise RingError("vring-addr", f"SET_VRING_ADDR: {exc}", broken=True) from exc
        layout.check(memory)
        agreed = features & self.model.features
        return SplitQueue(
            layout,
            indirect=bool(agreed & F_INDIRECT_DESC),
            event_idx=bool(agreed & F_EVENT_IDX),
            last_avail_idx=ring.last_avail,
            next_used=ring.next_used,
        )

    def _drain(self, ring: Vring, queue: SplitQueue, memory: MappedMemory) -> None:
        index = ring.index
        while True:
            try:
                chain = queue.pop(memory)
            except RingError as exc:
                if exc.broken or exc.head is None:
                    raise
                self._complete_bad(index, queue, memory, exc.head, exc)
                continue
            if chain is None:
                return
            if chain.head in ring.outstanding:
                # The driver made a head available again before we gave it back.
                bad = RingError(
                    "vring-index", "made available again while still outstanding", head=chain.head
                )
                self._complete_bad(index, queue, memory, chain.head, bad)
                continue
            self._answer(ring, queue, memory, chain)

    def _answer(self, ring: Vring, queue: SplitQueue, memory: MappedMemory, chain: Chain) -> None:
        index = ring.index
        try:
            done = self.model.handle(index, chain, memory)
        except RingError as exc:
            self._complete_bad(index, queue, memory, chain.head, exc)
            return
        except GuestMemoryError as exc:
            bad = RingError("vring-desc-range", str(exc), head=chain.head)
            self._complete_bad(index, queue, memory, chain.head, bad)
            return
        found = [Violation(_request(index), p.rule, p.detail) for p in done.problems]
        self._record(
            QUEUE_REQUEST, index, chain.head, done.code, done.name, chain.readable_bytes,
            done.request, violations=found,
        )  # fmt: skip
        if isinstance(done, Later):
            # Traced first, outstanding next, then the work may start (begin): nothing the
            # work sends to QEMU can precede the request in the trace, and an answer
            # delivered at once finds its chain outstanding.
            ring.outstanding[chain.head] = done
            if found:
                self._report(found)
            done.begin(index, chain.head, self.deliver)
            return
        queue.push(memory, chain.head, done.written)
        self._record(QUEUE_REPLY, index, chain.head, done.code, done.name, done.written, done.reply)
        if found:
            self._report(found)

    def _complete_bad(
        self, index: int, queue: SplitQueue, memory: MappedMemory, head: int, exc: RingError
    ) -> None:
        """A chain against the spec: flagged, and given back with used length 0 so the
        driver is not left waiting for it."""
        found = [Violation(_request(index), exc.rule, f"chain at head {head}: {exc.detail}")]
        self._record(
            QUEUE_REQUEST, index, head, -1, "BAD_CHAIN", 0, None, error=str(exc), violations=found
        )
        queue.push(memory, head, 0)
        self._record(QUEUE_REPLY, index, head, -1, "BAD_CHAIN", 0, None)
        self._report(found)

    def _break(self, mappings: Mappings, ring: Vring, exc: RingError | GuestMemoryError) -> None:
        rule, detail = (
            (exc.rule, exc.detail) if isinstance(exc, RingError) else ("vring-addr", str(exc))
        )
        ring.broken = detail
        found = [Violation(_request(ring.index), rule, f"queue no longer served: {detail}")]
        self._record(
            QUEUE_REQUEST, ring.index, None, -1, "BROKEN", 0, None, error=str(exc),
            violations=found,
        )  # fmt: skip
        log.error("vring %d: %s; no longer served", ring.index, exc)
        signal(mappings, ERR, ring.index)
        self._report(found)

    def _record(
        self,
        direction: str,
        index: int,
        head: int | None,
        code: int,
        name: str,
        size: int,
        payload: dict[str, object] | None,
        *,
        error: str | None = None,
        violations: list[Violation] | None = None,
    ) -> None:
        entry = self.trace.record_queue(
            direction, index, head, code, name, size, payload, error=error,
            violations=[v.to_json() for v in violations or ()],
        )  # fmt: skip
        self._notify(entry)


def _request(index: int) -> str:
    """The 'request' of a queue Violation: which ring."""
    return f"VRING_{index}"
