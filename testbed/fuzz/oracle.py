"""The spec's rules for SHMEM_MAP / SHMEM_UNMAP as oracles (pure): given the config QEMU
took and the mappings it accepted so far, why a request must be refused, or why QEMU must
take it; and what QEMU may do to the back-end's file. The range rules (shmid, length,
range, fd range, alignment, overlap, a whole mapping) are testbed.vhost_user.rules' (the
relay judges with the same function); the payload size, unknown flag bits and the kind of
fd against the flags are the fuzzer's own judgements on top. Every judgement carries the
spec's words it rests on (``Judged.spec``, from rules.SPEC): findings and reports quote
them; signatures are made of ``text`` alone.

The words of a reason name the registry's known bugs where one fits ("SHMEM_MAP ignores
unknown flag bits", "SHMEM_MAP with a N-byte payload is mapped"): triage matches on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from testbed import limits
from testbed.device import DEVICE_TYPE
from testbed.fuzz.fdspec import FdKind, FdSpec, SizeClass, size_class
from testbed.fuzz.grammar import Action, BodyKind, ShmemConfig
from testbed.vhost_user.protocol import BackendRequest, Header, MMap
from testbed.vhost_user.rules import (
    SPEC,
    MapRule,
    shmem_map_fds,
    shmem_map_problems,
    unaligned_field,
)

MMAP_SIZE = MMap.FORMAT.size
_WHERE_RULES = (MapRule.SHMID, MapRule.LENGTH, MapRule.RANGE)


@dataclass(frozen=True)
class Judged:
    """One oracle's judgement: what it saw (the signature's words) and the spec's words."""

    text: str
    spec: str = ""


def _accepted(
    name: str, shmid: int, rule: MapRule, shm_offset: int, length: int, fd_offset: int
) -> str:
    """A broken range rule, as what QEMU accepted (the words the registry's bugs and the
    fuzzer's signatures use)."""
    words = {
        MapRule.SHMID: f"{name} of shmid {shmid}, not in the config, accepted",
        MapRule.LENGTH: f"{name} of length 0 accepted",
        MapRule.RANGE: f"{name} past the end of region {shmid} accepted",
        MapRule.FD_RANGE: "SHMEM_MAP whose fd_offset + length overflows accepted",
        MapRule.ALIGN: f"SHMEM_MAP with {unaligned_field(shm_offset, length, fd_offset)} not "
        "a page multiple accepted",
        MapRule.OVERLAP: "SHMEM_MAP overlapping a live mapping accepted",
        MapRule.WHOLE: "SHMEM_UNMAP of a range that is not a whole live mapping accepted",
    }
    return words[rule]


@dataclass
class MapModel:
    config: ShmemConfig
    behind_root_port: bool = False
    started: bool = False
    mapped: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    negotiated: bool = True
    """SHMEM was offered at bit 22 and the replies that negotiate it were not bent."""
    trusted: bool = True
    """False when a realize reply was bent: what QEMU took is not known."""
    uncertain: bool = False
    """A request went without NEED_REPLY: what is mapped is no longer known."""
    device: str = DEVICE_TYPE
    """The QEMU device (does the guest see the regions: testbed.device.base_device)."""

    @property
    def regions(self) -> dict[int, int]:
        return {k: v for k, v in self.config.sizes.items() if v}

    @property
    def sound(self) -> bool:
        """The config is one QEMU should have taken: only then are verdicts judged."""
        return not self.config.problems(self.behind_root_port)

    def reset(self) -> None:
        """A device reset drops every mapping (the spec: without telling the back-end)."""
        self.mapped.clear()
        self.started = False
        self.uncertain = False

    def offset_of(self, action: Action) -> int | None:
        """Where the action's region sits in BAR 4."""
        shmid = action.fields.get("shmid", -1)
        for packed in limits.pack(self.regions):
            if packed.shmid == shmid:
                return packed.offset
        return None

    def guest_address(self, action: Action, offset: int, width: int = 8) -> int | None:
        """The BAR 4 offset of ``offset`` bytes into the action's range, when ``width``
        bytes there lie inside its region (None: outside, or no such region)."""
        base = self.offset_of(action)
        shm_offset = action.fields.get("shm_offset", 0)
        region = self.regions.get(action.fields.get("shmid", -1), 0)
        if base is None or shm_offset + offset + width > region:
            return None
        return base + shm_offset + offset

    def problems(self, action: Action, header: Header, body: bytes) -> list[Judged]:
        """Why QEMU must refuse this SHMEM_MAP/UNMAP; [] = nothing the spec forbids."""
        if action.body != BodyKind.MMAP:
            return []
        name = action.name
        if not self.negotiated:
            text = f"{name} accepted without SHMEM negotiated"
            return [Judged(text, SPEC["feature"])] if self.trusted else []
        if not self.sound:
            return []
        mapping = action.request == BackendRequest.SHMEM_MAP
        f = action.fields
        out: list[Judged] = []
        if header.size != MMAP_SIZE:
            out.append(
                Judged(f"{name} with a {header.size}-byte payload is mapped", SPEC["payload"])
            )
        flags = f.get("flags", 0)
        if mapping and flags & ~1:
            out.append(Judged(f"SHMEM_MAP ignores unknown flag bits (0x{flags:x})", SPEC["flags"]))
        # The spec's range rules (shared with the relay), worded as what QEMU accepted;
        # the fds (count, then kind against the flags: the fuzzer's own judgement) after
        # the range.
        mapped = None if self.uncertain else self.mapped
        shmid, shm_offset = f.get("shmid", 0), f.get("shm_offset", 0)
        length, fd_offset = f.get("length", 0), f.get("fd_offset", 0)
        found = shmem_map_problems(
            action.request, shmid, shm_offset, length, fd_offset, self.regions, mapped
        )

        def judged(rule: MapRule) -> Judged:
            words = _accepted(name, shmid, rule, shm_offset, length, fd_offset)
            return Judged(words, SPEC[rule])

        where = [p for p in found if p.rule in _WHERE_RULES]
        out += [judged(p.rule) for p in where]
        if any(p.rule is MapRule.SHMID for p in where):
            return out
        fds = action.fds
        if len(fds) != shmem_map_fds(action.request):
            out.append(Judged(f"{name} with {len(fds)} fds accepted", SPEC["payload"]))
        elif mapping:
            spec = FdSpec.parse(fds[0])
            writable = bool(flags & 1)
            if spec.mappable(writable) is False:
                mode = "read-write" if writable else "read-only"
                text = f"{mode} SHMEM_MAP of {spec.describe()} accepted"
                out.append(Judged(text, SPEC["map"]))
        out += [judged(p.rule) for p in found if p not in where]
        return out

    def judgeable(self, action: Action) -> bool:
        """A well-formed, page-aligned MAP of a file mmap(2) can map with its flags into
        free space (whatever the file's size: mmap maps a range past a file's end), or an
        UNMAP of exactly a live mapping: QEMU must take it."""
        if not (self.sound and self.negotiated and self.trusted and self.started):
            return False
        if self.uncertain or action.flags != 0x9 or action.size_delta:
            return False
        f = action.fields
        offset, length = f.get("shm_offset", 0), f.get("length", 0)
        if unaligned_field(offset, length, f.get("fd_offset", 0)) or f.get("pad", 0):
            return False
        if action.request == BackendRequest.SHMEM_UNMAP:
            return (offset, length) in self.mapped.get(f.get("shmid", -1), [])
        flags = f.get("flags", 0)
        if flags & ~1 or len(action.fds) != 1:
            return False
        return FdSpec.parse(action.fds[0]).mappable(bool(flags & 1)) is True

    def apply(self, action: Action) -> None:
        """QEMU accepted ``action``: track the mapping it made or dropped."""
        f = action.fields
        shmid = f.get("shmid", 0)
        span = (f.get("shm_offset", 0), f.get("length", 0))
        if action.request == BackendRequest.SHMEM_MAP:
            self.mapped.setdefault(shmid, []).append(span)
        elif span in self.mapped.get(shmid, []):
            self.mapped[shmid].remove(span)


