"""The fuzzer's language, as data (pure): the front-end's life as states, what the back-end
may send in each, what it may bend in its replies, and a case -- one sequence the back-end
plays -- with its JSON form.

A case is: the features offered, the GET_SHMEM_CONFIG reply, mutations of the replies to
chosen front-end requests, a path through the front-end's life (``PATHS``), and back-end
channel requests, each sent in one state of that path.

States (the moment a back-end request is sent):

    realize ─► before-driver-ok ─► after-driver-ok ─┬─► device-reset      (device_status 0)
                                                    ├─► after-system-reset (QMP system_reset)
                                                    ├─► during-device-del  (x86_64: device_del
                                                    │                      sent, not ejected)
                                                    └─► after-reconnect    (our hang-up, then
                                                                           a new connection)

after-reconnect is entered four ways (``Case.reconnect``, ``RECONNECT_MODES``); in each
only the front-end socket is hung up, the back-end channel is kept:

    reset    after-driver-ok, hang-up (the started device survives it), device reset
             (status 0) with no back-end connected, a new connection: requests go to the
             reconnected, stopped device (over the new channel, or the kept one)
    restart  reset, then DRIVER_OK again over the new connection
    stopped  before-driver-ok, hang-up, a new connection, DRIVER_OK
    live     after-driver-ok, hang-up, a new connection under the started device
             (QEMU 11.1.3 aborts: backend-reconnect-vhost-dev-start-abort)
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed import limits
from testbed.device import DEVICE_TYPE
from testbed.fuzz.fdspec import fd_kind_of
from testbed.vhost_user.protocol import (
    SHMEM_CONFIG_SIZE,
    U64,
    BackendRequest,
    Header,
    MMap,
    ProtocolFeature,
    Request,
)

CASE_VERSION = 1
U64_MASK = (1 << 64) - 1
M = 1 << 20
PCI_HOLE = 1 << 40
"""A BAR 4 this large does not fit the guest-less machines' 64-bit PCI hole."""


class State(enum.StrEnum):
    BEFORE_DRIVER_OK = "before-driver-ok"
    AFTER_DRIVER_OK = "after-driver-ok"
    DEVICE_RESET = "device-reset"
    AFTER_SYSTEM_RESET = "after-system-reset"
    DURING_DEVICE_DEL = "during-device-del"
    AFTER_RECONNECT = "after-reconnect"


REALIZE = "realize"
"""Not a state requests are sent in: the handshake, where reply mutations act."""

# Each path is the front-end's life up to its last state; a case walks one.
PATHS: dict[State, tuple[State, ...]] = {
    State.BEFORE_DRIVER_OK: (State.BEFORE_DRIVER_OK,),
    State.AFTER_DRIVER_OK: (State.BEFORE_DRIVER_OK, State.AFTER_DRIVER_OK),
    State.DEVICE_RESET: (State.BEFORE_DRIVER_OK, State.AFTER_DRIVER_OK, State.DEVICE_RESET),
    State.AFTER_SYSTEM_RESET: (
        State.BEFORE_DRIVER_OK,
        State.AFTER_DRIVER_OK,
        State.AFTER_SYSTEM_RESET,
    ),
    State.DURING_DEVICE_DEL: (
        State.BEFORE_DRIVER_OK,
        State.AFTER_DRIVER_OK,
        State.DURING_DEVICE_DEL,
    ),
    State.AFTER_RECONNECT: (State.BEFORE_DRIVER_OK, State.AFTER_DRIVER_OK, State.AFTER_RECONNECT),
}
RECONNECT_MODES: tuple[str, ...] = ("reset", "restart", "stopped", "live")
RECONNECT_PATHS: dict[str, tuple[State, ...]] = {
    "reset": PATHS[State.AFTER_RECONNECT],
    "restart": PATHS[State.AFTER_RECONNECT],
    "stopped": (State.BEFORE_DRIVER_OK, State.AFTER_RECONNECT),
    "live": PATHS[State.AFTER_RECONNECT],
}
STOPPED_STATES = frozenset({State.BEFORE_DRIVER_OK, State.DEVICE_RESET, State.AFTER_SYSTEM_RESET})


