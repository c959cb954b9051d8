"""The split virtqueue (VIRTIO 1.x section 2.7), the device's side. Pure: guest memory comes
in as a :class:`~testbed.vhost_user.memory.GuestMemory`; no fds, no threads.

Layout in guest memory, little endian, for a queue of ``size`` entries:

- descriptor table (16-byte aligned): ``size`` x {le64 addr, le32 len, le16 flags, le16 next}
- available ring (driver area, 2-byte aligned): le16 flags, le16 idx, le16 ring[size],
  le16 used_event (read only with VIRTIO_RING_F_EVENT_IDX)
- used ring (device area, 4-byte aligned): le16 flags, le16 idx, {le32 id, le32 len}[size],
  le16 avail_event (written only with VIRTIO_RING_F_EVENT_IDX)

Anything the driver put there against the spec raises :class:`RingError` naming the rule.
Two kinds: a bad *chain* (a descriptor outside memory, a loop, a readable buffer after a
writable one, a bad indirect table, a ``next`` out of range) carries the chain's head, and
the caller completes that chain with used length 0 -- the driver gets its buffer back and
the rest of the queue keeps working, which is what a test bed wants to observe next. A bad
*ring* (rings outside memory or misaligned, a head index >= size, an available index more
than ``size`` ahead) is ``broken``: there is no valid chain to give back, so the caller
stops serving the queue (virtio's "device MAY set DEVICE_NEEDS_RESET" case).

Indices are free-running 16-bit counters (they wrap at 65536; the slot is ``idx % size``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from testbed.errors import GuestMemoryError, RingError
from testbed.vhost_user.memory import GuestMemory

DESC_F_NEXT = 0x1
DESC_F_WRITE = 0x2
DESC_F_INDIRECT = 0x4
AVAIL_F_NO_INTERRUPT = 0x1
USED_F_NO_NOTIFY = 0x1

# Device feature bits that belong to the ring, not to one device type.
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29

MAX_SIZE = 32768
DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")
_IDX_MASK = 0xFFFF


def desc_table_bytes(size: int) -> int:
    return DESC.size * size


def avail_ring_bytes(size: int) -> int:
    """flags, idx, ring[size], used_event."""
    return 4 + 2 * size + 2


def used_ring_bytes(size: int) -> int:
    """flags, idx, ring[size], avail_event."""
    return 4 + USED_ELEM.size * size + 2


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event: did the index move past ``event_idx`` going from old to new?"""
    return (new_idx - event_idx - 1) & _IDX_MASK < (new_idx - old_idx) & _IDX_MASK


@dataclass(frozen=True)
class Descriptor:
    addr: int
    length: int
    flags: int
    next: int

    @classmethod
    def unpack(cls, data: bytes) -> Descriptor:
        return cls(*DESC.unpack(data))

    def pack(self) -> bytes:
        return DESC.pack(self.addr, self.length, self.flags, self.next)


@dataclass(frozen=True)
class Buffer:
    """One guest buffer of a chain (already checked to lie inside one memory region)."""

    addr: int
    length: int


@dataclass(frozen=True)
class Chain:
    """A descriptor chain popped from the available ring: device-readable buffers first,
    then device-writable ones, in chain order."""

    head: int
    readable: tuple[Buffer, ...] = ()
    writable: tuple[Buffer, ...] = ()
    indirect: bool = False

    @property
    def readable_bytes(self) -> int:
        return sum(b.length for b in self.readable)

    @property
    def writable_bytes(self) -> int:
        return sum(b.length for b in self.writable)

    def read(self, memory: GuestMemory, limit: int | None = None) -> bytes:
        """The readable buffers' bytes, concatenated (at most ``limit`` of them)."""
        out = bytearray()
        for buf in self.readable:
            want = buf.length if limit is None else min(buf.length, limit - len(out))
            if want <= 0:
                break
            out += memory.read(buf.addr, want)
        return bytes(out)

    def write(self, memory: GuestMemory, data: bytes) -> int:
        """Scatter ``data`` over the writable buffers; returns the bytes written (the
        used length), short when the buffers are smaller than ``data``."""
        done = 0
        for buf in self.writable:
            if done == len(data):
                break
            part = data[done : done + buf.length]
            memory.write(buf.addr, part)
            done += len(part)
        return done


