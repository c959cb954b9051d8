"""Pure parts of the benchmark: statistics, ratios, targets, boot phases, table, JSON.

No I/O here: testbed.bench.measure collects samples, this module turns them into figures
and a report, and tests/test_bench.py checks it without QEMU.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.errors import ConfigError, ParseError

SCHEMA = 1


@dataclass(frozen=True)
class Sample:
    """One measured run: seconds, and the 1-minute load average when it was taken."""

    seconds: float
    load1: float | None = None


@dataclass(frozen=True)
class Figure:
    """A measured quantity: several runs summarised as median, min and max."""

    name: str
    samples: tuple[Sample, ...]
    what: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if not self.samples:
            raise ConfigError(f"figure {self.name!r} has no samples: measure it or leave it out")

    @property
    def values(self) -> list[float]:
        return [s.seconds for s in self.samples]

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    @property
    def load1(self) -> list[float]:
        return [s.load1 for s in self.samples if s.load1 is not None]

    def to_json(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "unit": "s",
            "runs": len(self.samples),
            "median": round(self.median, 3),
            "min": round(self.min, 3),
            "max": round(self.max, 3),
            "samples": [round(v, 3) for v in self.values],
            "loadavg_1min": [round(v, 2) for v in self.load1],
            "note": self.note,
        }


@dataclass(frozen=True)
class Ratio:
    """numerator / denominator of two figures of the same run (medians)."""

    name: str
    numerator: str
    denominator: str
    value: float

    def to_json(self) -> dict[str, Any]:
        return {
            "numerator": self.numerator,
            "denominator": self.denominator,
            "value": round(self.value, 3),
        }


def ratio(name: str, numerator: Figure, denominator: Figure) -> Ratio:
    if denominator.median <= 0:
        raise ConfigError(f"ratio {name}: {denominator.name} has a median of 0")
    return Ratio(name, numerator.name, denominator.name, numerator.median / denominator.median)


@dataclass(frozen=True)
class Target:
    """A goal from issue 8: a figure's median or a ratio at most `limit`. Reported, never
    asserted."""

    name: str
    subject: str
    """A figure or ratio name."""
    limit: float
    unit: str
    """'s' (a figure's median) or 'x' (a ratio)."""


@dataclass(frozen=True)
class TargetResult:
    target: Target
    value: float | None
    """None: its subject was not measured in this run."""

    @property
    def met(self) -> bool | None:
        return None if self.value is None else self.value <= self.target.limit

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.target.name,
            "subject": self.target.subject,
            "limit": self.target.limit,
            "unit": self.target.unit,
            "value": None if self.value is None else round(self.value, 3),
            "met": self.met,
        }


def evaluate_targets(
    targets: Iterable[Target], figures: Mapping[str, Figure], ratios: Mapping[str, Ratio]
) -> list[TargetResult]:
    results = []
    for target in targets:
        value: float | None = None
        if target.unit == "x" and target.subject in ratios:
            value = ratios[target.subject].value
        elif target.unit == "s" and target.subject in figures:
            value = figures[target.subject].median
        results.append(TargetResult(target, value))
    return results


# -- where the time of one boot goes ---------------------------------------------------------

_DMESG_LINE = re.compile(r"^\[\s*(\d+\.\d+)\]\s?(.*)$")
RUN_INIT = "Run /init as init process"


def parse_dmesg(text: str) -> list[tuple[float, str]]:
    """`dmesg` output (printk times on) as (seconds since kernel start, message)."""
    lines = []
    for raw in text.splitlines():
        match = _DMESG_LINE.match(raw)
        if match:
            lines.append((float(match.group(1)), match.group(2)))
    return lines


def dmesg_time(lines: Sequence[tuple[float, str]], needle: str) -> float:
    """The printk time of the first line containing `needle`."""
    for seconds, message in lines:
        if needle in message:
            return seconds
    raise ParseError(
        f"no dmesg line contains {needle!r} ({len(lines)} lines read): is printk time on "
        "(CONFIG_PRINTK_TIME) and did the guest log it?"
    )


@dataclass(frozen=True)
class Phase:
    name: str
    start: float
    """Seconds since the harness started (GuestVM.start)."""
    duration: float


@dataclass(frozen=True)
class BootObservation:
    """What one instrumented boot saw, all host times relative to GuestVM.start().

    The guest's clock is tied to the host's by a marker: the first SSH command writes it to
    /dev/kmsg at host time `mark_host` (midpoint of its round trip); its printk time is
    `mark_guest`. Kernel start on the host clock is then mark_host - mark_guest.
    """

    timings: Mapping[str, float]
    """GuestVM.timings: resolve_qemu, choose_accel, ensure_image, backend, qemu_start,
    ready_line, ssh (durations)."""
    mark_host: float
    mark_guest: float
    run_init_guest: float
    first_command: float
    checks: float
    teardown: float


PHASE_NAMES = (
    "harness setup",
    "QEMU start",
    "firmware",
    "kernel",
    "init",
    "sshd",
    "first command",
    "checks",
    "teardown",
)