def states_for(arch: str) -> tuple[State, ...]:
    """The states a guest-less QEMU of ``arch`` can be driven to. device_del needs q35's
    ACPI eject (virt's native PCIe hot-plug needs a guest's pciehp handshake)."""
    return tuple(s for s in State if arch == "x86_64" or s is not State.DURING_DEVICE_DEL)


# Back-end requests QEMU 11.1 has a handler for, and a few it has not.
CHANNEL_REQUESTS: tuple[int, ...] = (
    BackendRequest.SHMEM_MAP,
    BackendRequest.SHMEM_UNMAP,
    BackendRequest.IOTLB_MSG,
    BackendRequest.CONFIG_CHANGE_MSG,
    BackendRequest.VRING_HOST_NOTIFIER_MSG,
    BackendRequest.SHARED_OBJECT_ADD,
    BackendRequest.SHARED_OBJECT_REMOVE,
    BackendRequest.SHARED_OBJECT_LOOKUP,
    BackendRequest.VRING_CALL,
    BackendRequest.VRING_ERR,
    0,
    11,
    0x7FFF,
)


def request_name(request: int) -> str:
    try:
        return BackendRequest(request).name
    except ValueError:
        return f"UNKNOWN_{request}"


def frontend_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"UNKNOWN_{request}"


# The front-end requests whose replies (or REPLY_ACKs) a case may bend: the handshake and
# the device start, as QEMU 11.1.3 sends them to the test device.
MUTABLE_REQUESTS: tuple[Request, ...] = (
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.SET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.SET_BACKEND_REQ_FD,
    Request.SET_OWNER,
    Request.SET_VRING_CALL,
    Request.SET_VRING_ERR,
    Request.GET_SHMEM_CONFIG,
    Request.SET_FEATURES,
    Request.SET_MEM_TABLE,
    Request.SET_VRING_NUM,
    Request.SET_VRING_ADDR,
    Request.SET_VRING_BASE,
    Request.SET_VRING_KICK,
    Request.SET_VRING_ENABLE,
    Request.GET_VRING_BASE,
    Request.SET_STATUS,
    Request.GET_STATUS,
    Request.RESET_DEVICE,
    Request.GET_MAX_MEM_SLOTS,
    Request.ADD_MEM_REG,
)
REALIZE_REQUESTS = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.SET_BACKEND_REQ_FD,
        Request.SET_OWNER,
        Request.GET_SHMEM_CONFIG,
    }
)


class ReplyKind(enum.StrEnum):
    FLAGS = "flags"  # header flags := value
    SIZE = "size"  # body grows (value > 0, zero bytes) or shrinks (< 0); header agrees
    LIE = "lie"  # header size := real size + value (value < 0 only: no short read)
    VALUE = "value"  # a u64 body := value
    BYTES = "bytes"  # the body's bytes xor a pattern from value
    REQUEST = "request"  # the reply's request code := value
    FDS = "fds"  # attach ``value`` memfds to the reply
    ACK = "ack"  # an extra u64 reply (value) after the normal answer, asked for or not
    DELAY = "delay"  # answer after ``value`` ms
    HANGUP = "hangup"  # close the connection instead of answering


@dataclass(frozen=True)
class ReplyMutation:
    request: int
    kind: str
    value: int = 0
    nth: int = 1
    """Which occurrence of the request (1 = the first)."""


@dataclass(frozen=True)
class Offer:
    """The protocol features we offer: SHMEM at ``shmem_bit`` (None: not at all), plus
    ``extra`` bits, minus ``withhold`` bits."""

    shmem_bit: int | None = 22
    extra: int = 0
    withhold: int = 0

    @property
    def shmem_negotiable(self) -> bool:
        return self.shmem_bit == 22 and not self.withhold & ProtocolFeature.SHMEM

    @property
    def backend_channel(self) -> bool:
        return not self.withhold & ProtocolFeature.BACKEND_REQ


