"""FUSE wire format (pure): uapi numbers and sizes, round trips of every struct, requests as
Linux 6.1 / 6.12 lay them out (packed by hand here), malformed input, and the decoder fuzzed."""

from __future__ import annotations

import contextlib
import struct
from dataclasses import fields
from typing import Any

import pytest
from fuse_guest import DIRENT, IN_HDR, INIT_IN, LINUX_6_1, LINUX_6_12, NO_FH
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.errors import FuseProtocolError, ProtocolError
from testbed.fuse import codec, structs, wire
from testbed.fuse.codec import (
    BatchForgetArgs,
    CreateArgs,
    FuseRequest,
    GetxattrArgs,
    MkdirArgs,
    NameArgs,
    RawArgs,
    RemovemappingArgs,
    RenameArgs,
    WriteArgs,
    decode_request,
    encode_error,
    encode_reply,
)
from testbed.fuse.structs import (
    Attr,
    AttrOut,
    Dirent,
    Direntplus,
    EntryOut,
    ForgetOne,
    InitIn,
    RemovemappingOne,
    SetupmappingIn,
)
from testbed.fuse.wire import InHeader, InitFlag, Opcode, OutHeader, Struct

# --- numbers and sizes that must match include/uapi/linux/fuse.h ---------------------------


def test_opcodes_match_uapi() -> None:
    assert (Opcode.LOOKUP, Opcode.FORGET, Opcode.INIT, Opcode.DESTROY) == (1, 2, 26, 38)
    assert (Opcode.BATCH_FORGET, Opcode.READDIRPLUS, Opcode.RENAME2) == (42, 44, 45)
    assert (Opcode.SETUPMAPPING, Opcode.REMOVEMAPPING, Opcode.STATX) == (48, 49, 52)
    assert 7 not in set(Opcode) and 19 not in set(Opcode)
    assert wire.opcode_name(48) == "SETUPMAPPING" and wire.opcode_name(99) == "UNKNOWN_99"


def test_init_flags_match_uapi() -> None:
    assert InitFlag.MAP_ALIGNMENT == 1 << 26 and InitFlag.SUBMOUNTS == 1 << 27
    assert InitFlag.INIT_EXT == 1 << 30 and InitFlag.SECURITY_CTX == 1 << 32
    assert InitFlag.HAS_INODE_DAX == 1 << 33 and InitFlag.ALLOW_IDMAP == 1 << 40
    assert wire.split_flags(LINUX_6_12) == (LINUX_6_12 & 0xFFFFFFFF, LINUX_6_12 >> 32)
    assert InitFlag(LINUX_6_1) & InitFlag.INIT_EXT


SIZES = {
    InHeader: 40, OutHeader: 16, Attr: 88, structs.InitOut: 64, structs.ForgetIn: 8,
    ForgetOne: 16, structs.BatchForgetIn: 8, structs.GetattrIn: 16, structs.SetattrIn: 88,
    structs.OpenIn: 8, structs.OpenOut: 16, structs.CreateIn: 16, structs.MkdirIn: 8,
    structs.RenameIn: 8, structs.Rename2In: 16, structs.ReleaseIn: 24, structs.FlushIn: 24,
    structs.ReadIn: 40, structs.WriteIn: 40, structs.WriteOut: 8, structs.Kstatfs: 80,
    structs.FsyncIn: 16, structs.GetxattrIn: 8, structs.AccessIn: 8, structs.InterruptIn: 8,
    SetupmappingIn: 40, structs.RemovemappingIn: 4, RemovemappingOne: 16,
}  # fmt: skip


@pytest.mark.parametrize("kind", list(SIZES), ids=lambda k: k.__name__)
def test_struct_sizes(kind: type[Struct]) -> None:
    assert kind.FORMAT.size == SIZES[kind]


