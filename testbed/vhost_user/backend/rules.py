"""The back-end's side of spec conformance: may QEMU send this request, with these flags and
fds, given what was negotiated? Pure: a rule table and one check; no I/O, no state.

A violation is only flagged (trace, Backend.violations); the request is still answered as
if nothing were wrong, so flagging never changes what QEMU sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from testbed.vhost_user.protocol import (
    REPLY_REQUESTS,
    U64,
    MemoryTable,
    Payload,
    ProtocolFeature,
    Request,
    VhostUserFeature,
    VringFile,
)

R = Request
P = ProtocolFeature


@dataclass(frozen=True)
class Violation:
    """One request QEMU should not have sent as it did -- or one thing a guest driver put in
    a virtqueue against the virtio spec (``request`` "VRING_<n>", a rule "vring-*" or
    "device-request": backend/vrings.py, from testbed.vhost_user.virtqueue's RingError)."""

    request: str
    rule: str  # "feature", "ack", "need-reply", "reply-flag" or "fds"; "vring-..." on queues
    detail: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Negotiation:
    """What the back-end offered and QEMU acked so far on one connection."""

    offered_features: int = 0
    acked_features: int = 0
    offered_protocol: int = 0
    acked_protocol: int = 0
    queues: int | None = None
    """The back-end's answer to GET_QUEUE_NUM on this connection; None: not asked yet."""

    @property
    def protocol(self) -> int:
        """Protocol features both sides agreed on."""
        return self.offered_protocol & self.acked_protocol


@dataclass(frozen=True)
class Need:
    """A feature a request depends on: negotiated, or (``offered``) merely offered by us."""

    feature: ProtocolFeature | VhostUserFeature
    offered: bool = False

    def met(self, n: Negotiation) -> bool:
        if isinstance(self.feature, VhostUserFeature):
            have = n.offered_features if self.offered else n.acked_features & n.offered_features
        else:
            have = n.offered_protocol if self.offered else n.protocol
        return bool(have & self.feature)

    def describe(self) -> str:
        kind = "VHOST_USER_F" if isinstance(self.feature, VhostUserFeature) else "PROTOCOL_F"
        state = "offered" if self.offered else "negotiated"
        return f"{kind}_{self.feature.name} {state}"


_OFFERED_PROTOCOL_FEATURES = Need(VhostUserFeature.PROTOCOL_FEATURES, offered=True)

# The spec's "only valid if ... has been negotiated" (or, for the first three, "offered").
NEEDS: dict[Request, Need] = {
    R.GET_PROTOCOL_FEATURES: _OFFERED_PROTOCOL_FEATURES,
    R.SET_PROTOCOL_FEATURES: _OFFERED_PROTOCOL_FEATURES,
    # "set in queried protocol features by GET_PROTOCOL_FEATURES"
    R.GET_QUEUE_NUM: Need(P.MQ, offered=True),
    R.SEND_RARP: Need(P.RARP),
    R.NET_SET_MTU: Need(P.NET_MTU),
    R.SET_BACKEND_REQ_FD: Need(P.BACKEND_REQ),
    R.SET_VRING_ENDIAN: Need(P.CROSS_ENDIAN),
    R.GET_CONFIG: Need(P.CONFIG),
    R.SET_CONFIG: Need(P.CONFIG),
    R.CREATE_CRYPTO_SESSION: Need(P.CRYPTO_SESSION),
    R.CLOSE_CRYPTO_SESSION: Need(P.CRYPTO_SESSION),
    R.POSTCOPY_ADVISE: Need(P.PAGEFAULT),
    R.POSTCOPY_LISTEN: Need(P.PAGEFAULT),
    R.POSTCOPY_END: Need(P.PAGEFAULT),
    R.GET_INFLIGHT_FD: Need(P.INFLIGHT_SHMFD),
    R.SET_INFLIGHT_FD: Need(P.INFLIGHT_SHMFD),
    R.RESET_DEVICE: Need(P.RESET_DEVICE),
    R.VRING_KICK: Need(P.INBAND_NOTIFICATIONS),
    R.GET_MAX_MEM_SLOTS: Need(P.CONFIGURE_MEM_SLOTS),
    R.ADD_MEM_REG: Need(P.CONFIGURE_MEM_SLOTS),
    R.REM_MEM_REG: Need(P.CONFIGURE_MEM_SLOTS),
    R.SET_STATUS: Need(P.STATUS),
    R.GET_STATUS: Need(P.STATUS),
    R.GET_SHARED_OBJECT: Need(P.SHARED_OBJECT),
    R.SET_DEVICE_STATE_FD: Need(P.DEVICE_STATE),
    R.CHECK_DEVICE_STATE: Need(P.DEVICE_STATE),
    R.GET_SHMEM_CONFIG: Need(P.SHMEM),
}

# Requests that carry exactly one fd; SET_MEM_TABLE and the vring files are decided by their
# payload, SET_LOG_BASE by LOG_SHMFD; every other request carries none.
ONE_FD = frozenset(
    {
        R.SET_LOG_FD,
        R.SET_BACKEND_REQ_FD,
        R.SET_INFLIGHT_FD,
        R.GPU_SET_SOCKET,
        R.ADD_MEM_REG,
        R.SET_DEVICE_STATE_FD,
    }
)
VRING_FILES = frozenset({R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR})
# The requests that name one ring by index.
RING_REQUESTS = VRING_FILES | {
    R.SET_VRING_NUM,
    R.SET_VRING_ADDR,
    R.SET_VRING_BASE,
    R.GET_VRING_BASE,
    R.SET_VRING_ENABLE,
}


def expected_fds(request: Request, payload: Payload | None, n: Negotiation) -> int | None:
    """How many fds ``request`` must carry; None when the payload did not decode."""
    if request is R.SET_MEM_TABLE:
        return len(payload.regions) if isinstance(payload, MemoryTable) else None
    if request in VRING_FILES:
        return (0 if payload.nofd else 1) if isinstance(payload, VringFile) else None
    if request is R.SET_LOG_BASE:
        return 1 if n.protocol & P.LOG_SHMFD else 0
    return 1 if request in ONE_FD else 0


def check(
    request: Request,
    *,
    need_reply: bool,
    is_reply: bool,
    nfds: int,
    payload: Payload | None,
    n: Negotiation,
) -> list[Violation]:
    """Every rule ``request`` breaks, given the negotiation before it arrived."""
    found: list[Violation] = []

    def flag(rule: str, detail: str) -> None:
        found.append(Violation(request.name, rule, detail))

    need = NEEDS.get(request)
    if need is not None and not need.met(n):
        flag("feature", f"sent without {need.describe()}")
    if request is R.SET_PROTOCOL_FEATURES and isinstance(payload, U64):
        extra = payload.value & ~n.offered_protocol
        if extra:
            flag("ack", f"acks protocol features 0x{extra:x} that were not offered")
    if request is R.SET_FEATURES and isinstance(payload, U64):
        extra = payload.value & ~n.offered_features
        if extra:
            flag("ack", f"acks device features 0x{extra:x} that were not offered")
    if need_reply and request not in REPLY_REQUESTS and not n.protocol & P.REPLY_ACK:
        flag("need-reply", "NEED_REPLY set without PROTOCOL_F_REPLY_ACK negotiated")
    if is_reply:
        flag("reply-flag", "a request with the REPLY flag set")
    expected = expected_fds(request, payload, n)
    if expected is not None and nfds != expected:
        flag("fds", f"carries {nfds} fd(s), the spec wants {expected}")
    ring = ring_index(request, payload)
    if ring is not None and n.queues is not None and ring >= n.queues:
        # GET_QUEUE_NUM: "Query how many queues the back-end supports"; a front-end that
        # asked and then sets up a ring beyond the answer uses a queue the back-end said it
        # does not have (QEMU's vhost-user-blk refuses such a back-end at realize).
        flag(
            "queue-count",
            f"ring {ring}, but the back-end answered GET_QUEUE_NUM with {n.queues}",
        )
    return found


def ring_index(request: Request, payload: Payload | None) -> int | None:
    """The ring a per-ring request names; None for any other request (or no payload)."""
    if request not in RING_REQUESTS or payload is None:
        return None
    index = getattr(payload, "index", None)
    return index if isinstance(index, int) else None
