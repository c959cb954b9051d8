"""The spec's rules for SHMEM_MAP / SHMEM_UNMAP as an oracle (pure): given the config QEMU
took and the mappings it accepted so far, why a request must be refused. The range rules
(shmid, length, range, fd range, overlap) are testbed.vhost_user.rules' (the relay judges
with the same function); the payload size, unknown flag bits and the kind of fd are the
fuzzer's own judgements on top.

The words of a reason name the registry's known bugs where one fits ("SHMEM_MAP ignores
unknown flag bits", "SHMEM_MAP with a N-byte payload is mapped"): triage matches on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from testbed import limits
from testbed.fuzz.grammar import Action, BodyKind, ShmemConfig
from testbed.vhost_user.protocol import BackendRequest, Header, MMap
from testbed.vhost_user.rules import MapRule, shmem_map_fds, shmem_map_problems

MMAP_SIZE = MMap.FORMAT.size
_WHERE_RULES = (MapRule.SHMID, MapRule.LENGTH, MapRule.RANGE)


def _accepted(name: str, shmid: int, rule: MapRule) -> str:
    """A broken range rule, as what QEMU accepted (the words the registry's bugs and the
    fuzzer's signatures use)."""
    words = {
        MapRule.SHMID: f"{name} of shmid {shmid}, not in the config, accepted",
        MapRule.LENGTH: f"{name} of length 0 accepted",
        MapRule.RANGE: f"{name} past the end of region {shmid} accepted",
        MapRule.FD_RANGE: "SHMEM_MAP whose fd_offset + length overflows accepted",
        MapRule.OVERLAP: "SHMEM_MAP overlapping a live mapping accepted",
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

    def problems(self, action: Action, header: Header, body: bytes) -> list[str]:
        """Why QEMU must refuse this SHMEM_MAP/UNMAP; [] = nothing the spec forbids."""
        if action.body != BodyKind.MMAP:
            return []
        name = action.name
        if not self.negotiated:
            return [f"{name} accepted without SHMEM negotiated"] if self.trusted else []
        if not self.sound:
            return []
        mapping = action.request == BackendRequest.SHMEM_MAP
        f = action.fields
        out: list[str] = []
        if header.size != MMAP_SIZE:
            out.append(f"{name} with a {header.size}-byte payload is mapped")
        flags = f.get("flags", 0)
        if mapping and flags & ~1:
            out.append(f"SHMEM_MAP ignores unknown flag bits (0x{flags:x})")
        # The spec's range rules (shared with the relay), worded as what QEMU accepted;
        # the fds (count, then kind: the fuzzer's own judgement) after the range.
        mapped = None if self.uncertain else self.mapped
        shmid = f.get("shmid", 0)
        found = shmem_map_problems(
            action.request,
            shmid,
            f.get("shm_offset", 0),
            f.get("length", 0),
            f.get("fd_offset", 0),
            self.regions,
            mapped,
        )
        where = [p for p in found if p.rule in _WHERE_RULES]
        out += [_accepted(name, shmid, p.rule) for p in where]
        if any(p.rule is MapRule.SHMID for p in where):
            return out
        fds = action.fds
        if len(fds) != shmem_map_fds(action.request):
            out.append(f"{name} with {len(fds)} fds accepted")
        elif mapping and fds[0] in ("socket", "pipe"):
            out.append(f"SHMEM_MAP of a {fds[0]} fd accepted")
        out += [_accepted(name, shmid, p.rule) for p in found if p not in where]
        return out

    def judgeable(self, action: Action) -> bool:
        """A well-formed, page-aligned MAP of a big enough memfd into free space, or an
        UNMAP of exactly a live mapping: QEMU must take it."""
        if not (self.sound and self.negotiated and self.trusted and self.started):
            return False
        if self.uncertain or action.flags != 0x9:
            return False
        f = action.fields
        offset, length = f.get("shm_offset", 0), f.get("length", 0)
        if any(v % limits.PAGE_SIZE for v in (offset, length, f.get("fd_offset", 0))):
            return False
        if action.request == BackendRequest.SHMEM_UNMAP:
            return (offset, length) in self.mapped.get(f.get("shmid", -1), [])
        kind = action.fds[0] if len(action.fds) == 1 else ""
        if not kind.startswith("memfd:"):
            return False
        return f.get("fd_offset", 0) + length <= int(kind.partition(":")[2])

    def apply(self, action: Action) -> None:
        """QEMU accepted ``action``: track the mapping it made or dropped."""
        f = action.fields
        shmid = f.get("shmid", 0)
        span = (f.get("shm_offset", 0), f.get("length", 0))
        if action.request == BackendRequest.SHMEM_MAP:
            self.mapped.setdefault(shmid, []).append(span)
        elif span in self.mapped.get(shmid, []):
            self.mapped[shmid].remove(span)