def test_composite_sizes() -> None:
    assert EntryOut.SIZE == 128 and AttrOut.SIZE == 104 and InitIn.FORMAT.size == 64
    assert InitIn.COMPAT.size == 16 and Dirent.HEAD == 24
    assert wire.DAX_RANGE == 2 * 1024 * 1024


# --- round trips ---------------------------------------------------------------------------

_RANGES = {"Q": 2**64 - 1, "I": 2**32 - 1, "H": 2**16 - 1}


def strategy_for(kind: type[Any]) -> st.SearchStrategy[Any]:
    """Values in range for every field of a flat struct, from its format string."""
    codes = [c for c in kind.FORMAT.format.lstrip("<") if c.isalpha() and c != "x"]
    names = [f.name for f in fields(kind)]
    assert len(codes) == len(names), kind
    parts = {}
    for name, code in zip(names, codes, strict=True):
        if code == "i":
            parts[name] = st.integers(-(2**31), 2**31 - 1)
        else:
            parts[name] = st.integers(0, _RANGES[code])
    return st.builds(kind, **parts)


@pytest.mark.parametrize("kind", list(SIZES), ids=lambda k: k.__name__)
@settings(max_examples=40)
@given(data=st.data())
def test_flat_struct_round_trip(kind: type[Struct], data: st.DataObject) -> None:
    value = data.draw(strategy_for(kind))
    packed = value.pack()
    assert len(packed) == kind.FORMAT.size
    assert kind.unpack(packed) == value


attrs = strategy_for(Attr)