def boot_phases(obs: BootObservation) -> list[Phase]:
    """Split one boot into consecutive phases (see PHASE_NAMES).

    harness setup = resolve QEMU, accelerator, image, back-end; QEMU start = Popen to `cont`
    (QMP connected); firmware = `cont` to kernel start; kernel = to `Run /init`; init = to
    the ready line seen on the host; sshd = ready line to an SSH session. The guest-clock
    points are estimates (the marker's round trip bounds their error): a negative span is
    clamped to 0 and the next phase absorbs it, so the phases still add up to the total.
    """
    t = obs.timings
    try:
        setup = t["resolve_qemu"] + t["choose_accel"] + t["ensure_image"] + t["backend"]
        qemu_started = setup + t["qemu_start"]
        ready = qemu_started + t["ready_line"]
        ssh_up = ready + t["ssh"]
    except KeyError as exc:
        raise ParseError(f"GuestVM.timings lacks {exc}: did the boot finish?") from exc
    kernel_start = obs.mark_host - obs.mark_guest
    init_start = kernel_start + obs.run_init_guest
    # Monotone cut points; a guest estimate never moves a later point before an earlier one.
    points = [0.0, setup, qemu_started]
    for point in (kernel_start, init_start, ready, ssh_up):
        points.append(max(point, points[-1]))
    after = ssh_up + obs.first_command
    points += [after, after + obs.checks, after + obs.checks + obs.teardown]
    return [
        Phase(name, round(start, 3), round(end - start, 3))
        for name, start, end in zip(PHASE_NAMES, points[:-1], points[1:], strict=True)
    ]


# -- the report ------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything one `testbed bench` run measured."""

    started: str
    host: dict[str, Any]
    options: dict[str, Any]
    figures: dict[str, Figure] = field(default_factory=dict)
    ratios: dict[str, Ratio] = field(default_factory=dict)
    not_measured: dict[str, str] = field(default_factory=dict)
    phases: dict[str, list[Phase]] = field(default_factory=dict)
    targets: list[TargetResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures[figure.name] = figure
        self.not_measured.pop(figure.name, None)
        return figure

    def skip(self, name: str, reason: str) -> None:
        self.not_measured[name] = reason

    def add_ratio(self, name: str, numerator: str, denominator: str) -> None:
        """A ratio of two figures of this run; skipped (with why) when one is missing."""
        missing = [n for n in (numerator, denominator) if n not in self.figures]
        if missing:
            self.not_measured[name] = f"not measured: {', '.join(missing)} missing"
            return
        self.ratios[name] = ratio(name, self.figures[numerator], self.figures[denominator])

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "started": self.started,
            "host": self.host,
            "options": self.options,
            "figures": {k: f.to_json() for k, f in self.figures.items()},
            "ratios": {k: r.to_json() for k, r in self.ratios.items()},
            "targets": [t.to_json() for t in self.targets],
            "not_measured": dict(self.not_measured),
            "phases": {
                arch: [{"name": p.name, "start": p.start, "duration": p.duration} for p in phases]
                for arch, phases in self.phases.items()
            },
            "notes": list(self.notes),
        }


def _s(value: float) -> str:
    return f"{value:8.2f}"


def render_table(report: Report) -> str:
    """A readable plain-text table of figures, ratios, targets, phases and gaps."""
    out: list[str] = []
    width = max([len(n) for n in report.figures] + [len(n) for n in report.ratios] + [24])
    out.append(f"{'figure':<{width}}  {'median':>8}  {'min':>8}  {'max':>8}  runs  load1")
    for fig in report.figures.values():
        load = "-"
        if fig.load1:
            load = f"{min(fig.load1):.1f}-{max(fig.load1):.1f}"
        out.append(
            f"{fig.name:<{width}}  {_s(fig.median)}  {_s(fig.min)}  {_s(fig.max)}  "
            f"{len(fig.samples):>4}  {load}"
        )
    if report.ratios:
        out.append("")
        out.append(f"{'ratio (medians, same run)':<{width}}  {'value':>8}")
        for r in report.ratios.values():
            out.append(f"{r.name:<{width}}  {r.value:7.2f}x   {r.numerator} / {r.denominator}")
    if report.targets:
        out.append("")
        out.append("targets (reported, not asserted)")
        for t in report.targets:
            unit = t.target.unit
            have = "not measured" if t.value is None else f"{t.value:.2f}{unit}"
            verdict = {True: "met", False: "MISSED", None: "-"}[t.met]
            out.append(
                f"  {t.target.name:<{width}}  <= {t.target.limit:g}{unit}: {have:>12}  {verdict}"
            )
    for arch, phases in report.phases.items():
        out.append("")
        out.append(f"one boot, {arch} (seconds from GuestVM.start)")
        for p in phases:
            out.append(f"  {p.name:<16} {p.start:7.3f} +{p.duration:6.3f}")
    if report.not_measured:
        out.append("")
        for name, reason in report.not_measured.items():
            out.append(f"{name}: {reason}")
    for note in report.notes:
        out.append(f"note: {note}")
    return "\n".join(out) + "\n"


def parse_loadavg(text: str) -> float:
    """The 1-minute load average from /proc/loadavg's text."""
    try:
        return float(text.split()[0])
    except (IndexError, ValueError) as exc:
        raise ParseError(f"/proc/loadavg reads {text!r}: want 'L1 L5 L15 R/T PID'") from exc


_PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|error|errors)\b")


def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line ('3 passed, 1 xfailed in 12.3s')."""
    for line in reversed(text.splitlines()):
        counts = {kind: int(n) for n, kind in _PYTEST_COUNTS.findall(line)}
        if counts and " in " in line:
            if "error" in counts:
                counts["errors"] = counts.pop("error") + counts.get("errors", 0)
            return counts
    return {}
