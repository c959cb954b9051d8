"""The benchmark's pure parts: statistics, ratios, targets, boot phases, table, JSON shape.

No timing is asserted anywhere: the benchmark reports, it never fails CI.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.bench import dax
from testbed.bench.measure import BootInputs, floor_command
from testbed.bench.report import (
    PHASE_NAMES,
    RUN_INIT,
    BootObservation,
    Figure,
    Report,
    Sample,
    Target,
    boot_phases,
    dmesg_time,
    evaluate_targets,
    parse_dmesg,
    parse_loadavg,
    parse_pytest_summary,
    ratio,
    render_table,
)
from testbed.bench.run import Collector, _suite_profile
from testbed.errors import ConfigError, ParseError
from testbed.profile import ScenarioProfile, summarize


def fig(name: str, *values: float) -> Figure:
    return Figure(name, tuple(Sample(v, 1.5) for v in values), what=name)


def test_median_min_max_odd_and_even() -> None:
    odd = fig("a", 3.0, 1.0, 2.0)
    assert (odd.median, odd.min, odd.max) == (2.0, 1.0, 3.0)
    even = fig("b", 4.0, 1.0, 2.0, 3.0)
    assert even.median == 2.5


@given(st.lists(st.floats(0.001, 1000, allow_nan=False), min_size=1, max_size=20))
def test_median_is_between_min_and_max(values: list[float]) -> None:
    f = fig("x", *values)
    assert f.min <= f.median <= f.max


def test_figure_without_samples_is_refused() -> None:
    with pytest.raises(ConfigError, match="no samples"):
        Figure("empty", ())


def test_ratio_of_medians() -> None:
    r = ratio("boot_vs_floor", fig("boot", 3.0, 3.3, 9.0), fig("floor", 2.0, 2.5, 3.0))
    assert r.value == pytest.approx(3.3 / 2.5)
    assert (r.numerator, r.denominator) == ("boot", "floor")
    with pytest.raises(ConfigError, match="median of 0"):
        ratio("bad", fig("a", 1.0), fig("zero", 0.0))


def test_report_ratio_needs_both_figures() -> None:
    report = Report(started="t", host={}, options={})
    report.add(fig("boot", 3.0))
    report.add_ratio("boot_vs_floor", "boot", "floor")
    assert "boot_vs_floor" not in report.ratios
    assert report.not_measured["boot_vs_floor"] == "not measured: floor missing"
    report.add(fig("floor", 2.0))
    report.add_ratio("boot_vs_floor", "boot", "floor")
    assert report.ratios["boot_vs_floor"].value == pytest.approx(1.5)


def test_targets_met_missed_and_unmeasured() -> None:
    figures = {"boot": fig("boot", 3.0), "e2e": fig("e2e", 200.0)}
    ratios = {"r": ratio("r", figures["boot"], fig("floor", 2.0))}
    results = evaluate_targets(
        [
            Target("boot", "boot", 3.5, "s"),
            Target("e2e", "e2e", 180.0, "s"),
            Target("ratio", "r", 1.2, "x"),
            Target("hotplug", "hotplug", 2.0, "s"),
        ],
        figures,
        ratios,
    )
    assert [r.met for r in results] == [True, False, False, None]
    assert results[2].value == pytest.approx(1.5)


DMESG = """\
[    0.000000] Linux version 6.1.0-50-amd64
[    0.912345] Freeing unused kernel image (initmem) memory: 2000K
[    1.034000] Run /init as init process
[    1.500000] virtio_net virtio0 eth0: renamed
[    2.600000] testbed-bench-mark
"""


def test_parse_dmesg_and_find_lines() -> None:
    lines = parse_dmesg(DMESG + "not a dmesg line\n")
    assert len(lines) == 5
    assert dmesg_time(lines, RUN_INIT) == pytest.approx(1.034)
    assert dmesg_time(lines, "testbed-bench-mark") == pytest.approx(2.6)
    with pytest.raises(ParseError, match="CONFIG_PRINTK_TIME"):
        dmesg_time(lines, "never logged")


TIMINGS = {
    "resolve_qemu": 0.05,
    "choose_accel": 0.0,
    "ensure_image": 0.01,
    "backend": 0.04,
    "qemu_start": 0.2,
    "ready_line": 2.0,
    "ssh": 0.3,
}


def observation(**changes: float) -> BootObservation:
    values = {
        "mark_host": 2.7,
        "mark_guest": 2.4,
        "run_init_guest": 1.0,
        "first_command": 0.1,
        "checks": 0.5,
        "teardown": 0.2,
    }
    values.update(changes)
    return BootObservation(timings=TIMINGS, **values)


def test_boot_phases_are_consecutive_and_add_up() -> None:
    phases = boot_phases(observation())
    assert [p.name for p in phases] == list(PHASE_NAMES)
    for before, after in itertools.pairwise(phases):
        assert after.start == pytest.approx(before.start + before.duration)
    by_name = {p.name: p for p in phases}
    # kernel starts at 2.7 - 2.4 = 0.3 on the host clock; QEMU was up at 0.3 as well
    assert by_name["harness setup"].duration == pytest.approx(0.1)
    assert by_name["QEMU start"].duration == pytest.approx(0.2)
    assert by_name["firmware"].duration == pytest.approx(0.0)
    assert by_name["kernel"].duration == pytest.approx(1.0)
    assert by_name["init"].duration == pytest.approx(2.3 - 1.3)
    assert by_name["sshd"].duration == pytest.approx(0.3)
    total = sum(p.duration for p in phases)
    assert total == pytest.approx(sum(TIMINGS.values()) + 0.1 + 0.5 + 0.2)


def test_boot_phases_clamp_guest_estimates() -> None:
    # A marker that puts the kernel start before QEMU started: firmware clamps to 0 and
    # no phase is negative.
    phases = boot_phases(observation(mark_guest=2.65))
    assert all(p.duration >= 0 for p in phases)
    assert {p.name: p for p in phases}["firmware"].duration == 0


def test_boot_phases_need_complete_timings() -> None:
    obs = BootObservation({"resolve_qemu": 0.1}, 1, 1, 1, 0, 0, 0)
    with pytest.raises(ParseError, match="did the boot finish"):
        boot_phases(obs)


def full_report() -> Report:
    report = Report(started="2026-01-01T00:00:00+00:00", host={"cpus": 2}, options={"runs": 3})
    report.add(fig("floor.x86_64", 2.0, 2.2, 2.1))
    report.add(fig("boot_to_ssh.x86_64", 2.5, 2.6, 2.4))
    report.add_ratio("boot_vs_floor.x86_64", "boot_to_ssh.x86_64", "floor.x86_64")
    report.skip("hotplug_cycle.x86_64", "not measured: not committed yet")
    report.phases["x86_64"] = boot_phases(observation())
    report.targets = evaluate_targets(
        [Target("boot vs floor", "boot_vs_floor.x86_64", 1.2, "x")],
        report.figures,
        report.ratios,
    )
    return report


def test_json_shape() -> None:
    data = json.loads(json.dumps(full_report().to_json()))
    assert data["schema"] == 1
    assert set(data) == {
        "schema",
        "started",
        "host",
        "options",
        "figures",
        "ratios",
        "targets",
        "not_measured",
        "phases",
        "notes",
    }
    floor = data["figures"]["floor.x86_64"]
    assert floor["median"] == 2.1 and floor["min"] == 2.0 and floor["max"] == 2.2
    assert floor["runs"] == 3 and floor["samples"] == [2.0, 2.2, 2.1]
    assert floor["loadavg_1min"] == [1.5, 1.5, 1.5]
    assert data["ratios"]["boot_vs_floor.x86_64"]["value"] == round(2.5 / 2.1, 3)
    assert data["targets"][0]["met"] is True
    assert data["not_measured"] == {"hotplug_cycle.x86_64": "not measured: not committed yet"}
    assert [p["name"] for p in data["phases"]["x86_64"]] == list(PHASE_NAMES)


def test_table_shows_every_part() -> None:
    table = render_table(full_report())
    assert "floor.x86_64" in table and "2.10" in table
    assert "1.19x" in table
    assert "met" in table
    assert "hotplug_cycle.x86_64: not measured" in table
    assert "one boot, x86_64" in table and "firmware" in table


def test_loadavg_and_pytest_summary() -> None:
    assert parse_loadavg("0.52 0.58 0.59 1/300 12345\n") == 0.52
    with pytest.raises(ParseError):
        parse_loadavg("")
    summary = parse_pytest_summary("...\n== 40 passed, 2 xfailed, 1 error in 93.12s (0:01:33) ==")
    assert summary == {"passed": 40, "xfailed": 2, "errors": 1}
    assert parse_pytest_summary("no summary here") == {}


def test_floor_command_is_the_test_bed_command_line(tmp_path: Path) -> None:
    inputs = BootInputs(
        "x86_64",
        Path("/q/qemu-system-x86_64"),
        "tcg",
        Path("/img/vmlinux"),
        Path("/img/initrd.img"),
        "console=ttyS0 quiet",
        "TESTBED-GUEST-READY",
    )
    argv, console = floor_command(inputs, tmp_path)
    assert argv[0] == "/q/qemu-system-x86_64"
    assert "-S" not in argv  # no QMP pause/cont in the floor
    assert console == tmp_path / "console.log"
    assert f"file,id=console,path={console}" in argv
    assert argv[argv.index("-kernel") + 1] == "/img/vmlinux"
    assert argv[argv.index("-initrd") + 1] == "/img/initrd.img"
    assert not any("vhost-user" in word for word in argv)


def test_the_dax_read_is_timed_by_the_guest() -> None:
    """testbed.bench.dax: mount, one dd of the file, unmount, and /proc/uptime around the
    dd alone; its output gives the read's seconds."""
    script = dax.read_script("-o dax=always")
    assert script.index("mount -t virtiofs") < script.index("/proc/uptime") < script.index("dd ")
    assert "-o dax=always" in script and script.endswith("echo $a $b")
    assert dax.seconds_of("12.34 12.97\n") == pytest.approx(0.63)
    assert [s.name for s in dax.servers()] == list(dax.SERVERS)


def test_the_suite_profile_gives_the_restored_median_and_the_phase_notes(tmp_path: Path) -> None:
    """make bench reads the 2-worker suite's profile.json (what run_report wrote)."""
    runs = [ScenarioProfile(f"r{i}", t, {"restore": {"seconds": 0.2, "count": 1}})
            for i, t in enumerate((1.0, 1.4, 2.0))]  # fmt: skip
    (tmp_path / "profile.json").write_text(json.dumps({"summary": summarize(runs)}))
    report = Report(started="now", host={}, options={})
    col = Collector(report, say=lambda _: None)
    _suite_profile(col, tmp_path / "profile.json")
    col.finish()
    assert report.figures["e2e.restored_median"].median == 1.4
    assert any("restored 3 (4.4 s, median 1.40 s)" in note for note in report.notes)
    _suite_profile(col, tmp_path / "missing.json")
    assert "no suite profile" in report.not_measured["e2e.restored_median"]
