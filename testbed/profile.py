"""Where a scenario's time goes: phases timed where they happen, summed per scenario.

The drivers mark their phases (``with phase("qemu start"): ...``); while a scenario runs,
the pytest plugin holds a ``Profile`` that collects them (``recording``), and outside one
the marks cost nothing. Phases nest (a plug holds guest commands and waits): each phase is
charged its *own* time, what its nested phases did not take, so the phases of a scenario
add up to the time spent in them, never more. ``count`` is how often a phase ran (guest
commands: the round trips). The report (``summarize``) is pure: totals by phase over a
run, and the slowest scenarios with their phases.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# One scenario runs at a time in a pytest process (xdist workers are processes), and only
# its own thread marks phases (the back-ends' threads do not): a plain global, guarded
# against other threads by its owner.
PROFILE_FILE = "profile.json"
"""Where a scenario run writes its profile, in its results dir."""

_active: Profile | None = None
_owner: int | None = None


@dataclass
class Profile:
    """One scenario's phases: own seconds and count by name."""

    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    counts: Counter[str] = field(default_factory=Counter)
    _stack: list[float] = field(default_factory=list)
    """Per open phase: the time its nested phases took so far."""

    def to_json(self) -> dict[str, Any]:
        return {
            name: {"seconds": round(self.seconds[name], 3), "count": self.counts[name]}
            for name in sorted(self.seconds)
        }


@contextlib.contextmanager
def recording(profile: Profile) -> Iterator[Profile]:
    """Collect the phases marked by this thread into ``profile`` while the block runs."""
    global _active, _owner
    previous = (_active, _owner)
    _active, _owner = profile, threading.get_ident()
    try:
        yield profile
    finally:
        _active, _owner = previous


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as phase ``name`` of the scenario being recorded (if any)."""
    profile = _active
    if profile is None or _owner != threading.get_ident():
        yield
        return
    profile._stack.append(0.0)
    started = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - started
        nested = profile._stack.pop()
        profile.seconds[name] += elapsed - nested
        profile.counts[name] += 1
        if profile._stack:
            profile._stack[-1] += elapsed


# -- the report (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioProfile:
    nodeid: str
    seconds: float
    """The scenario's wall time (setup, call and teardown)."""
    phases: Mapping[str, Mapping[str, float]]
    """name -> {"seconds": own seconds, "count": n}."""

    @property
    def unmarked(self) -> float:
        """What no phase holds: the scenario's own Python, pytest, fixtures."""
        return max(0.0, self.seconds - sum(p["seconds"] for p in self.phases.values()))


BOOTED, RESTORED, NEITHER = "booted", "restored", "shared boot or no guest"


def start_kind(scenario: ScenarioProfile) -> str:
    """How the scenario got its guest: it booted one, restored one from a snapshot, or
    neither (a layout in a boot another test paid for, or QEMU refused to start)."""
    if "boot (to the ready line)" in scenario.phases:
        return BOOTED
    return RESTORED if "restore" in scenario.phases else NEITHER


def by_start(runs: Iterable[ScenarioProfile]) -> dict[str, dict[str, float]]:
    """Per start kind: runs, summed seconds and the median scenario's seconds."""
    kinds: defaultdict[str, list[float]] = defaultdict(list)
    for s in runs:
        kinds[start_kind(s)].append(s.seconds)
    return {
        kind: {
            "runs": len(kinds[kind]),
            "seconds": round(sum(kinds[kind]), 2),
            "median": round(statistics.median(kinds[kind]), 3),
        }
        for kind in (BOOTED, RESTORED, NEITHER)
        if kinds[kind]
    }


def summarize(scenarios: Iterable[ScenarioProfile], slowest: int = 10) -> dict[str, Any]:
    """Totals by phase over every scenario (own seconds, count, share of the whole) and the
    ``slowest`` scenarios with their five biggest phases."""
    runs = list(scenarios)
    total = sum(s.seconds for s in runs)
    seconds: defaultdict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()
    for s in runs:
        for name, value in s.phases.items():
            seconds[name] += value["seconds"]
            counts[name] += int(value["count"])
        seconds["(unmarked)"] += s.unmarked
    by_phase = [
        {
            "phase": name,
            "seconds": round(value, 2),
            "count": counts[name],
            "share": round(value / total, 3) if total else 0.0,
        }
        for name, value in sorted(seconds.items(), key=lambda kv: kv[1], reverse=True)
    ]
    top = sorted(runs, key=lambda s: s.seconds, reverse=True)[:slowest]
    return {
        "scenarios": len(runs),
        "seconds": round(total, 2),
        "by_start": by_start(runs),
        "by_phase": by_phase,
        "slowest": [
            {
                "nodeid": s.nodeid,
                "seconds": round(s.seconds, 2),
                "phases": {
                    name: round(value["seconds"], 2)
                    for name, value in sorted(
                        s.phases.items(), key=lambda kv: kv[1]["seconds"], reverse=True
                    )[:5]
                },
            }
            for s in top
        ],
    }


def render(summary: Mapping[str, Any]) -> list[str]:
    """The summary as text lines (the end of `make e2e`, `make bench`)."""
    width = max([len("phase"), *(len(row["phase"]) for row in summary["by_phase"])])
    lines = [
        f"scenario time: {summary['seconds']:.1f} s over {summary['scenarios']} scenario runs",
        "; ".join(
            f"{kind} {row['runs']} ({row['seconds']:.1f} s, median {row['median']:.2f} s)"
            for kind, row in summary.get("by_start", {}).items()
        ),
        f"{'phase':<{width}} {'seconds':>8} {'share':>6} {'count':>6}",
    ]
    for row in summary["by_phase"]:
        lines.append(
            f"{row['phase']:<{width}} {row['seconds']:>8.1f} {row['share'] * 100:>5.1f}% "
            f"{row['count']:>6}"
        )
    lines.append("slowest scenarios:")
    for row in summary["slowest"]:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in row["phases"].items())
        lines.append(f"  {row['seconds']:6.1f} s  {row['nodeid']}  ({phases})")
    return lines
