"""Whole FUSE requests and replies as virtio-fs carries them. Pure.

virtio-fs puts a request in one descriptor chain: the in-header and the arguments in the
device-readable buffers, the out-header and the reply in the device-writable ones
(fs/fuse/virtio_fs.c virtio_fs_enqueue_req()). How the driver splits those buffers need not
follow struct boundaries (arguments are copied into one bounce buffer, WRITE data comes as
pages), so this module works on the concatenated bytes: ``decode_request(readable)`` and
``encode_reply(...)`` for the writable side. The guest believes the out-header's ``len``,
not the used length (virtio_fs.c copy_args_from_argbuf(): "remaining = req->out.h.len -
sizeof(req->out.h)"), so a reply's ``len`` must be exact.

Every decoding error is a :class:`testbed.errors.FuseProtocolError` with the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, Self, TypeVar

from testbed.errors import FuseProtocolError
from testbed.fuse.structs import (
    AccessIn,
    BatchForgetIn,
    CreateIn,
    FlushIn,
    ForgetIn,
    ForgetOne,
    FsyncIn,
    GetattrIn,
    GetxattrIn,
    InitIn,
    InterruptIn,
    MkdirIn,
    OpenIn,
    ReadIn,
    ReleaseIn,
    RemovemappingIn,
    RemovemappingOne,
    Rename2In,
    RenameIn,
    SetattrIn,
    SetupmappingIn,
    WriteIn,
)
from testbed.fuse.wire import InHeader, Opcode, OutHeader, check_len

IN_HEADER_SIZE = InHeader.FORMAT.size  # 40
OUT_HEADER_SIZE = OutHeader.FORMAT.size  # 16
# fs/fuse/dev.c fuse_dev_do_write(): "if (oh.error <= -512 || oh.error > 0)" is -EINVAL.
MAX_ERRNO = 511


class Args(Protocol):
    def pack(self) -> bytes: ...


def _split_name(what: str, data: bytes) -> bytes:
    """A name argument: the bytes up to a NUL that must be the last byte (args[i].size is
    name->len + 1 in dir.c), with no other NUL."""
    if not data or data[-1] != 0 or data.index(0) != len(data) - 1:
        raise FuseProtocolError(f"{what}: name is not one NUL-terminated string", bytes(data))
    return bytes(data[:-1])


def _split_two_names(what: str, data: bytes) -> tuple[bytes, bytes]:
    first = data.find(0)
    if first < 0:
        raise FuseProtocolError(f"{what}: no NUL after the first name", bytes(data))
    return bytes(data[:first]), _split_name(what, data[first + 1 :])


@dataclass(frozen=True)
class NameArgs:
    """LOOKUP, UNLINK, RMDIR: one NUL-terminated name."""

    name: bytes

    def pack(self) -> bytes:
        return self.name + b"\0"

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(_split_name("name", data))


@dataclass(frozen=True)
class CreateArgs:
    arg: CreateIn
    name: bytes

    def pack(self) -> bytes:
        return self.arg.pack() + self.name + b"\0"

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        size = CreateIn.FORMAT.size
        _need("CREATE", data, size + 1)
        return cls(CreateIn.unpack(data[:size]), _split_name("CREATE", data[size:]))


@dataclass(frozen=True)
class MkdirArgs:
    arg: MkdirIn
    name: bytes

    def pack(self) -> bytes:
        return self.arg.pack() + self.name + b"\0"

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        size = MkdirIn.FORMAT.size
        _need("MKDIR", data, size + 1)
        return cls(MkdirIn.unpack(data[:size]), _split_name("MKDIR", data[size:]))


@dataclass(frozen=True)
class RenameArgs:
    """RENAME (fuse_rename_in) and RENAME2 (fuse_rename2_in, with flags), then two names."""

    newdir: int
    old: bytes
    new: bytes
    flags: int = 0
    rename2: bool = False

    def pack(self) -> bytes:
        head = Rename2In(self.newdir, self.flags) if self.rename2 else RenameIn(self.newdir)
        return head.pack() + self.old + b"\0" + self.new + b"\0"

    @classmethod
    def unpack_rename(cls, data: bytes) -> Self:
        size = RenameIn.FORMAT.size
        _need("RENAME", data, size + 2)
        old, new = _split_two_names("RENAME", data[size:])
        return cls(RenameIn.unpack(data[:size]).newdir, old, new)

    @classmethod
    def unpack_rename2(cls, data: bytes) -> Self:
        size = Rename2In.FORMAT.size
        _need("RENAME2", data, size + 2)
        head = Rename2In.unpack(data[:size])
        old, new = _split_two_names("RENAME2", data[size:])
        return cls(head.newdir, old, new, head.flags, rename2=True)


@dataclass(frozen=True)
class WriteArgs:
    arg: WriteIn
    data: bytes

    def pack(self) -> bytes:
        return self.arg.pack() + self.data

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        size = WriteIn.FORMAT.size
        _need("WRITE", data, size)
        arg = WriteIn.unpack(data[:size])
        payload = bytes(data[size:])
        if len(payload) != arg.size:
            raise FuseProtocolError(
                f"WRITE: fuse_write_in.size {arg.size} but {len(payload)} data bytes follow",
                bytes(data),
            )
        return cls(arg, payload)


@dataclass(frozen=True)
class GetxattrArgs:
    size: int
    name: bytes

    def pack(self) -> bytes:
        return GetxattrIn(self.size).pack() + self.name + b"\0"

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        size = GetxattrIn.FORMAT.size
        _need("GETXATTR", data, size + 1)
        return cls(GetxattrIn.unpack(data[:size]).size, _split_name("GETXATTR", data[size:]))


T = TypeVar("T", ForgetOne, RemovemappingOne)
A = TypeVar("A")


def _counted(what: str, data: bytes, count: int, offset: int, item: type[T]) -> tuple[T, ...]:
    size = item.FORMAT.size
    check_len(what, data, offset + count * size)
    return tuple(
        item.unpack(data[offset + i * size : offset + (i + 1) * size]) for i in range(count)
    )


@dataclass(frozen=True)
class BatchForgetArgs:
    entries: tuple[ForgetOne, ...]

    def pack(self) -> bytes:
        return BatchForgetIn(len(self.entries)).pack() + b"".join(e.pack() for e in self.entries)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        head = BatchForgetIn.FORMAT.size
        _need("BATCH_FORGET", data, head)
        count = BatchForgetIn.unpack(data[:head]).count
        return cls(_counted("BATCH_FORGET", data, count, head, ForgetOne))


@dataclass(frozen=True)
class RemovemappingArgs:
    entries: tuple[RemovemappingOne, ...]

    def pack(self) -> bytes:
        head = RemovemappingIn(len(self.entries)).pack()
        return head + b"".join(e.pack() for e in self.entries)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        head = RemovemappingIn.FORMAT.size
        _need("REMOVEMAPPING", data, head)
        count = RemovemappingIn.unpack(data[:head]).count
        return cls(_counted("REMOVEMAPPING", data, count, head, RemovemappingOne))


@dataclass(frozen=True)
class NoArgs:
    """STATFS, DESTROY: the in-header alone."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        check_len("argument-less request", data, 0)
        return cls()


