"""vhost-user wire format, as QEMU 11.1.3 speaks it. Pure: no sockets, no fds, no I/O.

The header, each request's payload struct and which payload a request (or its reply)
carries; the numbers themselves (request codes, feature bits) are
:mod:`testbed.vhost_user.codes`.

Every ``unpack`` checks the exact length and the reserved bits, and raises
:class:`testbed.errors.ProtocolError` (carrying the bytes) for anything malformed -- never
``struct.error``, ``ValueError`` or ``IndexError``. Meaning (which features were negotiated,
whether a shmid exists) is the back-end's business, not this module's.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, astuple, dataclass, field
from typing import Any, ClassVar, Self

from testbed.errors import ProtocolError
from testbed.limits import MAX_SHMEM_REGIONS

# F_SHMEM and ProtocolFeature are re-exported ("as" themselves): scenarios/ and testbed/fuzz/
# import them from here.
from testbed.vhost_user.codes import F_SHMEM as F_SHMEM
from testbed.vhost_user.codes import BackendRequest, Request, request_name
from testbed.vhost_user.codes import ProtocolFeature as ProtocolFeature

# --- header ------------------------------------------------------------------------------

VERSION = 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
# Bits above NEED_REPLY are reserved; a peer that sets them speaks something we do not know.
FLAG_RESERVED_MASK = 0xFFFFFFFF & ~(FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY)

HEADER_SIZE = 12
# QEMU's VhostUserPayload union is at most a few KiB (the ShMemConfig reply, 2056 bytes, is
# its largest member); anything far beyond that is a framing error, not a message.
MAX_PAYLOAD_SIZE = 4096
# QEMU attaches at most 8 fds to one message (VHOST_MEMORY_BASELINE_NREGIONS for
# SET_MEM_TABLE, VHOST_USER_MAX_FDS on the back-end channel).
MAX_FDS = 8
MAX_MEM_REGIONS = 8
MAX_CONFIG_SIZE = 256
# MAX_SHMEM_REGIONS (256, the sizes[] slots of the GET_SHMEM_CONFIG reply) is QEMU's limit:
# testbed.limits owns it.

_U64_MAX = (1 << 64) - 1


def _check_len(what: str, data: bytes, expected: int) -> None:
    if len(data) != expected:
        raise ProtocolError(f"{what}: expected {expected} bytes, got {len(data)}", bytes(data))


def _check_u64(what: str, value: int) -> None:
    if not 0 <= value <= _U64_MAX:
        raise ProtocolError(f"{what}: {value} does not fit in a u64")


class Payload:
    """Base of the payload dataclasses: a JSON-friendly view for traces."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


class _Struct(Payload):
    """A fixed-size payload: FORMAT's fields are the dataclass fields, in order."""

    FORMAT: ClassVar[struct.Struct]
    NAME: ClassVar[str]

    def pack(self) -> bytes:
        try:
            return self.FORMAT.pack(*astuple(self))  # type: ignore[call-overload]
        except struct.error as exc:
            raise ProtocolError(f"{self.NAME} {self}: {exc}") from exc

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_len(cls.NAME, data, cls.FORMAT.size)
        return cls(*cls.FORMAT.unpack(data))


