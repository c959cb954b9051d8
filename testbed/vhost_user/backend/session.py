"""One front-end connection's state; a new connection starts from scratch."""

from __future__ import annotations

from dataclasses import dataclass, field

from testbed.vhost_user.backend.mappings import Mappings
from testbed.vhost_user.backend.vrings import Vring
from testbed.vhost_user.codes import STATUS_DRIVER_OK, Request
from testbed.vhost_user.connection import Connection
from testbed.vhost_user.endpoint import DisconnectKind

__all__ = ["DisconnectKind", "Session"]


@dataclass
class Session:
    number: int
    conn: Connection
    features: int = 0  # acked by SET_FEATURES
    protocol_features: int = 0  # acked by SET_PROTOCOL_FEATURES
    queues: int | None = None  # what we answered to GET_QUEUE_NUM
    owner: bool = False
    status: int = 0
    mappings: Mappings = field(default_factory=Mappings)
    rings: dict[int, Vring] = field(default_factory=dict)
    channel: Connection | None = None  # the back-end channel (SET_BACKEND_REQ_FD)
    requests: list[Request] = field(default_factory=list)
    started: bool = False  # the device model was started for this connection
    served: dict[int, int] | None = None
    """The shared-memory config GET_SHMEM_CONFIG answered (shmid -> size); None: not asked,
    or the answer was bent past decoding on purpose (a fault)."""

    def ring(self, index: int) -> Vring:
        """Ring ``index``'s state (a fresh one the first time QEMU names it)."""
        ring = self.rings.get(index)
        if ring is None:
            ring = self.rings[index] = Vring(index)
        return ring

    def close(self) -> None:
        if self.channel is not None:
            # Wake a map()/unmap() blocked on a reply before the fd goes away.
            self.channel.shutdown()
            self.channel.close()
            self.channel = None
        self.mappings.close()
        self.conn.close()

    @property
    def mem_table_set(self) -> bool:
        return any(r in self.requests for r in (Request.SET_MEM_TABLE, Request.ADD_MEM_REG))

    @property
    def driver_ok(self) -> bool:
        """The device was started (the guest set DRIVER_OK)."""
        if self.status & STATUS_DRIVER_OK:
            return True
        # QEMU 11.1.3 never sends SET_STATUS with DRIVER_OK for this device (only
        # FEATURES_OK, from SET_FEATURES), so vhost_dev_start is the proof: features acked,
        # a memory table, an enabled ring -- all sent once the guest wrote DRIVER_OK.
        return (
            Request.SET_FEATURES in self.requests
            and self.mem_table_set
            and any(ring.enabled for ring in self.rings.values())
        )
