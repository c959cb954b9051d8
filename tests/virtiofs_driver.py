"""The driver's side of virtio-fs for the tests: FUSE requests packed by hand (from
include/uapi/linux/fuse.h, with tests/fuse_guest.py's structs, independent of testbed.fuse's
encoders) and laid into a virtqueue as Linux's virtio_fs_enqueue_req() does -- in-header and
arguments device-readable, out-header and reply device-writable; a FORGET one readable
buffer and nothing writable (send_forget_request()). Works over any GuestMemory: a
MemoryImage in the unit tests, QEMU's RAM over qtest in the QEMU tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from driver_ring import DriverQueue, Used
from fuse_guest import (
    DESTROY,
    FORGET,
    IN_HDR,
    INIT,
    INIT_IN,
    LINUX_6_12,
    LOOKUP,
    MAP_ALIGNMENT,
    NO_FH,
    OPEN,
    OUT_HDR,
    READ,
    REMOVEMAPPING,
    SETUPMAPPING,
    SETUPMAPPING_IN,
    X86_O_LARGEFILE,
    MiB,
    name_arg,
    read_in,
)

from testbed.vhost_user.memory import GuestMemory
from testbed.vhost_user.virtqueue import RingLayout

SLOT = 0x4000  # per descriptor head: request in the first half, reply in the second
FLAG_WRITE, FLAG_READ = 0b01, 0b10  # FUSE_SETUPMAPPING_FLAG_*
# What a 6.12 guest mounted with a DAX window offers (fuse_send_init()).
LINUX_6_12_DAX = LINUX_6_12 | MAP_ALIGNMENT


def make_share(parent: Path, files: dict[str, bytes]) -> Path:
    """A share directory under ``parent`` holding ``files`` (name -> content)."""
    root = parent / "share"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@dataclass(frozen=True)
class Request:
    opcode: int
    unique: int
    data: bytes
    reply_size: int  # 0: no writable part (FORGET)


class Requests:
    """Packs requests with increasing unique ids, as the guest does."""

    def __init__(self) -> None:
        self.unique = 0

    def make(
        self, opcode: int, nodeid: int = 1, body: bytes = b"", reply_size: int = 256
    ) -> Request:
        self.unique += 2
        head = IN_HDR.pack(IN_HDR.size + len(body), opcode, self.unique, nodeid, 0, 0, 42, 0, 0)
        return Request(opcode, self.unique, head + body, reply_size)

    def init(self, flags: int = LINUX_6_12_DAX, minor: int = 41) -> Request:
        body = INIT_IN.pack(7, minor, 128 * 1024, flags & 0xFFFFFFFF, flags >> 32, *[0] * 11)
        return self.make(INIT, 0, body)

    def lookup(self, parent: int, name: bytes) -> Request:
        return self.make(LOOKUP, parent, name_arg(name))

    def open(self, nodeid: int, flags: int = 2 | X86_O_LARGEFILE) -> Request:
        return self.make(OPEN, nodeid, struct.pack("<II", flags, 0))

    def read(self, nodeid: int, fh: int, offset: int, size: int, reply_size: int = 0) -> Request:
        return self.make(READ, nodeid, read_in(fh, offset, size), reply_size or 16 + size)

    def setupmapping(
        self, nodeid: int, foffset: int, moffset: int, *, write: bool = True, length: int = 2 * MiB
    ) -> Request:
        flags = FLAG_READ | (FLAG_WRITE if write else 0)
        body = SETUPMAPPING_IN.pack(NO_FH, foffset, length, flags, moffset)
        return self.make(SETUPMAPPING, nodeid, body, 16)

    def removemapping(self, nodeid: int, *ranges: tuple[int, int]) -> Request:
        # fuse_removemapping_in is a lone u32: the entries follow at offset 4, unpadded.
        body = struct.pack("<I", len(ranges)) + b"".join(struct.pack("<QQ", *r) for r in ranges)
        return self.make(REMOVEMAPPING, nodeid, body, 16)

    def destroy(self) -> Request:
        return self.make(DESTROY, 0, b"", 16)

    def forget(self, nodeid: int, nlookup: int) -> Request:
        return self.make(FORGET, nodeid, struct.pack("<Q", nlookup), 0)


@dataclass(frozen=True)
class Reply:
    used: int  # the used length the device gave
    error: int  # fuse_out_header.error: 0 or -errno
    unique: int
    payload: bytes


class FsQueue:
    """One virtio-fs virtqueue, the driver's side: each chain in flight has a slot of SLOT
    bytes in ``area`` (guest-physical) for its request and its reply."""

    def __init__(self, memory: GuestMemory, layout: RingLayout, area: int) -> None:
        self.ring = DriverQueue(memory, layout)
        self.memory = memory
        self.area = area
        self._free = [area + i * SLOT for i in range(layout.size)]
        self.sent: dict[int, tuple[Request, int]] = {}

    def reset(self) -> None:
        self.ring.reset()

    def send(self, request: Request, *, writable: int | None = None) -> int:
        """Lay the request into a chain and make it available; returns its head.
        ``writable``: the reply buffer's size, if not the request's own reply size."""
        size = request.reply_size if writable is None else writable
        assert len(request.data) <= SLOT // 2 and size <= SLOT // 2
        slot = self._free.pop(0)
        self.memory.write(slot, request.data)
        self.memory.write(slot + SLOT // 2, b"\xee" * size)
        reply = [(slot + SLOT // 2, size)] if size else []
        head = self.ring.add([(slot, len(request.data))], reply)
        self.ring.expose(head)
        self.sent[head] = (request, slot)
        return head

    def reply(self, used: Used) -> Reply:
        """Read the reply of a completed chain, checking it against its out-header."""
        request, slot = self.sent.pop(used.id)
        self._free.append(slot)
        if not used.length:
            return Reply(0, 0, request.unique, b"")
        data = self.memory.read(slot + SLOT // 2, used.length)
        length, error, unique = OUT_HDR.unpack_from(data)
        assert length == used.length, f"out.len {length}, used length {used.length}"
        assert unique == request.unique, f"reply to {unique}, sent {request.unique}"
        return Reply(used.length, error, unique, data[OUT_HDR.size :])