@dataclass(frozen=True)
class Header(Payload):
    request: int
    flags: int
    size: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<III")

    @classmethod
    def make(
        cls, request: int, size: int, *, reply: bool = False, need_reply: bool = False
    ) -> Self:
        flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
        return cls(int(request), flags, size)

    @property
    def version(self) -> int:
        return self.flags & FLAG_VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def is_reply_for(self, request: int) -> bool:
        return self.is_reply and self.request == int(request)

    def pack(self) -> bytes:
        try:
            return self.FORMAT.pack(self.request, self.flags, self.size)
        except struct.error as exc:
            raise ProtocolError(f"header {self} does not fit the wire format: {exc}") from exc

    @classmethod
    def unpack(cls, data: bytes, *, backend_channel: bool = False) -> Self:
        """Decode and validate: version 1, no reserved flag bits, a known request, sane size."""
        _check_len("vhost-user header", data, HEADER_SIZE)
        request, flags, size = cls.FORMAT.unpack(data)
        if flags & FLAG_VERSION_MASK != VERSION:
            raise ProtocolError(
                f"vhost-user header: version {flags & FLAG_VERSION_MASK}, expected {VERSION}",
                bytes(data),
            )
        if flags & FLAG_RESERVED_MASK:
            raise ProtocolError(
                f"vhost-user header: reserved flag bits set (flags 0x{flags:x})", bytes(data)
            )
        if request_name(request, backend_channel).startswith("UNKNOWN_"):
            channel = "back-end channel" if backend_channel else "front-end channel"
            raise ProtocolError(
                f"vhost-user header: unknown request {request} on the {channel}", bytes(data)
            )
        if size > MAX_PAYLOAD_SIZE:
            raise ProtocolError(
                f"vhost-user header: payload size {size} exceeds {MAX_PAYLOAD_SIZE}", bytes(data)
            )
        return cls(request, flags, size)


@dataclass(frozen=True)
class U64(Payload):
    value: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<Q")

    def pack(self) -> bytes:
        _check_u64("u64 payload", self.value)
        return self.FORMAT.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_len("u64 payload", data, cls.FORMAT.size)
        return cls(cls.FORMAT.unpack(data)[0])


VRING_IDX_MASK = 0xFF
VRING_NOFD = 1 << 8


@dataclass(frozen=True)
class VringFile(Payload):
    """The u64 of SET_VRING_KICK/CALL/ERR: vring index in bits 0-7, bit 8 = no fd attached."""

    index: int
    nofd: bool

    def pack(self) -> bytes:
        if not 0 <= self.index <= VRING_IDX_MASK:
            raise ProtocolError(f"vring file: index {self.index} out of range 0..255")
        return U64(self.index | (VRING_NOFD if self.nofd else 0)).pack()

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        value = U64.unpack(data).value
        if value & ~(VRING_IDX_MASK | VRING_NOFD):
            raise ProtocolError(f"vring file: reserved bits set (0x{value:x})", bytes(data))
        return cls(value & VRING_IDX_MASK, bool(value & VRING_NOFD))


@dataclass(frozen=True)
class VringState(_Struct):
    index: int
    num: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<II")
    NAME: ClassVar[str] = "vring state"


@dataclass(frozen=True)
class VringAddr(_Struct):
    index: int
    flags: int
    descriptor: int
    used: int
    available: int
    log: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")
    NAME: ClassVar[str] = "vring address"
    # Bit 0 (VHOST_VRING_F_LOG) is the only defined flag.
    FLAGS_MASK: ClassVar[int] = 0x1

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        value = super().unpack(data)
        if value.flags & ~cls.FLAGS_MASK:
            raise ProtocolError(f"vring address: unknown flags 0x{value.flags:x}", bytes(data))
        return value


@dataclass(frozen=True)
class MemoryRegion(_Struct):
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")
    NAME: ClassVar[str] = "memory region"

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        value = super().unpack(data)
        if value.size == 0:
            raise ProtocolError("memory region: size 0", bytes(data))
        if value.guest_addr + value.size - 1 > _U64_MAX:
            raise ProtocolError("memory region: guest address range overflows", bytes(data))
        return value