@given(attrs, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_entry_and_attr_out_round_trip(attr: Attr, n: int, nsec: int) -> None:
    entry = EntryOut(n, n // 3, n // 5, n // 7, nsec, nsec // 2, attr)
    assert EntryOut.unpack(entry.pack()) == entry
    out = AttrOut(n, nsec, attr)
    assert AttrOut.unpack(out.pack()) == out


@given(
    st.integers(0, 2**32 - 1), st.integers(36, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_init_in_round_trip(major: int, minor: int, ra: int, flags: int, flags2: int) -> None:
    value = InitIn(major, minor, ra, flags, flags2)
    assert len(value.pack()) == 64 and InitIn.unpack(value.pack()) == value
    compat = InitIn(major, minor % 36, ra, flags)
    assert len(compat.pack()) == 16 and InitIn.unpack(compat.pack()) == compat


def test_init_in_flags2_counts_only_with_init_ext() -> None:
    assert InitIn(7, 41, 0, 0, 1).all_flags == 0
    assert InitIn(7, 41, 0, InitFlag.INIT_EXT, 2).all_flags == InitFlag.INIT_EXT | 1 << 33


names = st.binary(min_size=0, max_size=40).map(lambda b: b.replace(b"\0", b"x"))
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
composite_args = st.one_of(
    names.map(NameArgs),
    st.builds(CreateArgs, strategy_for(structs.CreateIn), names),
    st.builds(MkdirArgs, strategy_for(structs.MkdirIn), names),
    st.builds(RenameArgs, u64, names, names),
    st.builds(GetxattrArgs, u32, names),
    st.lists(st.builds(ForgetOne, u64, u64), max_size=5).map(lambda e: BatchForgetArgs(tuple(e))),
    st.lists(st.builds(RemovemappingOne, u64, u64), max_size=5).map(
        lambda e: RemovemappingArgs(tuple(e))
    ),
)
OPCODE_FOR = {
    NameArgs: Opcode.LOOKUP, CreateArgs: Opcode.CREATE, MkdirArgs: Opcode.MKDIR,
    RenameArgs: Opcode.RENAME, GetxattrArgs: Opcode.GETXATTR,
    BatchForgetArgs: Opcode.BATCH_FORGET, RemovemappingArgs: Opcode.REMOVEMAPPING,
}  # fmt: skip


@given(composite_args, u64, u64)
def test_request_round_trip(args: Any, unique: int, nodeid: int) -> None:
    request = FuseRequest.make(OPCODE_FOR[type(args)], unique, nodeid, args, uid=1, pid=7)
    assert decode_request(request.pack()) == request


@given(st.binary(max_size=300), u64)
def test_write_and_rename2_round_trip(data: bytes, fh: int) -> None:
    write = WriteArgs(structs.WriteIn(fh, 4096, len(data)), data)
    request = FuseRequest.make(Opcode.WRITE, 2, 3, write)
    assert decode_request(request.pack()).args == write
    rename2 = RenameArgs(5, b"a", b"b", flags=1, rename2=True)
    assert decode_request(FuseRequest.make(Opcode.RENAME2, 2, 3, rename2).pack()).args == rename2


@given(u64, u64, u32, names.filter(lambda n: len(n) > 0))
def test_dirent_layout(ino: int, off: int, dtype: int, name: bytes) -> None:
    """fuse_dirent as the guest reads it (tests/fuse_guest.py's DIRENT, packed by hand):
    ino, off, namelen, type, the name, zeros to 8 bytes; fuse_direntplus puts the entry
    before it."""
    dirent = Dirent(ino, off, dtype, name)
    packed = dirent.pack()
    assert len(packed) % 8 == 0 and len(packed) == Dirent.size_for(name)
    assert packed == (DIRENT.pack(ino, off, len(name), dtype) + name).ljust(len(packed), b"\0")
    entry = EntryOut(ino, 0, 0, 0, 0, 0, Attr(ino, *[0] * 14))
    plus = Direntplus(entry, dirent).pack()
    assert plus == entry.pack() + packed and len(plus) == Direntplus.size_for(name)


@pytest.mark.parametrize(("namelen", "size"), [(1, 32), (8, 32), (9, 40), (16, 40), (17, 48)])
def test_dirent_alignment(namelen: int, size: int) -> None:
    packed = Dirent(1, 2, 8, b"n" * namelen).pack()
    assert len(packed) == size and packed[24 + namelen :] == b"\0" * (size - 24 - namelen)
    assert Direntplus.size_for(b"n" * namelen) == 128 + size


# --- requests as the guest kernels lay them out ------------------------------------------------


def hdr(opcode: int, body: bytes, unique: int = 8, nodeid: int = 1, extlen: int = 0) -> bytes:
    return IN_HDR.pack(40 + len(body), opcode, unique, nodeid, 0, 0, 99, extlen, 0) + body


def test_init_from_linux_6_1_and_6_12() -> None:
    for minor, flags in ((37, LINUX_6_1), (41, LINUX_6_12)):
        body = INIT_IN.pack(7, minor, 131072, flags & 0xFFFFFFFF, flags >> 32, *[0] * 11)
        request = decode_request(hdr(26, body, nodeid=0))
        assert request.args == InitIn(7, minor, 131072, flags & 0xFFFFFFFF, flags >> 32)
        assert request.args_as(InitIn).all_flags == flags
    old = decode_request(hdr(26, struct.pack("<IIII", 7, 31, 0, 1 << 26)))
    assert old.args == InitIn(7, 31, 0, 1 << 26)


def test_setupmapping_as_dax_c_sends_it() -> None:
    body = struct.pack("<QQQQQ", NO_FH, 4 << 20, 2 << 20, 0b11, 6 << 20)
    args = decode_request(hdr(48, body, nodeid=5)).args
    assert args == SetupmappingIn(NO_FH, 4 << 20, 2 << 20, 0b11, 6 << 20)


def test_removemapping_entries_start_at_offset_4() -> None:
    body = struct.pack("<I", 2) + struct.pack("<QQ", 0, 2 << 20) + struct.pack("<QQ", 4 << 20, 1)
    assert len(body) == 36
    args = decode_request(hdr(49, body)).args
    assert args == RemovemappingArgs((RemovemappingOne(0, 2 << 20), RemovemappingOne(4 << 20, 1)))
    with pytest.raises(FuseProtocolError, match="REMOVEMAPPING"):
        decode_request(hdr(49, struct.pack("<I", 3) + body[4:]))


def test_forget_from_the_hiprio_queue() -> None:
    # virtio_fs_wake_forget_and_unlock(): in-header + fuse_forget_in, len = 48.
    request = decode_request(hdr(2, struct.pack("<Q", 3), nodeid=9))
    assert request.args == structs.ForgetIn(3) and request.nodeid == 9 and len(request.pack()) == 48


def test_create_with_extensions_from_6_12() -> None:
    # 7.38 total_extlen: a supplementary-groups extension after the arguments is set aside.
    ext = struct.pack("<IIII", 16, 32, 1, 1000)
    body = struct.pack("<IIII", 0o100101, 0o100644, 0o022, 0) + b"new\0"
    request = decode_request(hdr(35, body + ext, extlen=2))
    assert request.args == CreateArgs(structs.CreateIn(0o100101, 0o100644, 0o022), b"new")
    assert request.extensions == ext


def test_unknown_opcode_is_kept_raw() -> None:
    request = decode_request(hdr(50, b"\0" * 8))
    assert request.args == RawArgs(b"\0" * 8)
    assert decode_request(hdr(4097, b"xyz")).args == RawArgs(b"xyz")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\0" * 39, "shorter than the 40-byte in-header"),
        (IN_HDR.pack(41, 1, 1, 1, 0, 0, 0, 0, 0) + b"ab", "len 41, but 42"),
        (hdr(1, b"name"), "NUL"),
        (hdr(1, b"a\0b\0"), "NUL"),
        (hdr(1, b""), "NUL"),
        (hdr(12, struct.pack("<Q", 1) + b"old"), "no NUL after the first name"),
        (hdr(16, struct.pack("<QQIIQII", 1, 0, 10, 0, 0, 0, 0) + b"short"), "10 but 5"),
        (hdr(42, struct.pack("<II", 2, 0) + b"\0" * 16), "BATCH_FORGET"),
        (hdr(17, b"\0"), "argument-less"),
        (hdr(26, b"\0" * 20), "16 or 64 bytes"),
        (hdr(48, b"\0" * 39), "fuse_setupmapping_in"),
        (hdr(1, b"x\0", extlen=1), "total_extlen"),
        (hdr(35, b"\0" * 16), "CREATE"),
    ],
)
def test_malformed_requests(data: bytes, message: str) -> None:
    with pytest.raises(FuseProtocolError, match=message) as info:
        decode_request(data)
    assert info.value.data is not None and isinstance(info.value, ProtocolError)


# --- replies ---------------------------------------------------------------------------------


def test_replies() -> None:
    reply = encode_reply(77, b"abc", b"de")
    assert reply == struct.pack("<IiQ", 21, 0, 77) + b"abcde"
    assert encode_error(5, 2) == struct.pack("<IiQ", 16, -2, 5)
    for bad in (0, 512, -1):
        with pytest.raises(FuseProtocolError):
            encode_error(1, bad)


# --- the decoder fuzzed ----------------------------------------------------------------------


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_decoder_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(FuseProtocolError):
        decode_request(data)


known = st.sampled_from(sorted(codec.DECODERS))


@settings(max_examples=1000)
@given(known, st.binary(max_size=160), st.integers(0, 3))
def test_decoder_fuzzed_past_the_header(opcode: int, body: bytes, extlen: int) -> None:
    """A well-framed header with random arguments: decoded, or refused precisely."""
    data = hdr(opcode, body, extlen=extlen)
    try:
        request = decode_request(data)
    except FuseProtocolError as exc:
        assert exc.data == data
    else:
        # Padding is written back as zeros, and a short form (INIT's 16-byte init_in of
        # protocols before 7.36) is written back in the full one: compare the arguments,
        # not the bytes or the header's length.
        again = decode_request(request.pack())
        assert request.opcode == opcode and again.opcode == opcode and again.args == request.args