@dataclass(frozen=True)
class RawArgs:
    """An opcode this module does not decode (the server answers ENOSYS): kept as bytes."""

    data: bytes

    def pack(self) -> bytes:
        return self.data


def _need(what: str, data: bytes, at_least: int) -> None:
    if len(data) < at_least:
        raise FuseProtocolError(f"{what}: {len(data)} bytes, need at least {at_least}", data)


class _Decoder(Protocol):
    def __call__(self, data: bytes, /) -> Args: ...


_O = Opcode
DECODERS: dict[Opcode, _Decoder] = {
    _O.INIT: InitIn.unpack,
    _O.LOOKUP: NameArgs.unpack,
    _O.FORGET: ForgetIn.unpack,
    _O.BATCH_FORGET: BatchForgetArgs.unpack,
    _O.GETATTR: GetattrIn.unpack,
    _O.SETATTR: SetattrIn.unpack,
    _O.OPEN: OpenIn.unpack,
    _O.OPENDIR: OpenIn.unpack,
    _O.READ: ReadIn.unpack,
    _O.READDIR: ReadIn.unpack,
    _O.READDIRPLUS: ReadIn.unpack,
    _O.WRITE: WriteArgs.unpack,
    _O.CREATE: CreateArgs.unpack,
    _O.MKDIR: MkdirArgs.unpack,
    _O.UNLINK: NameArgs.unpack,
    _O.RMDIR: NameArgs.unpack,
    _O.RENAME: RenameArgs.unpack_rename,
    _O.RENAME2: RenameArgs.unpack_rename2,
    _O.FLUSH: FlushIn.unpack,
    _O.RELEASE: ReleaseIn.unpack,
    _O.RELEASEDIR: ReleaseIn.unpack,
    _O.FSYNC: FsyncIn.unpack,
    _O.FSYNCDIR: FsyncIn.unpack,
    _O.STATFS: NoArgs.unpack,
    _O.ACCESS: AccessIn.unpack,
    _O.GETXATTR: GetxattrArgs.unpack,
    _O.LISTXATTR: GetxattrIn.unpack,
    _O.INTERRUPT: InterruptIn.unpack,
    _O.SETUPMAPPING: SetupmappingIn.unpack,
    _O.REMOVEMAPPING: RemovemappingArgs.unpack,
    _O.DESTROY: NoArgs.unpack,
}