@dataclass(frozen=True)
class MemoryTable(Payload):
    """SET_MEM_TABLE: nregions, padding, then the regions (one fd each, sent alongside)."""

    regions: tuple[MemoryRegion, ...]

    PREFIX: ClassVar[struct.Struct] = struct.Struct("<II")

    def pack(self) -> bytes:
        if len(self.regions) > MAX_MEM_REGIONS:
            raise ProtocolError(f"memory table: {len(self.regions)} regions > {MAX_MEM_REGIONS}")
        return self.PREFIX.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < cls.PREFIX.size:
            raise ProtocolError("memory table: shorter than its 8-byte prefix", bytes(data))
        nregions, padding = cls.PREFIX.unpack_from(data)
        if nregions > MAX_MEM_REGIONS:
            raise ProtocolError(
                f"memory table: nregions {nregions} > {MAX_MEM_REGIONS}", bytes(data)
            )
        if padding:
            raise ProtocolError("memory table: padding is not zero", bytes(data))
        size = MemoryRegion.FORMAT.size
        _check_len("memory table", data, cls.PREFIX.size + nregions * size)
        off = cls.PREFIX.size
        return cls(
            tuple(
                MemoryRegion.unpack(data[off + i * size : off + (i + 1) * size])
                for i in range(nregions)
            )
        )

    def to_json(self) -> dict[str, Any]:
        return {"regions": [r.to_json() for r in self.regions]}


