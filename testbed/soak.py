"""The soak's arithmetic (pure, no I/O): samples, least-squares slopes, the leak decisions and
a small SVG chart. scenarios/soak/ takes the samples; this decides what they say.

A soak samples QEMU's memory and both sides' fd counts every few cycles, each time at a point
where nothing is in flight (scenarios/soak waits for that), starting right after warm-up.

Memory: a single before/after pair cannot tell warm-up from a leak, a line through all the
samples can. ``judge_memory`` fits two least-squares lines, one through every sample
(``whole``) and one through the second half (``late``), in KiB per cycle; memory "keeps
growing" only when both exceed the threshold over a run long enough to decide. Warm-up that
ends during the run lifts ``whole`` but not ``late``; a one-off step (an arena that grew
once) lifts neither for long; a leak lifts both, and the longer the run the surer that is.
A run too short to decide says so and does not fail.

QEMU's anonymous memory has two parts that behave differently. Under TCG the translation
buffer (one anonymous executable mapping, 1 GiB by default, transparent huge pages) fills
with translated guest code as long as the guest runs code it has not run since the last
flush -- new processes for every SSH command, pages reused -- in 2 MiB steps, and is
flushed when full: growth bounded by its size, not a leak. Everything else (malloc arenas,
the heap, thread stacks, QEMU's own anonymous mmaps) is where a leak in QEMU's code would
show. ``parse_smaps`` splits the two, and the soak is decided on the second
(``qemu_anon_excl_tcg_kib``); VmRSS (which also counts guest RAM as the guest touches it),
RssAnon and the translation buffer are reported beside it.

Fds: there is no noise to allow for, an fd is closed or it is not. ``judge_fds``: a count
above the baseline at the end of the run is a leak (an upward step that stayed); a count
that went up and came back is reported as transient; a count below the baseline means the
baseline held something in flight, which is a measurement fault, reported as such.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from xml.sax.saxutils import escape


@dataclass(frozen=True)
class Sample:
    """The figures at one quiescent point, ``cycle`` cycles after warm-up."""

    cycle: int
    seconds: float
    qemu_fds: int
    backend_fds: int
    qemu_rss_kib: int
    """VmRSS: everything resident, guest RAM included."""
    qemu_rss_anon_kib: int
    """RssAnon: QEMU's anonymous memory, the TCG translation buffer included."""
    qemu_tcg_code_kib: int = 0
    """Resident part of the TCG translation buffer (anonymous executable mappings)."""
    qemu_anon_excl_tcg_kib: int = 0
    """Anonymous memory outside the translation buffer: heap, arenas, stacks."""


FD_METRICS = ("qemu_fds", "backend_fds")
MEMORY_METRICS = (
    "qemu_rss_kib",
    "qemu_rss_anon_kib",
    "qemu_tcg_code_kib",
    "qemu_anon_excl_tcg_kib",
)
DECISIVE = "qemu_anon_excl_tcg_kib"


@dataclass(frozen=True)
class AnonMemory:
    anon_kib: int
    """"Anonymous:" summed over every mapping."""
    exec_anon_kib: int
    """"Anonymous:" of anonymous (no path) executable mappings: TCG's translation buffer."""

    @property
    def excl_exec_kib(self) -> int:
        return self.anon_kib - self.exec_anon_kib


def parse_smaps(text: str) -> AnonMemory:
    """Split /proc/<pid>/smaps's anonymous memory into executable anonymous mappings (TCG's
    translation buffer; QEMU has no other JIT) and the rest."""
    anon = exec_anon = 0
    executable = False
    for line in text.splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and len(head[1]) == 4 and ":" in head[3]:
            # "start-end perms offset dev inode [path]": a new mapping.
            path = head[5].strip() if len(head) > 5 else ""
            executable = "x" in head[1] and not path
        elif line.startswith("Anonymous:"):
            kib = int(line.split()[1])
            anon += kib
            if executable:
                exec_anon += kib
    return AnonMemory(anon, exec_anon)


@dataclass(frozen=True)
class Fit:
    """y = intercept + slope * x, by least squares over ``n`` points."""

    slope: float
    intercept: float
    n: int