# Requests the guest expects no reply to. FORGET goes on the hiprio queue without a
# device-writable buffer at all (virtio_fs.c send_forget_request()).
NO_REPLY: frozenset[int] = frozenset({_O.FORGET, _O.BATCH_FORGET, _O.INTERRUPT})


@dataclass(frozen=True)
class FuseRequest:
    """One request: the in-header, its decoded arguments, and the extension bytes that
    follow them (``total_extlen``, 7.38: security context, supplementary groups)."""

    header: InHeader
    args: Args
    extensions: bytes = b""

    @property
    def opcode(self) -> int:
        return self.header.opcode

    @property
    def unique(self) -> int:
        return self.header.unique

    @property
    def nodeid(self) -> int:
        return self.header.nodeid

    def args_as(self, kind: type[A]) -> A:
        """The arguments, typed: the decoder table guarantees the kind per opcode."""
        if not isinstance(self.args, kind):
            raise FuseProtocolError(f"opcode {self.opcode}: arguments are {self.args!r}")
        return self.args

    @classmethod
    def make(cls, opcode: int, unique: int, nodeid: int, args: Args, **header: int) -> Self:
        """A request with ``len`` computed; ``header`` sets uid, gid, pid."""
        body = args.pack()
        hdr = InHeader(IN_HEADER_SIZE + len(body), int(opcode), unique, nodeid, **header)
        return cls(hdr, args)

    def pack(self) -> bytes:
        body = self.args.pack() + self.extensions
        if len(self.extensions) % 8:
            raise FuseProtocolError("extensions are not a multiple of 8 bytes", self.extensions)
        header = replace(
            self.header, len=IN_HEADER_SIZE + len(body), total_extlen=len(self.extensions) // 8
        )
        return header.pack() + body


def decode_header(data: bytes) -> InHeader:
    """The in-header alone (at least 40 bytes): enough to address a reply."""
    if len(data) < IN_HEADER_SIZE:
        raise FuseProtocolError(
            f"FUSE request: {len(data)} bytes, shorter than the {IN_HEADER_SIZE}-byte in-header",
            bytes(data),
        )
    return InHeader.unpack(bytes(data[:IN_HEADER_SIZE]))


def decode_request(data: bytes) -> FuseRequest:
    """Decode the device-readable bytes of one chain into a request.

    Checks that the header's ``len`` is the number of bytes received, that the extension
    area fits, and that the arguments fit the opcode exactly. Opcodes without a decoder
    come back as :class:`RawArgs`.
    """
    data = bytes(data)
    header = decode_header(data)
    if header.len != len(data):
        raise FuseProtocolError(
            f"FUSE request: in-header len {header.len}, but {len(data)} bytes arrived", data
        )
    body = data[IN_HEADER_SIZE:]
    ext = header.total_extlen * 8
    if ext > len(body):
        raise FuseProtocolError(
            f"FUSE request: total_extlen {header.total_extlen} (x8) exceeds the "
            f"{len(body)}-byte body",
            data,
        )
    args_bytes, extensions = body[: len(body) - ext], body[len(body) - ext :]
    try:
        decoder = DECODERS.get(Opcode(header.opcode))
    except ValueError:
        decoder = None
    if decoder is None:
        return FuseRequest(header, RawArgs(args_bytes), extensions)
    try:
        args = decoder(args_bytes)
    except FuseProtocolError as exc:
        # Keep the whole request as the evidence, and say which opcode it was.
        name = Opcode(header.opcode).name
        raise FuseProtocolError(f"{name} (unique {header.unique}): {exc.args[0]}", data) from exc
    return FuseRequest(header, args, extensions)


def encode_reply(unique: int, *parts: bytes) -> bytes:
    """A successful reply: the out-header (len covers everything) and the payload parts."""
    payload = b"".join(parts)
    return OutHeader(OUT_HEADER_SIZE + len(payload), 0, unique).pack() + payload


def encode_error(unique: int, errno_: int) -> bytes:
    """An error reply: the out-header alone, error = -errno (1..511, as dev.c accepts)."""
    if not 0 < errno_ <= MAX_ERRNO:
        raise FuseProtocolError(f"reply: errno {errno_} outside 1..{MAX_ERRNO}")
    return OutHeader(OUT_HEADER_SIZE, -errno_, unique).pack()