@dataclass(frozen=True)
class SingleMemRegion(Payload):
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region."""

    region: MemoryRegion

    PREFIX: ClassVar[struct.Struct] = struct.Struct("<Q")

    def pack(self) -> bytes:
        return self.PREFIX.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_len("single memory region", data, cls.PREFIX.size + MemoryRegion.FORMAT.size)
        if cls.PREFIX.unpack_from(data)[0]:
            raise ProtocolError("single memory region: padding is not zero", bytes(data))
        return cls(MemoryRegion.unpack(data[cls.PREFIX.size :]))


@dataclass(frozen=True)
class ConfigSpace(Payload):
    """GET_CONFIG / SET_CONFIG: offset, size, flags, then ``size`` bytes."""

    offset: int
    flags: int
    data: bytes

    PREFIX: ClassVar[struct.Struct] = struct.Struct("<III")

    def pack(self) -> bytes:
        if len(self.data) > MAX_CONFIG_SIZE:
            raise ProtocolError(f"config: {len(self.data)} bytes > {MAX_CONFIG_SIZE}")
        try:
            prefix = self.PREFIX.pack(self.offset, len(self.data), self.flags)
        except struct.error as exc:
            raise ProtocolError(f"config {self}: {exc}") from exc
        return prefix + self.data

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < cls.PREFIX.size:
            raise ProtocolError("config: shorter than its 12-byte prefix", bytes(data))
        offset, size, flags = cls.PREFIX.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise ProtocolError(f"config: size {size} > {MAX_CONFIG_SIZE}", bytes(data))
        _check_len("config", data, cls.PREFIX.size + size)
        return cls(offset, flags, bytes(data[cls.PREFIX.size :]))

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "flags": self.flags, "data": self.data.hex()}


@dataclass(frozen=True)
class ShMemConfig(Payload):
    """GET_SHMEM_CONFIG reply ``<II256Q``: nregions, padding, sizes (index = shmid).

    ``pack`` does not insist that ``nregions`` matches the non-zero sizes: fault injection
    sends disagreeing values on purpose. ``unpack`` checks the format only.
    """

    nregions: int
    sizes: tuple[int, ...] = field(default=(0,) * MAX_SHMEM_REGIONS)

    FORMAT: ClassVar[struct.Struct] = struct.Struct(f"<II{MAX_SHMEM_REGIONS}Q")

    @classmethod
    def from_regions(cls, regions: dict[int, int]) -> Self:
        sizes = [0] * MAX_SHMEM_REGIONS
        for shmid, size in regions.items():
            if not 0 <= shmid < MAX_SHMEM_REGIONS:
                raise ProtocolError(
                    f"shmem config: shmid {shmid} out of range 0..{MAX_SHMEM_REGIONS - 1}"
                )
            sizes[shmid] = size
        return cls(sum(1 for s in sizes if s), tuple(sizes))

    @property
    def regions(self) -> dict[int, int]:
        """The non-zero sizes by shmid."""
        return {i: s for i, s in enumerate(self.sizes) if s}

    def pack(self) -> bytes:
        if len(self.sizes) != MAX_SHMEM_REGIONS:
            raise ProtocolError(f"shmem config: {len(self.sizes)} sizes, need {MAX_SHMEM_REGIONS}")
        try:
            return self.FORMAT.pack(self.nregions, 0, *self.sizes)
        except struct.error as exc:
            raise ProtocolError(f"shmem config: {exc}") from exc

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_len("shmem config", data, cls.FORMAT.size)
        nregions, padding, *sizes = cls.FORMAT.unpack(data)
        if nregions > MAX_SHMEM_REGIONS:
            raise ProtocolError(
                f"shmem config: nregions {nregions} > {MAX_SHMEM_REGIONS}", bytes(data)
            )
        if padding:
            raise ProtocolError("shmem config: padding is not zero", bytes(data))
        return cls(nregions, tuple(sizes))

    def to_json(self) -> dict[str, Any]:
        return {"nregions": self.nregions, "sizes": {str(k): v for k, v in self.regions.items()}}


SHMEM_CONFIG_SIZE = ShMemConfig.FORMAT.size
"""The whole GET_SHMEM_CONFIG reply body: 2056 bytes."""

MMAP_FLAG_RW = 0x1


@dataclass(frozen=True)
class MMap(_Struct):
    """SHMEM_MAP / SHMEM_UNMAP ``<B7xQQQQ``: shmid, pad, fd_offset, shm_offset, len, flags.

    ``pack`` makes no semantic checks: tests send zero lengths or odd flags to QEMU on
    purpose."""

    shmid: int
    fd_offset: int
    shm_offset: int
    length: int
    flags: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<B7xQQQQ")
    NAME: ClassVar[str] = "mmap"

    @property
    def writable(self) -> bool:
        return bool(self.flags & MMAP_FLAG_RW)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_len(cls.NAME, data, cls.FORMAT.size)
        if any(data[1:8]):
            raise ProtocolError("mmap: padding is not zero", bytes(data))
        value = super().unpack(data)
        if value.flags & ~MMAP_FLAG_RW:
            raise ProtocolError(f"mmap: unknown flags 0x{value.flags:x}", bytes(data))
        if value.length == 0:
            raise ProtocolError("mmap: length 0", bytes(data))
        if value.shm_offset + value.length - 1 > _U64_MAX or (
            value.fd_offset + value.length - 1 > _U64_MAX
        ):
            raise ProtocolError("mmap: offset + length overflows", bytes(data))
        return value


@dataclass(frozen=True)
class Raw(Payload):
    """A payload this module does not model (inflight fds, crypto, ...): kept as bytes."""

    data: bytes

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(bytes(data))

    def to_json(self) -> dict[str, Any]:
        return {"raw": self.data.hex()}


_R = Request
# The body a front-end request carries. Missing: no payload (the body must be empty).
_REQUEST_PAYLOADS: dict[Request, type[Any]] = {
    _R.SET_FEATURES: U64,
    _R.SET_PROTOCOL_FEATURES: U64,
    _R.SET_MEM_TABLE: MemoryTable,
    _R.SET_LOG_BASE: Raw,
    _R.SET_VRING_NUM: VringState,
    _R.SET_VRING_ADDR: VringAddr,
    _R.SET_VRING_BASE: VringState,
    _R.GET_VRING_BASE: VringState,
    _R.SET_VRING_KICK: VringFile,
    _R.SET_VRING_CALL: VringFile,
    _R.SET_VRING_ERR: VringFile,
    _R.SET_VRING_ENABLE: VringState,
    _R.SEND_RARP: Raw,
    _R.NET_SET_MTU: U64,
    _R.IOTLB_MSG: Raw,
    _R.SET_VRING_ENDIAN: VringState,
    _R.GET_CONFIG: ConfigSpace,
    _R.SET_CONFIG: ConfigSpace,
    _R.CREATE_CRYPTO_SESSION: Raw,
    _R.CLOSE_CRYPTO_SESSION: U64,
    _R.POSTCOPY_END: Raw,
    _R.GET_INFLIGHT_FD: Raw,
    _R.SET_INFLIGHT_FD: Raw,
    _R.VRING_KICK: VringState,
    _R.ADD_MEM_REG: SingleMemRegion,
    _R.REM_MEM_REG: SingleMemRegion,
    _R.SET_STATUS: U64,
    _R.GET_SHARED_OBJECT: Raw,
    _R.SET_DEVICE_STATE_FD: Raw,
}

# The body of the back-end's reply to a front-end request (with REPLY set).
_REPLY_PAYLOADS: dict[Request, type[Any]] = {
    _R.GET_FEATURES: U64,
    _R.GET_PROTOCOL_FEATURES: U64,
    _R.GET_QUEUE_NUM: U64,
    _R.GET_MAX_MEM_SLOTS: U64,
    _R.GET_VRING_BASE: VringState,
    _R.GET_CONFIG: ConfigSpace,
    _R.GET_STATUS: U64,
    _R.GET_SHMEM_CONFIG: ShMemConfig,
    _R.GET_INFLIGHT_FD: Raw,
    _R.CHECK_DEVICE_STATE: U64,
    _R.SET_DEVICE_STATE_FD: U64,
    _R.POSTCOPY_ADVISE: Raw,
    _R.GET_SHARED_OBJECT: Raw,
    _R.CREATE_CRYPTO_SESSION: Raw,
}

# Requests with a reply of their own: NEED_REPLY/REPLY_ACK change nothing for them.
REPLY_REQUESTS: frozenset[Request] = frozenset(_REPLY_PAYLOADS)

_BACKEND_PAYLOADS: dict[BackendRequest, type[Any]] = {
    BackendRequest.SHMEM_MAP: MMap,
    BackendRequest.SHMEM_UNMAP: MMap,
    BackendRequest.VRING_CALL: VringState,
    BackendRequest.VRING_ERR: VringState,
    BackendRequest.CONFIG_CHANGE_MSG: Raw,
    BackendRequest.IOTLB_MSG: Raw,
    BackendRequest.VRING_HOST_NOTIFIER_MSG: Raw,
    BackendRequest.SHARED_OBJECT_ADD: Raw,
    BackendRequest.SHARED_OBJECT_REMOVE: Raw,
    BackendRequest.SHARED_OBJECT_LOOKUP: Raw,
}


def decode_payload(
    request: int, body: bytes, *, reply: bool = False, backend_channel: bool = False
) -> Payload | None:
    """Decode a message body by request (and direction). None for an (expected) empty body.

    A u64 reply to any request is accepted (REPLY_ACK answers: 0 = success). Raises
    ProtocolError for an unknown request or a body that does not fit its request.
    """
    body = bytes(body)
    if backend_channel:
        try:
            breq = BackendRequest(request)
        except ValueError:
            raise ProtocolError(f"unknown back-end request {request}", body) from None
        if reply:
            return U64.unpack(body)
        return _BACKEND_PAYLOADS[breq].unpack(body)
    try:
        req = Request(request)
    except ValueError:
        raise ProtocolError(f"unknown front-end request {request}", body) from None
    table = _REPLY_PAYLOADS if reply else _REQUEST_PAYLOADS
    kind = table.get(req)
    if kind is None:
        if reply:
            # Any request without its own reply answers REPLY_ACK with a u64.
            return U64.unpack(body)
        if body:
            raise ProtocolError(f"{req.name} carries no payload, got {len(body)} bytes", body)
        return None
    return kind.unpack(body)


def payload_json(payload: Payload | None) -> dict[str, Any] | None:
    return None if payload is None else payload.to_json()
