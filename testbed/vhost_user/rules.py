"""The vhost-user spec's rules, as checks of one message each (pure: no I/O, no state).

Who asks, and about what:

- QEMU's front-end requests (``check_request``): may QEMU send this request, with these
  flags and fds, given what was negotiated? Our back-end's dispatcher and the relay ask.
- The back-end's answers and its channel requests (``header_violations``, ``check_offer``,
  ``check_reply``, ``check_channel_request``, ``check_channel_reply``): the relay asks, for
  a back-end we did not write.
- SHMEM_MAP / SHMEM_UNMAP against the served config (``shmem_map_problems``: shmid, length,
  range, fd range, page alignment, overlap with a live mapping, an UNMAP of a whole
  mapping; ``shmem_map_fds``): the relay and the fuzzer's oracle (testbed.fuzz.oracle) ask,
  each wording the answer its own way; ``SPEC`` holds the spec's words each rule rests on.

A violation is only flagged (trace, ``violations``); the message is still answered or
passed on as if nothing were wrong, so flagging never changes what either side sees.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from testbed.errors import ProtocolError
from testbed.limits import PAGE_SIZE
from testbed.vhost_user.codes import (
    F_SHMEM,
    BackendRequest,
    ProtocolFeature,
    Request,
    VhostUserFeature,
    request_name,
)
from testbed.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_RESERVED_MASK,
    FLAG_VERSION_MASK,
    REPLY_REQUESTS,
    U64,
    VERSION,
    Header,
    MemoryTable,
    MMap,
    Payload,
    ShMemConfig,
    VringFile,
    decode_payload,
)

R = Request
P = ProtocolFeature


@dataclass(frozen=True)
class Violation:
    """One request QEMU should not have sent as it did -- or one thing a guest driver put in
    a virtqueue against the virtio spec (``request`` "VRING_<n>", a rule "vring-*" or
    "device-request": backend/vrings.py, from testbed.vhost_user.virtqueue's RingError)."""

    request: str
    rule: str
    """"feature", "ack", "need-reply", "reply-flag", "fds", "queue-count", "header",
    "unknown-request", "unsolicited", "reply-order", "reply-size", "shmem-config",
    "shmem-bit", "payload", "shmem-map" or "framing"; "vring-..." on queues."""
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


# --- QEMU's front-end requests --------------------------------------------------------------


def check_request(
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
        flag("queue-count", f"ring {ring}, but the back-end answered GET_QUEUE_NUM with {n.queues}")
    return found


def ring_index(request: Request, payload: Payload | None) -> int | None:
    """The ring a per-ring request names; None for any other request (or no payload)."""
    if request not in RING_REQUESTS or payload is None:
        return None
    index = getattr(payload, "index", None)
    return index if isinstance(index, int) else None


# --- the back-end's side (what the relay judges) --------------------------------------------

SHMEM = 1 << F_SHMEM
# rust-vmm vhost before 0.17 numbered SHMEM 21; QEMU 11.1 reads bit 21 as GPA_ADDRESSES.
OLD_SHMEM = 1 << 21
OLD_SHMEM_DETAIL = (
    "SHMEM offered at bit 21 (rust-vmm vhost < 0.17 numbering; QEMU 11.1 reads it as GPA_ADDRESSES)"
)

# Replies that carry an fd of their own; every other reply carries none.
_REPLY_FDS = {int(Request.GET_INFLIGHT_FD): 1}


def header_violations(header: Header, backend_channel: bool) -> list[Violation]:
    """What Header.unpack would have refused: an unknown request, a version, flag bits."""
    name = request_name(header.request, backend_channel)
    found: list[Violation] = []
    if name.startswith("UNKNOWN_"):
        found.append(
            Violation(name, "unknown-request", f"request {header.request} is not in the spec")
        )
    if header.flags & FLAG_VERSION_MASK != VERSION:
        found.append(
            Violation(name, "header", f"version {header.flags & FLAG_VERSION_MASK}, not {VERSION}")
        )
    if header.flags & FLAG_RESERVED_MASK:
        found.append(Violation(name, "header", f"reserved flag bits set (0x{header.flags:x})"))
    return found


def expects_reply(header: Header, acked_protocol: int) -> bool:
    """Does the back-end owe QEMU an answer to this request?"""
    try:
        request = Request(header.request)
    except ValueError:
        return False
    if request in REPLY_REQUESTS:
        return True
    return header.need_reply and bool(acked_protocol & ProtocolFeature.REPLY_ACK)


def check_offer(protocol_features: int) -> list[Violation]:
    """The back-end's GET_PROTOCOL_FEATURES answer. Bit 21 without bit 22 is how a back-end
    built on rust-vmm vhost < 0.17 offers SHMEM; a back-end really meaning GPA_ADDRESSES
    would be flagged too, which we accept: no back-end we know of offers it."""
    if protocol_features & OLD_SHMEM and not protocol_features & SHMEM:
        return [Violation("GET_PROTOCOL_FEATURES", "shmem-bit", OLD_SHMEM_DETAIL)]
    return []


def check_reply(request: Header | None, reply: Header, body: bytes, nfds: int) -> list[Violation]:
    """A message the back-end sent on the front-end socket, where only replies belong;
    ``request`` is the request it should answer (None: none was outstanding)."""
    name = request_name(reply.request)
    found: list[Violation] = []

    def flag(rule: str, detail: str) -> None:
        found.append(Violation(name, rule, detail))

    if request is None:
        flag("unsolicited", "the back-end sent a message while no reply was owed")
        return found
    if not reply.is_reply:
        flag("reply-flag", "the back-end's answer lacks the REPLY flag")
    if reply.flags & FLAG_NEED_REPLY:
        flag("reply-flag", "a reply with NEED_REPLY set")
    if reply.request != request.request:
        flag(
            "reply-order",
            f"answers request {reply.request} while {Request(request.request).name} is owed",
        )
        return found
    try:
        payload = decode_payload(reply.request, body, reply=True)
    except ProtocolError as exc:
        flag("reply-size", f"reply body of {len(body)} bytes does not fit: {exc}")
        payload = None
    if isinstance(payload, ShMemConfig) and payload.nregions != len(payload.regions):
        flag(
            "shmem-config", f"nregions {payload.nregions} but {len(payload.regions)} non-zero sizes"
        )
    expected = _REPLY_FDS.get(reply.request, 0)
    if nfds != expected:
        flag("fds", f"reply carries {nfds} fd(s), the spec wants {expected}")
    return found


def check_channel_request(
    header: Header, body: bytes, nfds: int, acked_protocol: int, served: dict[int, int] | None
) -> list[Violation]:
    """A back-end request on the back-end channel, given the negotiated protocol features
    and the shared-memory config QEMU was served (None: no GET_SHMEM_CONFIG answered)."""
    name = request_name(header.request, backend_channel=True)
    found: list[Violation] = []

    def flag(rule: str, detail: str) -> None:
        found.append(Violation(name, rule, detail))

    if header.is_reply:
        flag("reply-flag", "a back-end request with the REPLY flag set")
    if header.need_reply and not acked_protocol & ProtocolFeature.REPLY_ACK:
        flag("need-reply", "NEED_REPLY set without PROTOCOL_F_REPLY_ACK negotiated")
    if header.request not in (BackendRequest.SHMEM_MAP, BackendRequest.SHMEM_UNMAP):
        return found
    if not acked_protocol & SHMEM:
        flag("feature", "sent without PROTOCOL_F_SHMEM negotiated")
    want_fds = shmem_map_fds(header.request)
    if nfds != want_fds:
        flag("fds", f"carries {nfds} fd(s), the spec wants {want_fds}")
    try:
        mmap = MMap.unpack(body)
    except ProtocolError as exc:
        flag("payload", str(exc))
        return found
    regions = served or {}
    for problem in shmem_map_problems(
        header.request, mmap.shmid, mmap.shm_offset, mmap.length, mmap.fd_offset, regions
    ):
        flag("shmem-map", problem.detail)
    return found


def check_channel_reply(
    request: Header | None, reply: Header, body: bytes, nfds: int
) -> list[Violation]:
    """QEMU's answer on the back-end channel."""
    name = request_name(reply.request, backend_channel=True)
    found: list[Violation] = []
    if request is None:
        return [Violation(name, "unsolicited", "QEMU answered a request nobody sent")]
    if not reply.is_reply_for(request.request):
        found.append(Violation(name, "reply-order", f"answers {request.request} out of turn"))
    if len(body) != 8:
        found.append(Violation(name, "reply-size", f"a {len(body)}-byte answer, not a u64"))
    if nfds:
        found.append(Violation(name, "fds", f"answer carries {nfds} fd(s), the spec wants 0"))
    return found


# --- SHMEM_MAP / SHMEM_UNMAP against the served config -------------------------------------

U64_END = 1 << 64
"""One past the last u64: a range whose end reaches it wraps around in QEMU's u64 sums."""


class MapRule(enum.StrEnum):
    """The spec's rules for where a SHMEM_MAP/UNMAP may point."""

    SHMID = "shmid"  # the shmid names a region of the served config
    LENGTH = "length"  # the length is not 0
    RANGE = "range"  # shm_offset + length stays inside the region
    FD_RANGE = "fd-range"  # (MAP) fd_offset + length fits a u64
    ALIGN = "align"  # (MAP) shm_offset, length and fd_offset are page multiples
    OVERLAP = "overlap"  # (MAP) no overlap with a live mapping of the region
    WHOLE = "whole"  # (UNMAP) exactly one live mapping, when the mappings are known


# The vhost-user spec's words (docs/interop/vhost-user.rst as merged for QEMU 11.1: the
# MMAP request, VHOST_USER_BACKEND_SHMEM_MAP / _UNMAP, VIRTIO Shared Memory Region
# configuration) each rule and oracle rests on; reports and findings quote them.
SPEC_MAP = (
    "Upon receiving the message, the front-end will mmap the given fd into the VIRTIO "
    "Shared Memory Region with the requested shmid."
)
SPEC_FREE = (
    "Mapping over an already existing map is not allowed and requests shall fail. "
    "Therefore, the memory range in the request must correspond with a valid, free region "
    "of the VIRTIO Shared Memory Region."
)
SPEC: dict[str, str] = {
    MapRule.SHMID: ("shmid: a 8-bit shared memory region identifier. " + SPEC_MAP),
    MapRule.LENGTH: "len: a 64-bit size of the memory to map. " + SPEC_FREE.split(". ", 1)[1],
    MapRule.RANGE: SPEC_FREE.split(". ", 1)[1],
    MapRule.FD_RANGE: "fd_offset: a 64-bit offset of this area from the start of the "
    "supplied file descriptor",
    MapRule.ALIGN: (
        "The Shared Memory Region size must be a multiple of the page size supported by "
        "mmap(2). " + SPEC_MAP + " (mmap(2): the offset and a MAP_FIXED address must be "
        "multiples of the page size)"
    ),
    MapRule.OVERLAP: SPEC_FREE,
    MapRule.WHOLE: "Note that the given range shall correspond to the entirety of a valid "
    "mapped region.",
    "flags": "flags: a 64-bit value: 0: Pages are mapped read-only, 1: Pages are mapped read-write",
    "payload": "request payload: fd and struct VhostUserMMap",
    "feature": "When the VHOST_USER_PROTOCOL_F_SHMEM protocol feature has been successfully "
    "negotiated, this message can be submitted by the backends",
    "reply": "If VHOST_USER_PROTOCOL_F_REPLY_ACK is negotiated, and back-end set the "
    "VHOST_USER_NEED_REPLY flag, the front-end must respond with zero when operation is "
    "successfully completed, or non-zero otherwise.",
    "map": SPEC_MAP + " (mmap(2) maps a file without changing it, and maps a range past its end)",
}


@dataclass(frozen=True)
class MapProblem:
    rule: MapRule
    detail: str


def shmem_map_fds(request: int) -> int:
    """The fds a SHMEM_MAP (one: the file to map) or SHMEM_UNMAP (none) carries."""
    return 1 if request == BackendRequest.SHMEM_MAP else 0


def shmem_map_problems(
    request: int,
    shmid: int,
    shm_offset: int,
    length: int,
    fd_offset: int,
    regions: Mapping[int, int],
    mapped: Mapping[int, Sequence[tuple[int, int]]] | None = None,
) -> list[MapProblem]:
    """Every range rule a SHMEM_MAP/UNMAP breaks, given the config QEMU was served
    (``regions``: shmid -> size, the non-zero sizes) and, when known, the live mappings
    (``mapped``: shmid -> [(shm_offset, length)]; None: not tracked, no overlap or
    whole-mapping rule).

    In this order: the shmid (without a region nothing else is judged), the length or the
    range, then, for a MAP, the fd range, the page alignment and (when the range is sound)
    the overlap; for an UNMAP (range sound, mappings known) that it names a whole one."""
    found: list[MapProblem] = []
    region = regions.get(shmid)
    if region is None:
        detail = f"shmid {shmid} is not in the served config {dict(regions)}"
        return [MapProblem(MapRule.SHMID, detail)]
    if length == 0:
        found.append(MapProblem(MapRule.LENGTH, "length 0"))
    elif shm_offset + length > region:
        detail = f"range 0x{shm_offset:x}+0x{length:x} beyond region {shmid} of 0x{region:x} bytes"
        found.append(MapProblem(MapRule.RANGE, detail))
    inside = length != 0 and shm_offset + length <= region
    live = mapped.get(shmid, ()) if mapped is not None else ()
    if request != BackendRequest.SHMEM_MAP:
        if inside and mapped is not None and (shm_offset, length) not in live:
            detail = f"range 0x{shm_offset:x}+0x{length:x} is not a live mapping of region {shmid}"
            found.append(MapProblem(MapRule.WHOLE, detail))
        return found
    if fd_offset + length >= U64_END:
        detail = f"fd range 0x{fd_offset:x}+0x{length:x} overflows a u64"
        found.append(MapProblem(MapRule.FD_RANGE, detail))
    unaligned = unaligned_field(shm_offset, length, fd_offset)
    if unaligned:
        found.append(MapProblem(MapRule.ALIGN, f"{unaligned} not a multiple of {PAGE_SIZE}"))
    for start, size in live if inside else ():
        if shm_offset < start + size and start < shm_offset + length:
            detail = (
                f"range 0x{shm_offset:x}+0x{length:x} overlaps the live mapping "
                f"0x{start:x}+0x{size:x} of region {shmid}"
            )
            found.append(MapProblem(MapRule.OVERLAP, detail))
            break
    return found


def unaligned_field(shm_offset: int, length: int, fd_offset: int) -> str:
    """The first of a MAP's offsets and length that is not a page multiple ("" if none)."""
    for name, value in (("shm_offset", shm_offset), ("length", length), ("fd_offset", fd_offset)):
        if value % PAGE_SIZE:
            return name
    return ""