def check_size(size: int) -> None:
    """RingError (broken) unless ``size`` is a split ring's size: a power of two, <= 32768."""
    if not 1 <= size <= MAX_SIZE or size & (size - 1):
        raise RingError(
            "vring-num", f"queue size {size} is not a power of two in 1..{MAX_SIZE}", broken=True
        )


@dataclass(frozen=True)
class RingLayout:
    """Where a split ring lives (guest-physical addresses) and its size."""

    size: int
    desc: int
    avail: int
    used: int

    def check(self, memory: GuestMemory) -> None:
        """RingError (broken) unless the size and the three areas are usable."""
        check_size(self.size)
        areas = (
            ("descriptor table", self.desc, desc_table_bytes(self.size), 16),
            ("available ring", self.avail, avail_ring_bytes(self.size), 2),
            ("used ring", self.used, used_ring_bytes(self.size), 4),
        )
        for name, addr, length, align in areas:
            if addr % align:
                raise RingError(
                    "vring-addr", f"{name} at {addr:#x} is not {align}-byte aligned", broken=True
                )
            try:
                memory.check(addr, length)
            except GuestMemoryError as exc:
                raise RingError("vring-addr", f"{name}: {exc}", broken=True) from exc


class SplitQueue:
    """The device's side of one split virtqueue.

    ``last_avail_idx`` is the next available-ring entry to pop (what GET_VRING_BASE reports
    and SET_VRING_BASE sets); ``next_used`` the used index the next completion publishes.
    The device completes chains in the order it pops them, so both start equal.
    """

    def __init__(
        self,
        layout: RingLayout,
        *,
        indirect: bool = False,
        event_idx: bool = False,
        last_avail_idx: int = 0,
        next_used: int | None = None,
    ) -> None:
        self.layout = layout
        self.indirect = indirect
        self.event_idx = event_idx
        self.last_avail_idx = last_avail_idx & _IDX_MASK
        self.next_used = self.last_avail_idx if next_used is None else next_used & _IDX_MASK

    @property
    def size(self) -> int:
        return self.layout.size

    # --- the available ring ---------------------------------------------------------------

    def _u16(self, memory: GuestMemory, addr: int, what: str) -> int:
        try:
            return int(U16.unpack(memory.read(addr, 2))[0])
        except GuestMemoryError as exc:
            raise RingError("vring-addr", f"{what}: {exc}", broken=True) from exc

    def avail_idx(self, memory: GuestMemory) -> int:
        return self._u16(memory, self.layout.avail + 2, "available ring index")

    def pending(self, memory: GuestMemory) -> int:
        """How many chains the driver made available that we have not popped."""
        count = (self.avail_idx(memory) - self.last_avail_idx) & _IDX_MASK
        if count > self.size:
            raise RingError(
                "vring-index",
                f"the available index is {count} entries ahead of the last one we saw "
                f"({self.last_avail_idx}), more than the queue size {self.size}",
                broken=True,
            )
        return count

    def pop(self, memory: GuestMemory) -> Chain | None:
        """The next available chain, or None when there is none.

        The entry is consumed even when the chain is bad: a RingError with ``head`` set
        must still be completed (push(head, 0)) by the caller.
        """
        if not self.pending(memory):
            return None
        slot = self.last_avail_idx % self.size
        head = self._u16(memory, self.layout.avail + 4 + 2 * slot, f"available ring slot {slot}")
        self.last_avail_idx = (self.last_avail_idx + 1) & _IDX_MASK
        if head >= self.size:
            raise RingError(
                "vring-index",
                f"available ring slot {slot} holds head {head}, the queue has {self.size} "
                "descriptors",
                broken=True,
            )
        return self.walk(memory, head)

    # --- descriptor chains ----------------------------------------------------------------

    def walk(self, memory: GuestMemory, head: int) -> Chain:
        """The chain starting at descriptor ``head``, following NEXT and at most one
        indirect table; RingError (with ``head``) for anything against the spec."""

        def fail(rule: str, detail: str) -> RingError:
            return RingError(rule, detail, head=head)

        table, count, where = self.layout.desc, self.size, "descriptor"
        index = head
        seen: set[int] = set()
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        in_indirect = False
        total = 0
        while True:
            if index in seen:
                raise fail("vring-loop", f"{where} {index} comes round again (a loop)")
            seen.add(index)
            try:
                desc = Descriptor.unpack(memory.read(table + DESC.size * index, DESC.size))
            except GuestMemoryError as exc:
                raise fail("vring-desc-range", f"{where} {index} cannot be read: {exc}") from exc
            if desc.flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise fail(
                        "vring-indirect",
                        f"{where} {index} is INDIRECT, VIRTIO_RING_F_INDIRECT_DESC was not "
                        "negotiated",
                    )
                if in_indirect:
                    raise fail(
                        "vring-indirect", f"{where} {index} is INDIRECT inside an indirect table"
                    )
                if desc.flags & DESC_F_NEXT:
                    raise fail("vring-indirect", f"{where} {index} sets both INDIRECT and NEXT")
                if desc.length == 0 or desc.length % DESC.size:
                    raise fail(
                        "vring-indirect",
                        f"{where} {index}: indirect table length {desc.length} is not a "
                        f"non-zero multiple of {DESC.size}",
                    )
                try:
                    memory.check(desc.addr, desc.length)
                except GuestMemoryError as exc:
                    raise fail(
                        "vring-desc-range", f"indirect table of {where} {index}: {exc}"
                    ) from exc
                table, count, where = desc.addr, desc.length // DESC.size, "indirect descriptor"
                index, seen, in_indirect = 0, set(), True
                continue
            total += 1
            if total > self.size:
                raise fail("vring-loop", f"the chain is longer than the queue size {self.size}")
            try:
                memory.check(desc.addr, desc.length)
            except GuestMemoryError as exc:
                raise fail("vring-desc-range", f"{where} {index}: {exc}") from exc
            buffer = Buffer(desc.addr, desc.length)
            if desc.flags & DESC_F_WRITE:
                writable.append(buffer)
            elif writable:
                raise fail(
                    "vring-direction",
                    f"{where} {index} is device-readable after a device-writable one",
                )
            else:
                readable.append(buffer)
            if not desc.flags & DESC_F_NEXT:
                return Chain(head, tuple(readable), tuple(writable), in_indirect)
            if desc.next >= count:
                raise fail(
                    "vring-index",
                    f"{where} {index} links to {desc.next}, the table has {count} entries",
                )
            index = desc.next

    # --- the used ring --------------------------------------------------------------------

    def push(self, memory: GuestMemory, head: int, length: int) -> None:
        """Complete chain ``head`` with ``length`` bytes written: the element first, then
        the index that publishes it."""
        slot = self.next_used % self.size
        used = self.layout.used
        try:
            memory.write(used + 4 + USED_ELEM.size * slot, USED_ELEM.pack(head, length))
            self.next_used = (self.next_used + 1) & _IDX_MASK
            memory.write(used + 2, U16.pack(self.next_used))
        except GuestMemoryError as exc:
            raise RingError("vring-addr", f"used ring: {exc}", broken=True) from exc

    def needs_interrupt(self, memory: GuestMemory, old_used: int) -> bool:
        """Should the driver be notified of the completions from ``old_used`` to now?
        With EVENT_IDX: when the used index passed the driver's used_event; without: unless
        the driver set VRING_AVAIL_F_NO_INTERRUPT."""
        if self.next_used == old_used & _IDX_MASK:
            return False
        if self.event_idx:
            used_event = self._u16(
                memory, self.layout.avail + 4 + 2 * self.size, "available ring used_event"
            )
            return need_event(used_event, self.next_used, old_used)
        flags = self._u16(memory, self.layout.avail, "available ring flags")
        return not flags & AVAIL_F_NO_INTERRUPT

    def publish_avail_event(self, memory: GuestMemory) -> None:
        """With EVENT_IDX: ask for a kick once the driver makes entry last_avail_idx
        available. The caller then re-checks pending(): an entry added before this write
        landed came with no kick."""
        if not self.event_idx:
            return
        try:
            memory.write(
                self.layout.used + 4 + USED_ELEM.size * self.size, U16.pack(self.last_avail_idx)
            )
        except GuestMemoryError as exc:
            raise RingError("vring-addr", f"used ring avail_event: {exc}", broken=True) from exc