@dataclass(frozen=True)
class ShmemConfig:
    """The GET_SHMEM_CONFIG reply: nregions (None: the count of non-zero sizes), sizes by
    shmid, padding, truncation, extra trailing bytes and header flags."""

    sizes: dict[int, int] = field(default_factory=dict)
    nregions: int | None = None
    padding: int = 0
    truncate: int | None = None
    extra: int = 0
    flags: int = 0x5

    @property
    def count(self) -> int:
        return sum(1 for s in self.sizes.values() if s)

    def problems(self, behind_root_port: bool) -> list[str]:
        """Why QEMU should refuse this reply (fail realize), by the spec and QEMU's limits;
        [] = a reply QEMU should take. The words name the registry's known bugs where one
        fits (the triage matches on them)."""
        out: list[str] = []
        if self.flags != 0x5:
            out.append(f"reply flags 0x{self.flags:x}")
        if self.truncate is not None:
            out.append(
                f"truncated GET_SHMEM_CONFIG reply ({self.truncate} of {SHMEM_CONFIG_SIZE} bytes)"
            )
        if self.extra:
            out.append(f"oversized GET_SHMEM_CONFIG reply ({SHMEM_CONFIG_SIZE + self.extra} bytes)")
        nregions = self.count if self.nregions is None else self.nregions
        if nregions > limits.MAX_SHMEM_REGIONS:
            out.append(f"nregions {nregions} > {limits.MAX_SHMEM_REGIONS}")
        elif nregions != self.count:
            out.append(f"nregions {nregions} with {self.count} non-zero size")
        nonzero = {k: v for k, v in self.sizes.items() if v}
        for shmid, size in sorted(nonzero.items()):
            if not limits.is_page_multiple(size):
                out.append(f"region {shmid} size {size} not a page multiple")
        total = sum(nonzero.values())
        if nonzero and not limits.is_power_of_2(total):
            out.append(f"total {total} not a power of two")
        if total >= PCI_HOLE:
            out.append(f"total {total} beyond the PCI hole")
        fits = limits.max_regions(behind_root_port)
        if len(nonzero) > fits:
            out.append(f"{len(nonzero)} regions, {fits} capabilities fit")
        return out


class BodyKind(enum.StrEnum):
    MMAP = "mmap"  # VhostUserMMap <B7xQQQQ>
    AREA = "area"  # VhostUserVringArea <QQQ>
    IOTLB = "iotlb"  # vhost_iotlb_msg <QQQBB6x>
    UUID = "uuid"  # 16 bytes
    U64 = "u64"
    RAW = "raw"  # ``raw`` hex
    EMPTY = "empty"


@dataclass(frozen=True)
class Action:
    """One back-end channel request, sent in ``state``."""

    state: str
    request: int
    body: str = BodyKind.MMAP
    fields: dict[str, int] = field(default_factory=dict)
    raw: str = ""
    size_delta: int = 0
    """The header's size minus the body's real length; the body is cut or padded with
    zeros so that the bytes sent always equal the header's size (no short reads)."""
    flags: int = 0x9
    """VERSION | NEED_REPLY by default."""
    fds: tuple[str, ...] = ()
    """What the request carries: "<kind>[:<size>]" each (testbed.fuzz.fdspec)."""
    touch: bool = False
    """After the reply: the guest writes through the mapping over qtest ("guestwrite:0")."""
    after: tuple[str, ...] = ()
    """After the reply, while the mapping is live: what the back-end does to the first
    fd's file and what the guest does through BAR 4, in order (testbed.fuzz.fdspec)."""

    @property
    def name(self) -> str:
        return request_name(self.request)


