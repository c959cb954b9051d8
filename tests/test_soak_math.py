"""The soak's arithmetic: least-squares slopes, the memory and fd decisions, the chart."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.soak import (
    MemoryRule,
    Sample,
    fit,
    judge,
    judge_fds,
    judge_memory,
    late_half,
    parse_smaps,
    render_svg,
    rule_for,
    to_json,
)

SMAPS = """\
555591ced000-555593175000 rw-p 00000000 00:00 0                          [heap]
Size:              21024 kB
Rss:                5884 kB
Anonymous:          5884 kB
7f0f28000000-7f0f67fff000 rwxp 00000000 00:00 0
Size:            1048572 kB
Rss:               71680 kB
Anonymous:         71680 kB
AnonHugePages:     71680 kB
7f0f67fff000-7f0f68000000 ---p 00000000 00:00 0
Anonymous:             0 kB
7f0f71914000-7f0f7270e000 r-xp 00000000 08:01 1234    /usr/bin/qemu-system-x86_64
Anonymous:           100 kB
7f0ef8000000-7f0ef8f83000 rw-p 00000000 00:00 0
Anonymous:          8844 kB
"""

RULE = MemoryRule(threshold_kib_per_cycle=8.0, min_cycles=100, min_samples=8)


def series(cycles: int, every: int, value: Callable[[int], float]) -> list[tuple[int, int]]:
    return [(c, int(value(c))) for c in range(0, cycles + 1, every)]


# -- fit -----------------------------------------------------------------------------------


def test_fit_exact_line() -> None:
    f = fit([0, 1, 2, 3], [5, 7, 9, 11])
    assert (f.slope, f.intercept, f.n) == (2.0, 5.0, 4)


def test_fit_needs_two_distinct_xs() -> None:
    with pytest.raises(ValueError):
        fit([1], [1])
    with pytest.raises(ValueError):
        fit([2, 2, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        fit([1, 2], [1])


@given(
    slope=st.floats(-1e4, 1e4),
    intercept=st.floats(-1e6, 1e6),
    xs=st.lists(st.integers(0, 10_000), min_size=2, max_size=60, unique=True),
)
def test_fit_recovers_any_line(slope: float, intercept: float, xs: list[int]) -> None:
    f = fit(xs, [intercept + slope * x for x in xs])
    assert math.isclose(f.slope, slope, rel_tol=1e-6, abs_tol=1e-6)


def test_late_half_is_the_second_half_by_cycle() -> None:
    points = [(c, 0) for c in range(0, 101, 10)]
    assert [c for c, _ in late_half(points)] == [50, 60, 70, 80, 90, 100]
    assert late_half([(0, 1), (100, 2)]) == [(0, 1), (100, 2)]


# -- memory --------------------------------------------------------------------------------


def test_steady_growth_over_a_long_run_keeps_growing() -> None:
    points = series(300, 10, lambda c: 90_000 + 30 * c)
    v = judge_memory("qemu_rss_anon_kib", points, RULE)
    assert v.decided and v.growing and v.state == "keeps growing"
    assert v.whole_kib_per_cycle == pytest.approx(30) and v.late_kib_per_cycle == pytest.approx(30)
    assert "+30.00 KiB/cycle over 300 cycles" in v.describe()


def test_warm_up_that_ends_is_not_a_leak() -> None:
    # +12 MiB over the first 25 cycles, then flat: the whole-run slope is high, the late one
    # is not -- the "100 KiB per cycle" over 50 cycles was this.
    points = series(120, 3, lambda c: 90_000 + 12_000 * min(c, 25) / 25)
    v = judge_memory("qemu_rss_anon_kib", points, RULE)
    assert v.whole_kib_per_cycle > 8 and v.late_kib_per_cycle == pytest.approx(0)
    assert v.decided and not v.growing and v.state == "flat"


def test_one_step_early_is_not_a_leak() -> None:
    points = series(200, 5, lambda c: 90_000 + (2048 if c >= 10 else 0))
    assert not judge_memory("m", points, RULE).growing


def test_growth_only_late_is_not_yet_a_leak() -> None:
    points = series(200, 5, lambda c: 90_000 + (40 * (c - 150) if c > 150 else 0))
    v = judge_memory("m", points, RULE)
    assert v.late_kib_per_cycle > 8 and v.whole_kib_per_cycle < 8 and not v.growing


def test_a_short_run_does_not_decide() -> None:
    points = series(30, 1, lambda c: 90_000 + 100 * c)
    v = judge_memory("m", points, RULE)
    assert not v.decided and not v.growing and v.state == "too short to decide"
    few = [(0, 1), (200, 5000)]
    assert not judge_memory("m", few, RULE).decided  # 2 samples < min_samples


def test_noise_around_a_flat_line_is_flat() -> None:
    noise = [0, 150, -80, 200, -150, 60, -200, 120, 0, -60]
    points = [(c, 95_000 + noise[i % len(noise)]) for i, c in enumerate(range(0, 301, 10))]
    v = judge_memory("m", points, RULE)
    assert v.decided and not v.growing and abs(v.whole_kib_per_cycle) < 2


def test_judge_memory_needs_two_samples() -> None:
    with pytest.raises(ValueError):
        judge_memory("m", [(0, 1)], RULE)


# -- fds -------------------------------------------------------------------------------------


def test_fds_flat() -> None:
    v = judge_fds("qemu_fds", [(0, 21), (10, 21), (20, 21)])
    assert not v.leaked and v.state == "flat" and v.steps == ()


def test_fd_step_that_stays_is_a_leak() -> None:
    v = judge_fds("qemu_fds", [(0, 21), (10, 21), (20, 22), (30, 22)])
    assert v.leaked and v.state == "leak: +1 that stayed" and v.steps == ((20, 22),)
    assert "22 at cycle 20" in v.describe()


def test_fd_rise_that_comes_back_is_transient() -> None:
    v = judge_fds("qemu_fds", [(0, 21), (10, 23), (20, 21)])
    assert not v.leaked and v.state.startswith("transient")


def test_fds_below_baseline_are_a_measurement_fault_not_a_leak() -> None:
    # The failure: the baseline counted a warm-up mapping's fd still in flight.
    v = judge_fds("qemu_fds", [(0, 31), (200, 30)])
    assert not v.leaked and "measurement fault" in v.state


# -- the whole verdict, JSON and chart -------------------------------------------------------


def samples(n: int, grow: int = 0, fd_leak_at: int | None = None) -> list[Sample]:
    return [
        Sample(
            cycle=c,
            seconds=c * 1.5,
            qemu_fds=21 + (fd_leak_at is not None and c >= fd_leak_at),
            backend_fds=33,
            qemu_rss_kib=290_000 + grow * c + (c % 3) * 10,
            qemu_rss_anon_kib=90_000 + grow * c + 2048 * (c // 50),
            qemu_tcg_code_kib=60_000 + 2048 * (c // 50),
            qemu_anon_excl_tcg_kib=30_000 + grow * c,
        )
        for c in range(0, n + 1, 5)
    ]


def test_judge_passes_a_clean_run() -> None:
    v = judge(samples(200), RULE)
    assert v.failures == [] and len(v.lines()) == 6


def test_judge_fails_on_growth_of_the_decisive_metric_with_the_figure() -> None:
    (failure,) = judge(samples(200, grow=20), RULE).failures
    assert failure.startswith("qemu_anon_excl_tcg_kib: +20.00 KiB/cycle over 200 cycles")


def test_judge_reports_but_does_not_fail_on_tcg_translation_growth() -> None:
    # 2 MiB huge pages of translated code every 50 cycles: ~41 KiB/cycle, bounded by the
    # buffer's size; the anonymous memory outside it is flat.
    v = judge(samples(200), RULE)
    tcg = next(m for m in v.memory if m.metric == "qemu_tcg_code_kib")
    assert tcg.growing and v.failures == []


def test_judge_fails_on_an_fd_leak() -> None:
    (failure,) = judge(samples(200, fd_leak_at=100), RULE).failures
    assert failure.startswith("qemu_fds: 21 -> 22")


def test_judge_rejects_an_unknown_decisive_metric() -> None:
    with pytest.raises(ValueError):
        judge(samples(20), RULE, decisive="qemu_fds")


def test_json_shape() -> None:
    s = samples(200, grow=20)
    data = json.loads(json.dumps(to_json(s, judge(s, RULE))))
    assert len(data["samples"]) == 41 and data["samples"][1]["cycle"] == 5
    anon = data["memory"]["qemu_anon_excl_tcg_kib"]
    assert anon["decisive"] and anon["state"] == "keeps growing"
    assert anon["whole_kib_per_cycle"] == pytest.approx(20)
    assert not data["memory"]["qemu_rss_anon_kib"]["decisive"]
    assert data["fds"]["qemu_fds"]["state"] == "flat"
    assert len(data["failures"]) == 1


def test_chart_is_well_formed_svg_with_the_slopes() -> None:
    s = samples(120, grow=3)
    svg = render_svg("soak hotplug[x86_64] <&>", s, judge(s, RULE))
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert any("<&>" in t for t in texts)
    assert any("+3.0 KiB/cycle whole" in t for t in texts)
    assert len(list(root.iter("{http://www.w3.org/2000/svg}polyline"))) == 6


def test_chart_of_a_flat_run_and_of_too_few_samples() -> None:
    flat = [Sample(c, c, 21, 33, 1000, 500, 300, 200) for c in (0, 1, 2)]
    ET.fromstring(render_svg("flat", flat, judge(flat, RULE)))
    with pytest.raises(ValueError):
        render_svg("one", flat[:1], judge(flat, RULE))


def test_parse_smaps_splits_the_translation_buffer_from_the_rest() -> None:
    mem = parse_smaps(SMAPS)
    assert mem.anon_kib == 5884 + 71680 + 100 + 8844
    assert mem.exec_anon_kib == 71680  # the executable file mapping is not TCG's
    assert mem.excl_exec_kib == 5884 + 100 + 8844
    assert parse_smaps("") == parse_smaps("Anonymous: 0 kB\n")


def test_rule_for_picks_the_tier_the_run_reaches() -> None:
    loose = MemoryRule(16.0, min_cycles=100)
    tight = MemoryRule(4.0, min_cycles=300)
    assert rule_for(20, [loose, tight]) is loose  # too short for either: judged undecided
    assert rule_for(100, [tight, loose]) is loose
    assert rule_for(299, [loose, tight]) is loose
    assert rule_for(400, [loose, tight]) is tight
    with pytest.raises(ValueError):
        rule_for(100, [])
