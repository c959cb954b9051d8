"""The profile of a scenario's time (testbed.profile): nested phases are charged their own
time, nothing is recorded outside a scenario or from another thread, the summary adds up."""

from __future__ import annotations

import threading
import time

from testbed.profile import Profile, ScenarioProfile, phase, recording, render, summarize


def test_nested_phases_are_charged_their_own_time() -> None:
    profile = Profile()
    with recording(profile):
        with phase("plug"):
            time.sleep(0.02)
            with phase("guest command"):
                time.sleep(0.05)
        with phase("guest command"):
            pass
    assert profile.counts == {"plug": 1, "guest command": 2}
    assert 0.015 < profile.seconds["plug"] < 0.045  # without the nested command's 0.05
    assert profile.seconds["guest command"] >= 0.05


def test_nothing_is_recorded_outside_a_scenario_or_from_another_thread() -> None:
    with phase("outside"):
        pass
    profile = Profile()
    with recording(profile):

        def elsewhere() -> None:
            with phase("back-end thread"):
                pass

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
    assert not profile.seconds


def test_summary_totals_shares_and_the_slowest() -> None:
    fast = ScenarioProfile("a", 1.0, {"guest command": {"seconds": 0.4, "count": 4}})
    slow = ScenarioProfile(
        "b", 3.0, {"boot (to the ready line)": {"seconds": 2.0, "count": 1},
                   "guest command": {"seconds": 0.5, "count": 5}},
    )  # fmt: skip
    summary = summarize([fast, slow], slowest=1)
    rows = {row["phase"]: row for row in summary["by_phase"]}
    assert summary["seconds"] == 4.0 and summary["scenarios"] == 2
    assert rows["guest command"] == {"phase": "guest command", "seconds": 0.9, "count": 9,
                                     "share": 0.225}  # fmt: skip
    assert rows["(unmarked)"]["seconds"] == 1.1  # 0.6 + 0.5 that no phase holds
    assert [row["nodeid"] for row in summary["slowest"]] == ["b"]
    assert any("boot (to the ready line)" in line for line in render(summary))


def test_scenarios_by_how_they_got_their_guest() -> None:
    booted = ScenarioProfile("b", 4.0, {"boot (to the ready line)": {"seconds": 3.0, "count": 1}})
    restored = [
        ScenarioProfile(f"r{i}", t, {"restore": {"seconds": 0.2, "count": 1}})
        for i, t in enumerate((1.0, 1.5, 3.0))
    ]
    layout = ScenarioProfile("l", 0.5, {"guest PCI view": {"seconds": 0.4, "count": 1}})
    starts = summarize([booted, *restored, layout])["by_start"]
    assert starts["booted"] == {"runs": 1, "seconds": 4.0, "median": 4.0}
    assert starts["restored"] == {"runs": 3, "seconds": 5.5, "median": 1.5}
    assert starts["shared boot or no guest"]["runs"] == 1
    assert any(
        "restored 3 (5.5 s, median 1.50 s)" in line
        for line in render(summarize([booted, *restored, layout]))
    )