def fit(xs: Sequence[float], ys: Sequence[float]) -> Fit:
    """The ordinary least-squares line through (xs, ys); needs two distinct xs."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} xs but {len(ys)} ys")
    n = len(xs)
    if n < 2:
        raise ValueError(f"a line needs 2 points, got {n}")
    mx = math.fsum(xs) / n
    my = math.fsum(ys) / n
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all points have the same x")
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    return Fit(slope, my - slope * mx, n)


@dataclass(frozen=True)
class MemoryRule:
    """When a memory figure "keeps growing": over at least ``min_cycles`` cycles and
    ``min_samples`` samples, both the whole-run and the late (second-half) slope exceed
    ``threshold_kib_per_cycle``."""

    threshold_kib_per_cycle: float
    min_cycles: int
    min_samples: int = 8


def rule_for(cycles: int, rules: Sequence[MemoryRule]) -> MemoryRule:
    """The rule a run of ``cycles`` cycles is judged by: of ``rules`` (tiers, e.g. a loose
    threshold from 100 cycles and a tight one from 300, where the slope is known better), the
    one with the largest min_cycles that the run reaches; the smallest tier if none."""
    if not rules:
        raise ValueError("no rules")
    reached = [r for r in rules if r.min_cycles <= cycles]
    if not reached:
        return min(rules, key=lambda r: r.min_cycles)
    return max(reached, key=lambda r: r.min_cycles)


@dataclass(frozen=True)
class MemoryVerdict:
    metric: str
    cycles: int
    samples: int
    whole_kib_per_cycle: float
    late_kib_per_cycle: float
    first_kib: int
    last_kib: int
    threshold_kib_per_cycle: float
    decided: bool
    """The run was long enough (cycles and samples) for the rule to speak."""
    growing: bool

    @property
    def state(self) -> str:
        if not self.decided:
            return "too short to decide"
        return "keeps growing" if self.growing else "flat"

    def describe(self) -> str:
        return (
            f"{self.metric}: {self.whole_kib_per_cycle:+.2f} KiB/cycle over {self.cycles} "
            f"cycles, {self.late_kib_per_cycle:+.2f} KiB/cycle over the second half "
            f"({self.first_kib} -> {self.last_kib} KiB, {self.samples} samples; threshold "
            f"{self.threshold_kib_per_cycle:g} KiB/cycle): {self.state}"
        )


def late_half(points: Sequence[tuple[int, int]]) -> Sequence[tuple[int, int]]:
    """The samples of the second half of the run (by cycle; at least two)."""
    if len(points) < 2:
        return points
    mid = (points[0][0] + points[-1][0]) / 2
    late = [p for p in points if p[0] >= mid]
    return late if len(late) >= 2 else points[-2:]


def judge_memory(metric: str, points: Sequence[tuple[int, int]], rule: MemoryRule) -> MemoryVerdict:
    """Apply ``rule`` to (cycle, KiB) samples, cycle 0 being the post-warm-up baseline."""
    if len(points) < 2:
        raise ValueError(f"{metric}: a slope needs 2 samples, got {len(points)}")
    xs = [float(c) for c, _ in points]
    whole = fit(xs, [float(v) for _, v in points])
    late_points = late_half(points)
    late = fit([float(c) for c, _ in late_points], [float(v) for _, v in late_points])
    cycles = points[-1][0] - points[0][0]
    decided = cycles >= rule.min_cycles and len(points) >= rule.min_samples
    limit = rule.threshold_kib_per_cycle
    growing = decided and whole.slope > limit and late.slope > limit
    return MemoryVerdict(
        metric,
        cycles,
        len(points),
        round(whole.slope, 3),
        round(late.slope, 3),
        points[0][1],
        points[-1][1],
        limit,
        decided,
        growing,
    )


@dataclass(frozen=True)
class FdVerdict:
    metric: str
    baseline: int
    final: int
    highest: int
    lowest: int
    steps: tuple[tuple[int, int], ...]
    """(cycle, count) wherever the count changed from the sample before."""

    @property
    def leaked(self) -> bool:
        return self.final > self.baseline

    @property
    def state(self) -> str:
        if self.leaked:
            return f"leak: +{self.final - self.baseline} that stayed"
        if self.lowest < self.baseline:
            return "below baseline: the baseline held an fd in flight (measurement fault)"
        if self.highest > self.baseline:
            return "transient rise, back to baseline"
        return "flat"

    def describe(self) -> str:
        steps = ", ".join(f"{v} at cycle {c}" for c, v in self.steps) or "none"
        return f"{self.metric}: {self.baseline} -> {self.final} (steps: {steps}): {self.state}"


def judge_fds(metric: str, points: Sequence[tuple[int, int]]) -> FdVerdict:
    """(cycle, count) samples, the first being the baseline."""
    if not points:
        raise ValueError(f"{metric}: no samples")
    values = [v for _, v in points]
    steps = tuple(
        (c, v) for (c, v), (_, before) in zip(points[1:], points[:-1], strict=True) if v != before
    )
    return FdVerdict(metric, values[0], values[-1], max(values), min(values), steps)


@dataclass(frozen=True)
class SoakVerdict:
    memory: tuple[MemoryVerdict, ...]
    fds: tuple[FdVerdict, ...]
    decisive: str
    """The memory metric whose growth fails the soak (the others are reported)."""

    @property
    def failures(self) -> list[str]:
        out = [f.describe() for f in self.fds if f.leaked]
        out += [m.describe() for m in self.memory if m.metric == self.decisive and m.growing]
        return out

    def lines(self) -> list[str]:
        return [m.describe() for m in self.memory] + [f.describe() for f in self.fds]


def judge(samples: Sequence[Sample], rule: MemoryRule, decisive: str = DECISIVE) -> SoakVerdict:
    """Every metric of ``samples`` judged: memory by ``rule``, fds by judge_fds."""
    if decisive not in MEMORY_METRICS:
        raise ValueError(f"decisive metric {decisive!r} is not one of {MEMORY_METRICS}")
    memory = tuple(
        judge_memory(m, [(s.cycle, getattr(s, m)) for s in samples], rule) for m in MEMORY_METRICS
    )
    fds = tuple(judge_fds(m, [(s.cycle, getattr(s, m)) for s in samples]) for m in FD_METRICS)
    return SoakVerdict(memory, fds, decisive)


def to_json(samples: Sequence[Sample], verdict: SoakVerdict) -> dict[str, Any]:
    """The JSON shape of one soak in results/soak.json (samples, slopes, verdicts)."""
    return {
        "samples": [asdict(s) for s in samples],
        "memory": {
            m.metric: {**asdict(m), "state": m.state, "decisive": m.metric == verdict.decisive}
            for m in verdict.memory
        },
        "fds": {f.metric: {**asdict(f), "state": f.state} for f in verdict.fds},
        "failures": verdict.failures,
    }


# -- the chart ----------------------------------------------------------------------------

_COLOURS = {
    "qemu_rss_kib": "#1f77b4",
    "qemu_rss_anon_kib": "#ff7f0e",
    "qemu_tcg_code_kib": "#7f7f7f",
    "qemu_anon_excl_tcg_kib": "#d62728",
}
_FD_COLOURS = {"qemu_fds": "#2ca02c", "backend_fds": "#9467bd"}


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(math.ceil((hi - first) / step) + 1)]


def render_svg(title: str, samples: Sequence[Sample], verdict: SoakVerdict) -> str:
    """Two panels against cycles after warm-up: memory above its baseline (MiB, with the
    whole-run and late least-squares lines) and the fd counts; a self-contained SVG."""
    if len(samples) < 2:
        raise ValueError("a chart needs 2 samples")
    width, left, right = 760, 70, 20
    panels = [(40, 240), (310, 110)]  # (top, height) of memory, fds
    total_h = 460
    cycles = [s.cycle for s in samples]
    xlo, xhi = min(cycles), max(cycles)
    if xhi == xlo:
        xhi = xlo + 1
    plot_w = width - left - right

    def px(c: float) -> float:
        return left + (c - xlo) / (xhi - xlo) * plot_w

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
        f'viewBox="0 0 {width} {total_h}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{total_h}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]

    def panel(
        top: int, height: int, series: Mapping[str, Sequence[float]], colours: Mapping[str, str]
    ) -> tuple[float, float]:
        values = [v for vs in series.values() for v in vs]
        lo, hi = min(values), max(values)
        ticks = _ticks(lo, hi if hi > lo else lo + 1, 4)
        lo, hi = ticks[0], ticks[-1]

        def py(v: float) -> float:
            return top + height - (v - lo) / (hi - lo) * height

        out.append(
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{height}" '
            'fill="none" stroke="#999"/>'
        )
        for t in ticks:
            y = py(t)
            out.append(
                f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#ddd"/>'
            )
            out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
        for name, vs in series.items():
            pts = " ".join(f"{px(c):.1f},{py(v):.1f}" for c, v in zip(cycles, vs, strict=True))
            colour = colours[name]
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}"/>')
            for c, v in zip(cycles, vs, strict=True):
                out.append(f'<circle cx="{px(c):.1f}" cy="{py(v):.1f}" r="2" fill="{colour}"/>')
        return lo, hi

    # Memory, in MiB above the first sample, with the fitted lines.
    base = {m: getattr(samples[0], m) for m in MEMORY_METRICS}
    mem = {m: [(getattr(s, m) - base[m]) / 1024 for s in samples] for m in MEMORY_METRICS}
    top, height = panels[0]
    lo, hi = panel(top, height, mem, _COLOURS)
    for v in verdict.memory:
        # The late line, drawn over the second half (MiB: slope in KiB/cycle / 1024).
        points = [(s.cycle, getattr(s, v.metric)) for s in samples]
        late = late_half(points)
        f = fit([float(c) for c, _ in late], [float(y) for _, y in late])

        def py(val: float, lo: float = lo, hi: float = hi) -> float:
            return top + height - (val - lo) / (hi - lo) * height

        x0, x1 = late[0][0], late[-1][0]
        y0 = (f.intercept + f.slope * x0 - base[v.metric]) / 1024
        y1 = (f.intercept + f.slope * x1 - base[v.metric]) / 1024
        out.append(
            f'<line x1="{px(x0):.1f}" y1="{py(y0):.1f}" x2="{px(x1):.1f}" y2="{py(y1):.1f}" '
            f'stroke="{_COLOURS[v.metric]}" stroke-width="2" stroke-dasharray="6,3" opacity="0.6"/>'
        )
    out.append(
        f'<text x="14" y="{top + height / 2}" transform="rotate(-90 14 {top + height / 2})" '
        'text-anchor="middle">MiB above baseline</text>'
    )
    legend_y = top + 14
    for v in verdict.memory:
        label = (
            f"{v.metric}: {v.whole_kib_per_cycle:+.1f} KiB/cycle whole, "
            f"{v.late_kib_per_cycle:+.1f} late (dashed): {v.state}"
            + (" (decides)" if v.metric == verdict.decisive else " (reported)")
        )
        out.append(
            f'<text x="{left + 8}" y="{legend_y}" fill="{_COLOURS[v.metric]}">'
            f"{escape(label)}</text>"
        )
        legend_y += 14
    # Fds.
    top, height = panels[1]
    fds = {m: [float(getattr(s, m)) for s in samples] for m in FD_METRICS}
    panel(top, height, fds, _FD_COLOURS)
    out.append(
        f'<text x="14" y="{top + height / 2}" transform="rotate(-90 14 {top + height / 2})" '
        'text-anchor="middle">fds</text>'
    )
    legend_y = top + 14
    for fv in verdict.fds:
        out.append(
            f'<text x="{left + 8}" y="{legend_y}" fill="{_FD_COLOURS[fv.metric]}">'
            f"{escape(fv.describe())}</text>"
        )
        legend_y += 14
    axis_y = panels[1][0] + panels[1][1]
    for t in _ticks(xlo, xhi, 8):
        if xlo <= t <= xhi:
            out.append(f'<text x="{px(t):.1f}" y="{axis_y + 14}" text-anchor="middle">{t:g}</text>')
    out.append(
        f'<text x="{left + plot_w / 2}" y="{axis_y + 32}" text-anchor="middle">'
        "cycles after warm-up</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"
