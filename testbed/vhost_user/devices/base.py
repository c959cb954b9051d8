"""What a device model is to the back-end: its features, config space, queues, and the
handling of one request chain. The vhost-user side (backend/handlers.py: one handler per
front-end request) delegates everything device-specific here.

A model runs on the back-end's serving thread: ``handle`` for every chain of a kicked ring,
``start``/``stop`` when the vhost device starts (the guest set DRIVER_OK; see
Session.driver_ok) and stops (GET_VRING_BASE, a reset, a disconnect). Anything that must
wait for QEMU (a SHMEM_MAP waits for QEMU's reply, and QEMU answers only once the serving
thread has answered QEMU's own requests) goes through ``host.defer``.
"""

from __future__ import annotations

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

    def handle(self, queue: int, chain: Chain, memory: GuestMemory) -> Completion:
        """Serve one chain of ``queue``; raise RingError("device-request", ...) only for a
        chain that cannot be answered at all (it is then completed with used length 0)."""
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