@dataclass(frozen=True)
class Case:
    arch: str
    seed: int
    index: int
    offer: Offer = field(default_factory=Offer)
    config: ShmemConfig = field(default_factory=ShmemConfig)
    replies: tuple[ReplyMutation, ...] = ()
    last_state: str = State.AFTER_DRIVER_OK
    actions: tuple[Action, ...] = ()
    reconnect: str = "live"
    """How after-reconnect is entered (RECONNECT_MODES); "live" is what a case without
    the key meant (version-1 cases and corpus entries)."""
    device: str = DEVICE_TYPE
    """The QEMU device (testbed.device.VHOST_USER_BASE_DEVICES): `testbed fuzz --device`."""

    @property
    def path(self) -> tuple[State, ...]:
        if self.reconnects:
            return RECONNECT_PATHS[self.reconnect]
        return PATHS[State(self.last_state)]

    @property
    def behind_root_port(self) -> bool:
        return self.last_state == State.DURING_DEVICE_DEL

    @property
    def reconnects(self) -> bool:
        return self.last_state == State.AFTER_RECONNECT

    def pairs(self) -> list[tuple[str, str, str]]:
        """The (state, request, fd kind) triples this case exercises ("-": no fd); reply
        mutations count as ("realize", "reply:<REQUEST>:<kind>", "-")."""
        out = [
            coverage_key(REALIZE, f"reply:{frontend_name(m.request)}:{m.kind}")
            for m in self.replies
        ]
        out += [coverage_key(a.state, a.name, a.fds) for a in self.actions]
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = CASE_VERSION
        data["config"]["sizes"] = {str(k): v for k, v in self.config.sizes.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Case:
        config = dict(data.get("config", {}))
        config["sizes"] = {int(k): int(v) for k, v in config.get("sizes", {}).items()}
        actions = tuple(
            Action(**{**a, "fds": tuple(a.get("fds", ())), "after": tuple(a.get("after", ()))})
            for a in data.get("actions", [])
        )
        return cls(
            arch=data["arch"],
            seed=int(data.get("seed", 0)),
            index=int(data.get("index", 0)),
            offer=Offer(**data.get("offer", {})),
            config=ShmemConfig(**config),
            replies=tuple(ReplyMutation(**m) for m in data.get("replies", [])),
            last_state=data.get("last_state", State.AFTER_DRIVER_OK),
            actions=actions,
            reconnect=data.get("reconnect", "live"),
            device=data.get("device", DEVICE_TYPE),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> Case:
        data = json.loads(path.read_text())
        if "case" in data:  # a corpus entry: the case and its recorded signatures
            data = data["case"]
        return cls.from_json(data)


_MMAP_PAD = 1
"""The first of VhostUserMMap's 7 padding bytes (after the u8 shmid): a case may set it."""
# Bodies the protocol module does not model (it passes them as Raw): their layouts, and
# each field's name and width.
_BODY_STRUCTS: dict[BodyKind, tuple[struct.Struct, tuple[tuple[str, int], ...]]] = {
    # VhostUserVringArea
    BodyKind.AREA: (
        struct.Struct("<QQQ"),
        (("u64", U64_MASK), ("size", U64_MASK), ("offset", U64_MASK)),
    ),
    # struct vhost_iotlb_msg
    BodyKind.IOTLB: (
        struct.Struct("<QQQBB6x"),
        (
            ("iova", U64_MASK),
            ("size", U64_MASK),
            ("uaddr", U64_MASK),
            ("perm", 0xFF),
            ("type", 0xFF),
        ),
    ),
}


def encode(action: Action) -> tuple[Header, bytes]:
    """The header and the bytes to send for ``action``: the body cut or zero-padded to the
    header's size (size_delta), so the peer never waits for bytes that do not come."""
    f = action.fields

    def field(name: str, mask: int = U64_MASK) -> int:
        return f.get(name, 0) & mask

    body: bytes
    if action.body == BodyKind.MMAP:
        mmap = MMap(
            field("shmid", 0xFF),
            field("fd_offset"),
            field("shm_offset"),
            field("length"),
            field("flags"),
        )
        bent = bytearray(mmap.pack())  # the protocol's encoding, its padding bent after
        bent[_MMAP_PAD] = field("pad", 0xFF)
        body = bytes(bent)
    elif action.body in _BODY_STRUCTS:
        layout, names = _BODY_STRUCTS[BodyKind(action.body)]
        body = layout.pack(*(field(name, mask) for name, mask in names))
    elif action.body == BodyKind.U64:
        body = U64(field("value")).pack()
    elif action.body in (BodyKind.UUID, BodyKind.RAW):
        body = bytes.fromhex(action.raw)
    else:
        body = b""
    size = max(0, len(body) + action.size_delta)
    body = body[:size] + bytes(size - min(size, len(body)))
    return Header(action.request & 0xFFFFFFFF, action.flags & 0xFFFFFFFF, size), body


def coverage_key(state: str, request: str, fds: tuple[str, ...] = ()) -> tuple[str, str, str]:
    """What coverage counts: the state, the request and the kind of its first fd."""
    return (state, request, fd_kind_of(fds[0]) if fds else "-")
