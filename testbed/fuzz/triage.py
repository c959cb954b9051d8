"""From a played case to findings: a signature each (what crashed where, what hung, what
leaked, what an oracle saw), matched against the known-bug registry; the minimiser (delta
debugging over the case's messages, then shrinking its fields); the draft registry entry
for a new signature. Pure, apart from the replay callable the minimiser is given.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from testbed.bugs import Bug, registry
from testbed.bugs.signature import (
    RUNNING,
    SILENT_EXITS,
    Evidence,
    assertion,
    crash_site,
    exit_of,
    exited_line,
)
from testbed.fuzz.grammar import Action, Case, Offer, ShmemConfig
from testbed.fuzz.result import PlayResult
from testbed.limits import PAGE_SIZE
from testbed.waiting import Deadline

T = TypeVar("T")

_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d+")
OBSERVED = ("silent", "leak", "hang")
"""Finding kinds an oracle of ours saw (QEMU said nothing): they name the bug they show."""


@dataclass(frozen=True)
class Finding:
    kind: str
    """"crash", "exit" (QEMU quit by itself after realize), "hang", "leak", "silent"."""
    signature: str
    where: str
    """"<REQUEST>@<state>", "realize:<REQUEST>", "enter:<state>", ..."""
    text: str
    """The evidence text (stderr, the oracle's words)."""
    exit: str = RUNNING
    known: str | None = None
    """The registry id this matches, if any."""
    spec: str = ""
    """The spec's words the oracle that saw it rests on (observations only)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _request_of(where: str) -> str:
    return where.split("@")[0].split(":")[-1]


def findings(result: PlayResult) -> list[Finding]:
    out: list[Finding] = []
    code = result.returncode
    where = result.died_in
    if code is not None and code < 0:
        exit_kind = exit_of(code)
        site = crash_site(result.stderr, result.segfault)
        if not site:
            site = f"in {_request_of(where)}"
        sig = f"{exit_kind} {site}"
        if exit_kind in SILENT_EXITS and "@" in where:
            sig += f" ({_request_of(where)})"
        # The evidence is the crash site (not the whole stderr, whose earlier lines can
        # name another bug's message): a registry entry matches on what killed QEMU.
        text = f"{site}\n{exited_line(exit_kind)} at {where}"
        out.append(Finding("crash", sig, where, text, exit_kind))
    elif code is not None and code != 0 and not where.startswith("realize"):
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else "(nothing on stderr)"
        last = re.sub(r"^\S*qemu-system-\w+: ", "", last)
        sig = f"status:{code} {_NUMBER.sub('N', last)[:120]} at {_phase(where)}"
        out.append(Finding("exit", sig, where, f"{result.stderr}\nQEMU exited", exit_of(code)))
    if result.hung:
        sig = f"hang at {_phase(result.hung.split('(')[-1].rstrip(')'))}"
        out.append(Finding("hang", sig, result.hung, result.hung, RUNNING))
    for obs in result.observations:
        kind = "leak" if obs.kind == "leak" else "silent"
        sig = f"{obs.kind}: {_NUMBER.sub('N', obs.text)}"
        out.append(
            Finding(kind, sig, f"{obs.request}@{obs.state}", obs.text, RUNNING, spec=obs.spec)
        )
    return [dataclasses.replace(f, known=known_bug(f)) for f in out]


def _phase(where: str) -> str:
    """A place without the case-specific part (the state stays: it is the coverage)."""
    return where


def evidence(found: Sequence[Finding], bug: Bug) -> Evidence:
    """What Bug.matches looks at for ``bug`` in a case's findings: their signatures and
    texts, the first exit that is not "running", the bug named when an oracle of ours saw
    one of them (an ``observable`` bug is never shown by QEMU's own words), and the place
    of a single finding (for the registry's ``fuzz_where``)."""
    exits = [f.exit for f in found if f.exit != RUNNING]
    observed = bool(bug.observable) and any(f.kind in OBSERVED for f in found)
    return Evidence.gather(
        [f"{f.signature}\n{f.text}" for f in found] or ["(no finding)"],
        exits[0] if exits else RUNNING,
        names=bug.id if observed else None,
        where=found[0].where if len(found) == 1 else None,
    )


def known_bug(finding: Finding, bugs: Sequence[Bug] | None = None) -> str | None:
    """The registry entry whose signature this is, if any (in registry order). A crash
    matches only an entry with its exit: an "any exit" entry is a refusal or a silent bug."""
    for bug in bugs if bugs is not None else registry().values():
        if not bug.matches(evidence([finding], bug)):
            continue
        if finding.kind == "crash" and bug.exit != finding.exit:
            continue
        return bug.id
    return None


# -- minimising ----------------------------------------------------------------------------


Replay = Callable[[Case], set[str]]
"""Plays a case and returns the signatures it shows."""


def ddmin(items: Sequence[T], still: Callable[[list[T]], bool], budget: list[int]) -> list[T]:
    """Zeller's delta debugging: a 1-minimal sub-list that keeps ``still`` true (or as far
    as ``budget[0]`` tries go)."""
    current = list(items)
    n = 2
    while len(current) >= 2 and budget[0] > 0:
        chunk = max(1, len(current) // n)
        subsets = [current[i : i + chunk] for i in range(0, len(current), chunk)]
        reduced = False
        for i in range(len(subsets)):
            if budget[0] <= 0:
                break
            complement = [x for j, s in enumerate(subsets) if j != i for x in s]
            budget[0] -= 1
            if still(complement):
                current, n, reduced = complement, max(n - 1, 2), True
                break
        if not reduced:
            if n >= len(current):
                break
            n = min(len(current), n * 2)
    if len(current) == 1 and budget[0] > 0:
        budget[0] -= 1
        if still([]):
            return []
    return current


def _simpler_actions(action: Action) -> list[Action]:
    out = []
    if action.touch:
        out.append(dataclasses.replace(action, touch=False))
    if action.size_delta:
        out.append(dataclasses.replace(action, size_delta=0))
    if action.flags != 0x9:
        out.append(dataclasses.replace(action, flags=0x9))
    for key, value in action.fields.items():
        for simple in (0, PAGE_SIZE):
            if value != simple and (key != "length" or simple):
                out.append(dataclasses.replace(action, fields={**action.fields, key: simple}))
                break
    return out


def minimise(
    case: Case, signature: str, replay: Replay, *, tries: int = 30, seconds: float = 60.0
) -> tuple[Case, int]:
    """The smallest case found that still shows ``signature``, and the replays it took."""
    time_left = Deadline(seconds)
    budget = [tries]
    used = [0]

    def shows(candidate: Case) -> bool:
        if time_left.expired:
            budget[0] = 0
            return False
        used[0] += 1
        return signature in replay(candidate)

    best = case
    actions = ddmin(
        best.actions,
        lambda a: shows(dataclasses.replace(best, actions=tuple(a))),
        budget,
    )
    best = dataclasses.replace(best, actions=tuple(actions))
    if best.replies and budget[0] > 0:
        replies = ddmin(
            best.replies, lambda r: shows(dataclasses.replace(best, replies=tuple(r))), budget
        )
        best = dataclasses.replace(best, replies=tuple(replies))
    simpler: list[Case] = []
    if best.offer != Offer():
        simpler.append(dataclasses.replace(best, offer=Offer()))
    if best.config != ShmemConfig(best.config.sizes):
        simpler.append(dataclasses.replace(best, config=ShmemConfig(best.config.sizes)))
    for candidate in simpler:
        if budget[0] <= 0:
            break
        budget[0] -= 1
        if shows(candidate):
            best = candidate
    for i in range(len(best.actions)):
        for smaller in _simpler_actions(best.actions[i]):
            if budget[0] <= 0:
                break
            actions_list = list(best.actions)
            actions_list[i] = smaller
            candidate = dataclasses.replace(best, actions=tuple(actions_list))
            budget[0] -= 1
            if shows(candidate):
                best = candidate
    # The shortest path that still shows it (e.g. before-driver-ok instead of later).
    return best, used[0]


# -- the draft registry entry ----------------------------------------------------------------


def slug(signature: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", signature.lower()).strip("-")
    return words[:60].rstrip("-") or "finding"


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def describe(case: Case) -> str:
    """The case in words, for a report."""
    parts = [f"the front-end's life up to {case.last_state}"]
    if case.offer != Offer():
        parts.append(f"offer {case.offer}")
    if case.config != ShmemConfig(case.config.sizes):
        parts.append(f"GET_SHMEM_CONFIG reply {case.config}")
    else:
        parts.append(f"regions {case.config.sizes}")
    for m in case.replies:
        parts.append(f"reply to request {m.request} bent: {m.kind}={m.value}")
    for a in case.actions:
        parts.append(
            f"{a.name} in {a.state}: flags 0x{a.flags:x}, {a.body} {a.fields}"
            f"{' raw ' + a.raw if a.raw else ''}, size_delta {a.size_delta}, fds {list(a.fds)}"
            f"{', then ' + ', '.join(a.after) if a.after else ''}"
        )
    return "; ".join(parts)


def draft_entry(finding: Finding, case: Case, version: str, corpus_name: str) -> str:
    """A [[bug]] entry in registry.toml's format, for the lead to review and register."""
    function = "?"
    stderr = ""
    observable = ""
    found = assertion(finding.text)
    if found:
        function = found[1]
        stderr = re.escape(found[0]).replace("\\ ", " ")
    elif finding.kind in ("crash", "exit"):
        stderr = "QEMU exited"
    else:
        observable = re.escape(re.sub(r"\(.*", "", finding.text).strip()).replace("\\ ", " ")
    title = f"fuzz: {finding.signature}"
    spec = f' The spec: "{finding.spec}"' if finding.spec else ""
    lines = [
        "[[bug]]",
        f"id = {_toml_str(slug(finding.signature))}",
        f"title = {_toml_str(title[:150])}",
        'component = "hw/virtio/vhost-user.c (to confirm)"',
        f"function = {_toml_str(function)}",
    ]
    if stderr:
        lines.append(f"stderr = {_toml_str(stderr)}")
    if observable:
        lines.append(f"observable = {_toml_str(observable)}")
    lines += [
        f"exit = {_toml_str(finding.exit if finding.exit != RUNNING else 'any')}",
        f"versions = [{_toml_str(version)}]",
        f"arches = [{_toml_str(case.arch)}]",
        "needs_guest = false",
        f"scenarios = [{_toml_str(f'tests/test_fuzz_corpus.py::test_corpus_case[{corpus_name}]')}]",
        'root_cause = """Not analysed yet (found by testbed fuzz)."""',
        'source = ["hw/virtio/vhost-user.c"]',
        f'report = """Found by `testbed fuzz` (seed {case.seed}, case {case.index}), '
        f"minimised: {describe(case)}. QEMU 11.1.3 shows: {finding.signature} "
        f"(at {finding.where}).{spec}" + '"""',
    ]
    return "\n".join(lines) + "\n"
