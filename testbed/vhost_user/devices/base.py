"""What a device model is to the back-end: its features, config space, queues, and the
handling of one request chain. The vhost-user side (backend/handlers.py: one handler per
front-end request) delegates everything device-specific here.

A model runs on the back-end's serving thread: ``handle`` for every chain of a kicked ring,
``start``/``stop`` when the vhost device starts (the guest set DRIVER_OK; see
Session.driver_ok) and stops (GET_VRING_BASE, a reset, a disconnect). Anything that must
wait for QEMU (a SHMEM_MAP waits for QEMU's reply, and QEMU answers only once the serving
thread has answered QEMU's own requests) goes through ``host.defer``.

A chain whose answer needs such a wait (virtio-fs: FUSE_SETUPMAPPING is a SHMEM_MAP) is
answered :class:`Later`: the back-end takes it off the ring, the device works on it off the
serving thread and hands the answer back with ``Later.resolve``; the back-end then writes
it and completes the chain on the serving thread, out of order with the chains after it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from testbed.device import ShmemLayout
from testbed.errors import ConfigError, StateError
from testbed.vhost_user.memory import GuestMemory
from testbed.vhost_user.virtqueue import Chain


class DeviceHost(Protocol):
    """What the back-end lends a device model."""

    def map(
        self,
        shmid: int,
        shm_offset: int,
        length: int,
        fd: int,
        fd_offset: int = 0,
        writable: bool = True,
    ) -> int:
        """SHMEM_MAP on the back-end channel; QEMU's verdict (0 = mapped). Blocks for
        QEMU's reply: call it from a deferred action only."""
        ...

    def unmap(self, shmid: int, shm_offset: int, length: int) -> int:
        """SHMEM_UNMAP on the back-end channel; QEMU's verdict (0 = unmapped). Blocks for
        QEMU's reply, like map()."""
        ...

    def defer(self, what: str, action: Callable[[], None]) -> None:
        """Run ``action`` on the back-end's worker thread, after what the serving thread is
        doing now; the back-end's waits wake when it is done."""
        ...


@dataclass(frozen=True)
class Problem:
    """A rule the driver broke in one request (becomes a Violation of the back-end)."""

    rule: str
    detail: str


@dataclass(frozen=True)
class Completion:
    """How a device answered one chain: the used length, and what the trace shows."""

    written: int
    name: str
    """The device's name for the request ("FLUSH", "UNKNOWN_7", "SHORT")."""
    code: int = -1
    """The request's type as the driver sent it; -1 when it could not be read."""
    request: dict[str, Any] = field(default_factory=dict)
    reply: dict[str, Any] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()


Finish = Callable[[GuestMemory], Completion]
"""Writes a chain's answer into guest memory and says how (run on the serving thread)."""


class Later:
    """A chain answered later, off the serving thread: ``handle``'s other answer.

    The back-end traces the request, keeps the chain as outstanding on its ring and calls
    ``begin``, which starts the device's work (``start``: e.g. submit it to ``host.defer``).
    Only then can the work run, so the trace shows the request before anything the work
    sends to QEMU. The work calls ``resolve`` once, from any thread, with how to write the
    answer; the back-end is handed the Later (``deliver``) and calls ``finish`` on its
    serving thread, with the memory table current at that moment -- QEMU replaces it after
    every SHMEM_MAP, so a memory view taken when the chain was popped may be gone by then.
    """

    def __init__(
        self,
        name: str,
        code: int,
        start: Callable[[Later], None],
        request: dict[str, Any] | None = None,
        problems: tuple[Problem, ...] = (),
    ) -> None:
        self.name = name
        self.code = code
        self.request = request or {}
        self.problems = problems
        """Rules the request broke, known when it was popped (traced with the request)."""
        self.queue = -1
        self.head = -1
        self._start = start
        self._lock = threading.Lock()
        self._deliver: Callable[[Later], None] | None = None
        self._finish: Finish | None = None

    def begin(self, queue: int, head: int, deliver: Callable[[Later], None]) -> None:
        """The back-end took chain ``head`` of ``queue`` off the ring: start the work;
        ``deliver`` (thread-safe) gets this Later back once it is resolved."""
        with self._lock:
            if self._deliver is not None:
                raise StateError("begun", "new", f"Later {self.name}")
            self.queue, self.head, self._deliver = queue, head, deliver
        self._start(self)

    def resolve(self, finish: Finish) -> None:
        """The answer is ready (any thread, once): hand it to the back-end."""
        with self._lock:
            if self._deliver is None or self._finish is not None:
                state = "not begun" if self._deliver is None else "resolved"
                raise StateError(state, "begun, unresolved", f"Later {self.name}")
            self._finish = finish
            deliver = self._deliver
        deliver(self)

    def finish(self, memory: GuestMemory) -> Completion:
        """Write the answer into ``memory`` (the back-end's serving thread)."""
        with self._lock:
            finish = self._finish
        if finish is None:
            raise StateError("unresolved", "resolved", f"Later {self.name}")
        return finish(memory)


class DeviceModel:
    """Base of the device models. Subclasses set the class attributes and override what
    their device does; the defaults are a device with no config space that never looks at
    its queues."""

    name: ClassVar[str] = "device"
    serves_queues: ClassVar[bool] = True
    """False: the back-end keeps the rings' state for QEMU but never serves a kick."""

    def __init__(
        self,
        *,
        num_queues: int,
        layout: ShmemLayout | None = None,
        features: int = 0,
        config_size: int = 0,
    ) -> None:
        if num_queues < 1:
            raise ConfigError(f"{self.name} device: {num_queues} queues, use at least 1")
        self.num_queues = num_queues
        self.layout = layout or ShmemLayout()
        self.features = features
        """Virtio device feature bits offered on top of VERSION_1 (ring features included)."""
        self.config_size = config_size
        self.started = 0
        """How many times the device was started (DRIVER_OK)."""
        self.running = False

    def config(self) -> bytes:
        """The whole config space (config_size bytes), as GET_CONFIG serves it."""
        return bytes(self.config_size)

    def set_config(self, offset: int, data: bytes) -> bool:
        """SET_CONFIG: False to fail it. Default: accepted and ignored (read-only space)."""
        return True

    def handle(self, queue: int, chain: Chain, memory: GuestMemory) -> Completion | Later:
        """Serve one chain of ``queue``; raise RingError("device-request", ...) only for a
        chain that cannot be answered at all (it is then completed with used length 0).
        A Later: the chain is answered later, off the serving thread (see Later)."""
        raise StateError("no request handling", "a device model that serves queues", self.name)

    def start(self, host: DeviceHost) -> None:
        """The vhost device started (the guest set DRIVER_OK)."""
        self.started += 1
        self.running = True

    def stop(self) -> None:
        """The vhost device stopped (GET_VRING_BASE, a reset or a disconnect)."""
        self.running = False

    def describe(self) -> str:
        return f"{self.name}({self.num_queues} queue(s), {self.layout.describe()})"