def refusal(action: Action, verdict: int) -> Judged:
    """A request QEMU had to take, refused: in words that tell the reasons apart (the fd's
    access mode against the flags, its size against the range)."""
    name = action.name
    spec = SPEC["reply"] + " " + SPEC["map"]
    if action.request != BackendRequest.SHMEM_MAP:
        return Judged(f"valid {name} refused (u64 {verdict})", SPEC["reply"])
    f = action.fields
    fd = FdSpec.parse(action.fds[0])
    if not f.get("flags", 0) & 1 and fd.kind in (FdKind.ROFD, FdKind.ROFILE, FdKind.SEALED):
        return Judged(f"read-only SHMEM_MAP of {fd.describe()} refused (u64 {verdict})", spec)
    if fd.has_file:
        sized = size_class(fd.size, f.get("fd_offset", 0), f.get("length", 0), limits.PAGE_SIZE)
        if sized in (SizeClass.EMPTY, SizeClass.SHORTER) or (
            sized is SizeClass.ODD and fd.size < f.get("fd_offset", 0) + f.get("length", 0)
        ):
            text = f"SHMEM_MAP whose fd range runs past the file's end refused (u64 {verdict})"
            return Judged(text, spec)
    return Judged(f"valid {name} of {fd.describe()} refused (u64 {verdict})", spec)


# -- the back-end's file ---------------------------------------------------------------------


@dataclass(frozen=True)
class FileImage:
    """The back-end's file as the oracle knows it: its size and, up to MAX_IMAGE bytes,
    its contents (None: too large to compare, only the size is)."""

    size: int
    data: bytes | None

    def written(self, offset: int, data: bytes) -> FileImage:
        """The image after a write of ``data`` at ``offset`` inside the file (a guest write
        through a writable mapping: it never grows the file)."""
        if self.data is None or offset + len(data) > self.size:
            return self
        return FileImage(self.size, self.data[:offset] + data + self.data[offset + len(data) :])


MAX_IMAGE = 16 << 20


def file_change(expected: FileImage, actual: FileImage, fd: FdSpec) -> Judged | None:
    """QEMU never changes the back-end's file (its size or bytes) but by a guest write
    through a writable mapping, which ``expected`` already holds: what changed, if any."""
    spec = SPEC["map"]
    if actual.size != expected.size:
        text = f"QEMU changed the size of {fd.describe()} from {expected.size} to {actual.size}"
        return Judged(text, spec)
    if expected.data is None or actual.data is None or expected.data == actual.data:
        return None
    at = next(i for i, (a, b) in enumerate(zip(expected.data, actual.data, strict=True)) if a != b)
    return Judged(f"QEMU changed the bytes of {fd.describe()} (first at offset {at})", spec)


def guest_view_change(before: bytes, after: bytes, action: Action, verdict: int) -> Judged | None:
    """A refused request changes nothing the guest sees: what it saw at the request's
    range before, it sees after."""
    if before == after:
        return None
    text = f"{action.name} refused (u64 {verdict}) but the guest's view of its range changed"
    return Judged(text, SPEC["reply"])
