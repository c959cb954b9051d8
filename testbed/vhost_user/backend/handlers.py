"""The back-end's side of each front-end request: one handler per request.

What is device-specific (queue count, config space) is the device model's
(testbed.vhost_user.devices); the handlers keep the vhost-user state -- rings, memory
table, fds -- in the session. A handler gets the connection's session, the message (its
fds, already counted by the dispatcher, are the handler's to take) and the decoded
payload. It returns a Reply for a request with a reply of its own, else True/False for
REPLY_ACK. Handlers run on the serving thread under the back-end's lock; they never touch
the socket (the dispatcher answers). Feature negotiation is not here: the dispatcher owns
it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from testbed.errors import ProtocolError
from testbed.vhost_user.backend import offer
from testbed.vhost_user.backend.session import Session
from testbed.vhost_user.backend.vrings import KICK
from testbed.vhost_user.codes import Request
from testbed.vhost_user.connection import Connection, Message
from testbed.vhost_user.devices.base import DeviceModel
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import (
    U64,
    ConfigSpace,
    MemoryTable,
    ShMemConfig,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
)


@dataclass(frozen=True)
class Reply:
    body: bytes
    flags: int | None = None  # header flags; None: VERSION | REPLY


Result = Reply | bool


def u64(value: int) -> Reply:
    return Reply(U64(value).pack())


log = logging.getLogger(__name__)


class DeviceHandler:
    def __init__(self, model: DeviceModel, faults: Faults) -> None:
        self.model = model
        self.faults = faults

    # --- requests with a reply of their own ----------------------------------------------

    def get_queue_num(self, s: Session, msg: Message, p: None) -> Result:
        # The device's own queue count, unless a fault announces another on purpose.
        count = self.model.num_queues if self.faults.queue_num is None else self.faults.queue_num
        s.queues = count
        return u64(count)

    def get_max_mem_slots(self, s: Session, msg: Message, p: None) -> Result:
        return u64(offer.MAX_MEM_SLOTS)

    def get_status(self, s: Session, msg: Message, p: None) -> Result:
        return u64(s.status)

    def get_shmem_config(self, s: Session, msg: Message, p: None) -> Result:
        body = offer.shmem_config_body(self.model.layout, self.faults)
        if self.faults.shmem_truncate is not None:
            body = body[: self.faults.shmem_truncate]
        try:
            s.served = ShMemConfig.unpack(body).regions  # what our own maps are judged by
        except ProtocolError:
            s.served = None
        return Reply(body, flags=self.faults.shmem_flags)

    def get_vring_base(self, s: Session, msg: Message, p: VringState) -> Result:
        # GET_VRING_BASE stops the ring; report where it stands.
        ring = s.ring(p.index)
        ring.enabled = False
        return Reply(VringState(p.index, ring.stop()).pack())

    def get_config(self, s: Session, msg: Message, p: ConfigSpace) -> Result:
        # The model's config space; bytes past its end (or all, without one) read as zero.
        space = self.model.config()
        data = space[p.offset : p.offset + len(p.data)]
        return Reply(ConfigSpace(p.offset, p.flags, data.ljust(len(p.data), b"\0")).pack())

    # --- requests answered by REPLY_ACK (when asked for) ---------------------------------

    def set_owner(self, s: Session, msg: Message, p: None) -> Result:
        s.owner = True
        return True

    def reset(self, s: Session, msg: Message, p: None) -> Result:
        """RESET_OWNER and RESET_DEVICE; only RESET_DEVICE keeps the owner."""
        s.owner = s.owner and msg.header.request == Request.RESET_DEVICE
        s.status = 0
        s.rings.clear()
        return True

    def set_backend_req_fd(self, s: Session, msg: Message, p: None) -> Result:
        if s.channel is not None:
            s.channel.close()
        s.channel = Connection.from_fd(msg.fds.pop())
        return True

    def set_vring_fd(self, s: Session, msg: Message, p: VringFile) -> Result:
        """SET_VRING_KICK/CALL/ERR: keep the eventfd (closing the one it replaces)."""
        name = Request(msg.header.request).name
        s.mappings.set_vring_fd(name, p.index, None if p.nofd else msg.fds.pop())
        if name == KICK:
            # The spec: a ring starts when its kick arrives. Without an fd the driver's
            # kicks never reach us (polling mode, which we do not do).
            s.ring(p.index).started = True
            if p.nofd:
                log.warning("vring %d: SET_VRING_KICK without an fd; it is never served", p.index)
        return True

    def set_vring_num(self, s: Session, msg: Message, p: VringState) -> Result:
        s.ring(p.index).num = p.num
        return True

    def set_vring_base(self, s: Session, msg: Message, p: VringState) -> Result:
        s.ring(p.index).set_base(p.num)
        return True

    def set_vring_addr(self, s: Session, msg: Message, p: VringAddr) -> Result:
        s.ring(p.index).addr = p
        return True

    def set_vring_enable(self, s: Session, msg: Message, p: VringState) -> Result:
        s.ring(p.index).enabled = bool(p.num)
        return True

    def set_mem_table(self, s: Session, msg: Message, p: MemoryTable) -> Result:
        s.mappings.set_mem_table(p.regions, msg.fds)
        return True

    def add_mem_reg(self, s: Session, msg: Message, p: SingleMemRegion) -> Result:
        s.mappings.add_region(p.region, msg.fds.pop())
        return True

    def rem_mem_reg(self, s: Session, msg: Message, p: SingleMemRegion) -> Result:
        return s.mappings.remove_region(p.region)

    def set_status(self, s: Session, msg: Message, p: U64) -> Result:
        s.status = p.value
        return True

    def set_config(self, s: Session, msg: Message, p: ConfigSpace) -> Result:
        return self.model.set_config(p.offset, p.data)


Handler = Callable[[DeviceHandler, Session, Message, Any], Result]
D = DeviceHandler
R = Request
HANDLERS: dict[Request, Handler] = {
    R.GET_QUEUE_NUM: D.get_queue_num,
    R.GET_MAX_MEM_SLOTS: D.get_max_mem_slots,
    R.GET_STATUS: D.get_status,
    R.GET_SHMEM_CONFIG: D.get_shmem_config,
    R.GET_VRING_BASE: D.get_vring_base,
    R.GET_CONFIG: D.get_config,
    R.SET_OWNER: D.set_owner,
    R.RESET_OWNER: D.reset,
    R.RESET_DEVICE: D.reset,
    R.SET_BACKEND_REQ_FD: D.set_backend_req_fd,
    R.SET_VRING_KICK: D.set_vring_fd,
    R.SET_VRING_CALL: D.set_vring_fd,
    R.SET_VRING_ERR: D.set_vring_fd,
    R.SET_VRING_NUM: D.set_vring_num,
    R.SET_VRING_BASE: D.set_vring_base,
    R.SET_VRING_ADDR: D.set_vring_addr,
    R.SET_VRING_ENABLE: D.set_vring_enable,
    R.SET_MEM_TABLE: D.set_mem_table,
    R.ADD_MEM_REG: D.add_mem_reg,
    R.REM_MEM_REG: D.rem_mem_reg,
    R.SET_STATUS: D.set_status,
    R.SET_CONFIG: D.set_config,
}
# The handlers that take fds: a wrong count there is a malformed message (dropped), not
# only a flagged one.
TAKES_FDS = frozenset(
    {R.SET_BACKEND_REQ_FD, R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR}
    | {R.SET_MEM_TABLE, R.ADD_MEM_REG}
)
