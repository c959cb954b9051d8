"""Seeded generation of cases (pure): case ``i`` of seed ``s`` is always the same.

Most cases are near-valid -- a working layout, SHMEM at bit 22, a few well-formed channel
requests -- with one or two things bent, since a front-end that refuses everything at
realize shows nothing of its later states.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from testbed.device import DEVICE_TYPE
from testbed.fuzz.fdspec import FILE_KINDS, FdKind, FdSpec, FileOp, Op, SizeClass
from testbed.fuzz.grammar import (
    CHANNEL_REQUESTS,
    MUTABLE_REQUESTS,
    RECONNECT_MODES,
    Action,
    BodyKind,
    Case,
    M,
    Offer,
    ReplyKind,
    ReplyMutation,
    ShmemConfig,
    State,
    states_for,
)
from testbed.limits import MAX_SHMEM_REGIONS, PAGE_SIZE
from testbed.vhost_user.protocol import BackendRequest, ProtocolFeature

T = TypeVar("T")
U64_MAX = (1 << 64) - 1

GOOD_LAYOUTS: tuple[dict[int, int], ...] = (
    {0: 2 * M},
    {0: 4 * M},
    {0: 2 * M, 1: 2 * M},
    {1: 1 * M, 2: 1 * M},
    {3: 8 * M, 200: 8 * M},
    {0: 64 * 1024},
    {255: 2 * M},
    {0: 1 * M, 1: 1 * M, 2: 2 * M},
)
ODD_SIZES = (0, 1, PAGE_SIZE - 1, PAGE_SIZE + 1, 3 * M, 5 * M, 1 << 31, 1 << 40, 1 << 63, U64_MAX)
EXTRA_FEATURES = (
    ProtocolFeature.CONFIG,
    ProtocolFeature.HOST_NOTIFIER,
    ProtocolFeature.SHARED_OBJECT,
    ProtocolFeature.INBAND_NOTIFICATIONS,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
    ProtocolFeature.DEVICE_STATE,
    ProtocolFeature.LOG_SHMFD,
    ProtocolFeature.GET_VRING_BASE_INFLIGHT,
)
WITHHOLD_FEATURES = (
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.BACKEND_REQ,
    ProtocolFeature.BACKEND_SEND_FD,
    ProtocolFeature.STATUS,
    ProtocolFeature.RESET_DEVICE,
    ProtocolFeature.MQ,
)
INTERESTING_U64 = (0, 1, 2, 0xFF, 0x100, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, 1 << 63, U64_MAX)
# LIE (a header shorter than the bytes sent) desynchronises the stream on purpose: only
# by hand (replay), since a QEMU that then waits for bytes that never come is by design.
GENERATED_KINDS = tuple(k for k in ReplyKind if k is not ReplyKind.LIE)
# States weighted: the started device is where most of the channel's code runs.
STATE_WEIGHTS: dict[State, int] = {
    State.BEFORE_DRIVER_OK: 1,
    State.AFTER_DRIVER_OK: 8,
    State.DEVICE_RESET: 2,
    State.AFTER_SYSTEM_RESET: 2,
    State.DURING_DEVICE_DEL: 2,
    State.AFTER_RECONNECT: 3,
}

# How after-reconnect is entered: mostly on a device that then starts again; "live" (the
# known abort) keeps counting up.
RECONNECT_WEIGHTS = (6, 2, 1, 1)


def _pick(rng: random.Random, items: Sequence[T]) -> T:
    return items[rng.randrange(len(items))]


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"testbed-fuzz:{seed}:{index}")


def generate(arch: str, seed: int, index: int, device: str = DEVICE_TYPE) -> Case:
    """Case ``index`` of ``seed`` for ``arch``; the same draws for every ``device``."""
    rng = case_rng(seed, index)
    states = states_for(arch)
    last = rng.choices(states, [STATE_WEIGHTS[s] for s in states])[0]
    behind_port = last is State.DURING_DEVICE_DEL
    config = gen_config(rng, behind_port)
    offer = gen_offer(rng)
    replies = gen_replies(rng) if rng.random() < 0.3 else ()
    reconnect = "live"
    if last is State.AFTER_RECONNECT:
        reconnect = rng.choices(RECONNECT_MODES, RECONNECT_WEIGHTS)[0]
    path = Case(arch, seed, index, last_state=last, reconnect=reconnect).path
    actions: list[Action] = []
    for _ in range(rng.choice((1, 1, 2, 3, 4, 6))):
        # Mostly in the last state; sometimes on the way.
        state = last if rng.random() < 0.85 else _pick(rng, path)
        actions.append(gen_action(rng, state, config))
    # Actions follow the path's order.
    order = {s.value: i for i, s in enumerate(path)}
    actions.sort(key=lambda a: order[a.state])
    return Case(
        arch, seed, index, offer, config, replies, last.value, tuple(actions), reconnect, device
    )


def gen_config(rng: random.Random, behind_port: bool) -> ShmemConfig:
    layouts = [g for g in GOOD_LAYOUTS if not behind_port or len(g) == 1]
    sizes = dict(_pick(rng, layouts))
    if rng.random() > 0.25:
        return ShmemConfig(sizes)
    what = rng.randrange(8)
    if what == 0:
        sizes[rng.randrange(MAX_SHMEM_REGIONS)] = _pick(rng, ODD_SIZES)
        return ShmemConfig(sizes)
    if what == 1:
        around_the_limit = (MAX_SHMEM_REGIONS - 1, MAX_SHMEM_REGIONS, MAX_SHMEM_REGIONS + 1)
        nregions = _pick(rng, (0, 1, 2, 3, 4, *around_the_limit, 0xFFFFFFFF))
        return ShmemConfig(sizes, nregions=nregions)
    if what == 2:
        return ShmemConfig(sizes, padding=_pick(rng, (1, 0xFFFFFFFF)))
    if what == 3:
        return ShmemConfig(sizes, truncate=_pick(rng, (0, 4, 8, 16, 100, 2048, 2055)))
    if what == 4:
        return ShmemConfig(sizes, extra=_pick(rng, (1, 8, 64, 2040)))
    if what == 5:
        return ShmemConfig(sizes, flags=_pick(rng, (0x1, 0x4, 0xD, 0x5 | 0x10, 0x6)))
    if what == 6:
        return ShmemConfig({})
    many = {i: 2 * M for i in rng.sample(range(MAX_SHMEM_REGIONS), rng.randrange(2, 6))}
    return ShmemConfig(many)


def gen_offer(rng: random.Random) -> Offer:
    bit: int | None = 22
    roll = rng.random()
    if roll < 0.04:
        bit = None
    elif roll < 0.08:
        bit = _pick(rng, (20, 21))
    extra = 0
    if rng.random() < 0.2:
        extra = int(_pick(rng, EXTRA_FEATURES))
    withhold = 0
    if rng.random() < 0.1:
        withhold = int(_pick(rng, WITHHOLD_FEATURES))
    return Offer(bit, extra, withhold)


def gen_replies(rng: random.Random) -> tuple[ReplyMutation, ...]:
    out: list[ReplyMutation] = []
    for _ in range(rng.choice((1, 1, 2))):
        request = _pick(rng, MUTABLE_REQUESTS)
        if any(m.request == request for m in out):
            continue  # one mutation per reply: the back-end bends each reply one way
        kind = _pick(rng, GENERATED_KINDS)
        value = 0
        if kind is ReplyKind.FLAGS:
            value = _pick(rng, (0x0, 0x1, 0x2, 0x4, 0xD, 0x15, 0x5 | 0x80000000))
        elif kind is ReplyKind.SIZE:
            value = _pick(rng, (-8, -4, -1, 1, 8, 64))
        elif kind in (ReplyKind.VALUE, ReplyKind.ACK):
            value = _pick(rng, INTERESTING_U64)
        elif kind is ReplyKind.BYTES:
            value = rng.randrange(1, 256)
        elif kind is ReplyKind.REQUEST:
            value = _pick(rng, (0, 1, 44, 99))
        elif kind is ReplyKind.FDS:
            value = rng.randrange(1, 4)
        elif kind is ReplyKind.DELAY:
            value = rng.randrange(50, 400)
        out.append(ReplyMutation(int(request), kind.value, value, 1))
    return tuple(out)


def _offsets(rng: random.Random, region: int) -> tuple[int, int]:
    """A (shm_offset, length) pair: mostly valid and aligned in a region of ``region``."""
    roll = rng.random()
    if roll < 0.7 and region >= PAGE_SIZE:
        pages = region // PAGE_SIZE
        length = PAGE_SIZE * rng.randrange(1, min(pages, 512) + 1)
        offset = PAGE_SIZE * rng.randrange(0, pages - length // PAGE_SIZE + 1)
        return offset, length
    if roll < 0.85:
        offsets = (0, 1, PAGE_SIZE - 1, region, region - PAGE_SIZE, U64_MAX - PAGE_SIZE + 1)
        lengths = (0, 1, PAGE_SIZE, region, region + PAGE_SIZE, 2 * region, U64_MAX)
        offset = _pick(rng, offsets)  # the offset first, the length second: as always drawn
        return offset, _pick(rng, lengths)
    return rng.randrange(0, 1 << 64), rng.randrange(0, 1 << 64)


def gen_action(rng: random.Random, state: State, config: ShmemConfig) -> Action:
    shmem = rng.random() < 0.8
    request = (
        _pick(rng, (BackendRequest.SHMEM_MAP,) * 3 + (BackendRequest.SHMEM_UNMAP,) * 2)
        if shmem
        else _pick(rng, CHANNEL_REQUESTS)
    )
    regions = {k: v for k, v in config.sizes.items() if v} or {0: 2 * M}
    flags = 0x9 if rng.random() < 0.85 else _pick(rng, (0x1, 0x5, 0xD, 0x0, 0x2, 0x9 | 0x100))
    size_delta = 0 if rng.random() < 0.9 else _pick(rng, (-40, -8, -1, 1, 8, 100))
    if request in (BackendRequest.SHMEM_MAP, BackendRequest.SHMEM_UNMAP):
        shmid = (
            _pick(rng, tuple(regions)) if rng.random() < 0.85 else rng.randrange(MAX_SHMEM_REGIONS)
        )
        region = regions.get(shmid, 2 * M)
        shm_offset, length = _offsets(rng, region)
        mapping = request == BackendRequest.SHMEM_MAP
        fd_offset = 0
        if rng.random() < 0.15:
            fd_offset = _pick(rng, (PAGE_SIZE, 1, 2 * M, U64_MAX - PAGE_SIZE + 1))
        shm_offset, length, fd_offset = _misalign(rng, shm_offset, length, fd_offset)
        mflags = (1 if rng.random() < 0.8 else 0) if mapping else 0
        if rng.random() < 0.08:
            mflags = _pick(rng, (2, 0xF0, 0x3, 1 << 63))
        fields = {
            "shmid": shmid,
            "fd_offset": fd_offset,
            "shm_offset": shm_offset,
            "length": length,
            "flags": mflags,
        }
        if rng.random() < 0.03:
            fields["pad"] = 1
        fds: tuple[str, ...] = (gen_fd(rng, fd_offset, length),) if mapping else ()
        if rng.random() < 0.06:
            fds = _pick(rng, ((), (gen_fd(rng, 0, PAGE_SIZE),)))
        if rng.random() < 0.04:
            fds = tuple(gen_fd(rng, fd_offset, length) for _ in range(rng.randrange(2, 5)))
        after = gen_after(rng, fd_offset, length) if mapping and rng.random() < 0.45 else ()
        return Action(
            state.value, int(request), BodyKind.MMAP.value, fields, "", size_delta, flags, fds,
            False, after,
        )  # fmt: skip
    body, fields, raw, fds = _other_body(rng, int(request))
    return Action(state.value, int(request), body, fields, raw, size_delta, flags, fds)


def _other_body(
    rng: random.Random, request: int
) -> tuple[str, dict[str, int], str, tuple[str, ...]]:
    if request == BackendRequest.VRING_HOST_NOTIFIER_MSG:
        fields = {
            "u64": _pick(rng, (0, 1, 0x100, 0xFF, U64_MAX)),
            "size": _pick(rng, (0, PAGE_SIZE, 2 * PAGE_SIZE, U64_MAX)),
            "offset": _pick(rng, (0, PAGE_SIZE, U64_MAX - PAGE_SIZE + 1)),
        }
        # The host notifier is mapped from the fd at offset, size bytes: the fd's kind and
        # size against them, as for SHMEM_MAP.
        area = fields["size"] if fields["size"] < 1 << 30 else PAGE_SIZE
        fds = () if fields["u64"] & 0x100 else (gen_fd(rng, fields["offset"], area),)
        return BodyKind.AREA.value, fields, "", fds
    if request == BackendRequest.IOTLB_MSG:
        fields = {
            "iova": _pick(rng, INTERESTING_U64),
            "size": _pick(rng, (0, PAGE_SIZE, U64_MAX)),
            "uaddr": _pick(rng, INTERESTING_U64),
            "perm": rng.randrange(0, 5),
            "type": rng.randrange(0, 6),
        }
        return BodyKind.IOTLB.value, fields, "", ()
    if request in (
        BackendRequest.SHARED_OBJECT_ADD,
        BackendRequest.SHARED_OBJECT_REMOVE,
        BackendRequest.SHARED_OBJECT_LOOKUP,
    ):
        raw = bytes(rng.randrange(256) for _ in range(16)).hex()
        fds = (gen_fd(rng, 0, PAGE_SIZE),) if rng.random() < 0.3 else ()
        return BodyKind.UUID.value, {}, raw, fds
    if request in (BackendRequest.VRING_CALL, BackendRequest.VRING_ERR):
        return BodyKind.U64.value, {"value": _pick(rng, INTERESTING_U64)}, "", ()
    if request == BackendRequest.CONFIG_CHANGE_MSG:
        return BodyKind.EMPTY.value, {}, "", ()
    raw = bytes(rng.randrange(256) for _ in range(rng.choice((0, 8, 40)))).hex()
    return BodyKind.RAW.value, {}, raw, ()


# -- the fds and what the back-end does to their files ---------------------------------------

# Mostly the memfd a back-end maps; every other kind often enough to meet every state.
FD_WEIGHTS: dict[FdKind, int] = {
    FdKind.MEMFD: 46,
    FdKind.FILE: 10,
    FdKind.SEALED: 5,
    FdKind.ROFD: 6,
    FdKind.ROFILE: 5,
    FdKind.DIR: 3,
    FdKind.OPATH: 3,
    FdKind.PIPE: 4,
    FdKind.SOCKET: 4,
    FdKind.EVENTFD: 3,
    FdKind.CHARDEV: 3,
}
SIZE_WEIGHTS: dict[SizeClass, int] = {
    SizeClass.EQUAL: 60,
    SizeClass.LONGER: 14,
    SizeClass.SHORTER: 10,
    SizeClass.EMPTY: 6,
    SizeClass.ODD: 10,
}
MAX_FD_SIZE = 16 * M
"""Files are at most this large (a huge range is backed by 1 MiB): the oracle reads them."""


def gen_fd(rng: random.Random, fd_offset: int, length: int) -> str:
    """An fd for a request asking for ``length`` bytes at ``fd_offset``: its kind, and
    (for a file) its size against that range."""
    kind = rng.choices(list(FD_WEIGHTS), list(FD_WEIGHTS.values()))[0]
    if kind not in FILE_KINDS:
        return FdSpec(kind).format()
    return FdSpec(kind, _fd_size(rng, fd_offset, length)).format()


def _fd_size(rng: random.Random, fd_offset: int, length: int) -> int:
    end = fd_offset + length
    if end > MAX_FD_SIZE or end == 0:
        end = max(M, PAGE_SIZE)
    sized = rng.choices(list(SIZE_WEIGHTS), list(SIZE_WEIGHTS.values()))[0]
    if sized is SizeClass.EMPTY:
        return 0
    if sized is SizeClass.SHORTER:
        return max(PAGE_SIZE, end - PAGE_SIZE * rng.randrange(1, max(2, end // PAGE_SIZE)))
    if sized is SizeClass.LONGER:
        return min(MAX_FD_SIZE, end + PAGE_SIZE * _pick(rng, (1, 16, 256)))
    if sized is SizeClass.ODD:
        return max(1, end + _pick(rng, (1, 100, PAGE_SIZE - 1, -100, -1)))
    return end


def _misalign(
    rng: random.Random, shm_offset: int, length: int, fd_offset: int
) -> tuple[int, int, int]:
    """Now and then one of the three off a page boundary (the others left as drawn), so
    that one refused field cannot hide another QEMU takes."""
    if rng.random() >= 0.1:
        return shm_offset, length, fd_offset
    by = _pick(rng, (1, 8, 0x800, PAGE_SIZE - 1))
    which = rng.randrange(3)
    if which == 0:
        return (shm_offset + by) & U64_MAX, length, fd_offset
    if which == 1:
        return shm_offset, max(1, length - by) if length > by else length + by, fd_offset
    return shm_offset, length, (fd_offset + by) & U64_MAX


def gen_after(rng: random.Random, fd_offset: int, length: int) -> tuple[str, ...]:
    """What the back-end does to its file while the mapping is live, and what the guest
    does through it: often a change of the file followed by a guest access."""
    length = min(length, MAX_FD_SIZE) if length else PAGE_SIZE
    inside = (0, max(0, length - 8) & ~7, (length // 2) & ~7)
    end = fd_offset + length if fd_offset < MAX_FD_SIZE else length

    def host() -> Op:
        op = rng.choices(HOST_OPS, HOST_WEIGHTS)[0]
        if op is FileOp.TRUNCATE:
            at = min(fd_offset, MAX_FD_SIZE)  # a huge fd_offset: not a size to truncate to
            return Op(op, (_pick(rng, (0, at, (end // 2) & ~(PAGE_SIZE - 1))),))
        if op is FileOp.EXTEND:
            return Op(op, (min(MAX_FD_SIZE, end + _pick(rng, (PAGE_SIZE, length))),))
        if op is FileOp.PUNCH:
            return Op(op, (fd_offset if fd_offset < MAX_FD_SIZE else 0, PAGE_SIZE))
        if op is FileOp.WRITE:
            return Op(op, ((fd_offset if fd_offset < MAX_FD_SIZE else 0) + _pick(rng, inside),))
        return Op(op)

    def guest() -> Op:
        return Op(_pick(rng, (FileOp.READ, FileOp.READ, FileOp.GUEST_WRITE)), (_pick(rng, inside),))

    if rng.random() < 0.5:
        ops = [host(), guest()]
    else:
        ops = [host() if rng.random() < 0.5 else guest() for _ in range(rng.randrange(1, 4))]
    return tuple(op.format() for op in ops)


HOST_OPS = (FileOp.TRUNCATE, FileOp.EXTEND, FileOp.PUNCH, FileOp.WRITE, FileOp.CLOSE, FileOp.SEAL)
HOST_WEIGHTS = (4, 2, 2, 2, 1, 1)
