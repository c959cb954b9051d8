"""The end of a scenario run: the pass/fail table by scenario x architecture, and where
the time went (testbed.profile), summed over every scenario run.

A pytest plugin, loaded by testbed.pytest_plugin. Each scenario's phases are recorded while
it runs (setup, call, teardown: the VM's start and teardown included) and travel to the
controller with its teardown report (a user property, so xdist workers pass them on); the
controller writes results/profile.json and prints the summary after the table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import pytest

from testbed import paths
from testbed.machine.profiles import ARCHES
from testbed.profile import PROFILE_FILE, Profile, ScenarioProfile, recording, render, summarize

_TABLE_KEY = pytest.StashKey["ResultTable"]()
_PROFILES_KEY = pytest.StashKey[list[ScenarioProfile]]()
_DURATIONS_KEY = pytest.StashKey[dict[str, float]]()
PROFILE_PROPERTY = "profile"


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_TABLE_KEY] = ResultTable()
    config.stash[_PROFILES_KEY] = []
    config.stash[_DURATIONS_KEY] = {}


_ITEM_PROFILE = pytest.StashKey[Profile]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Record the scenario's phases over its whole protocol (setup, call, teardown)."""
    profile = item.stash[_ITEM_PROFILE] = Profile()
    with recording(profile):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """The phases go with the teardown report (after the VM's teardown, its last phase)."""
    profile = item.stash.get(_ITEM_PROFILE, None)
    if call.when == "teardown" and profile is not None and profile.seconds:
        item.user_properties.append((PROFILE_PROPERTY, json.dumps(profile.to_json())))
    return (yield)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _CONFIG[0] if _CONFIG else None
    if config is None:
        return
    config.stash[_TABLE_KEY].record(report)
    durations = config.stash[_DURATIONS_KEY]
    durations[report.nodeid] = durations.get(report.nodeid, 0.0) + report.duration
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == PROFILE_PROPERTY:
            phases = json.loads(str(value))
            seconds = durations.pop(report.nodeid, report.duration)
            config.stash[_PROFILES_KEY].append(ScenarioProfile(report.nodeid, seconds, phases))


_CONFIG: list[pytest.Config] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG[:] = [session.config]


# --- the pass/fail table by scenario x architecture -------------------------------------

_ARCH_IN_ID = re.compile(r"\[(.*?)\]$")


@dataclass
class ResultTable:
    """Outcome per (scenario, arch); scenario = test id without its arch parameter."""

    cells: dict[tuple[str, str], str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)

    def record(self, report: pytest.TestReport) -> None:
        scenario, arch = split_arch(report.nodeid)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if hasattr(report, "wasxfail"):
                outcome = "XFAIL" if report.skipped else "XPASS"
            elif report.skipped:
                outcome = "SKIP"
            else:
                outcome = "PASS" if report.passed else "FAIL"
            self.cells[(scenario, arch)] = outcome
        elif report.when == "teardown" and report.failed:
            self.cells[(scenario, arch)] = "ERROR"
        for title, content in report.sections:
            if title == "testbed artifacts" and (report.failed or hasattr(report, "wasxfail")):
                self.artifacts[report.nodeid] = content.removeprefix("kept in ")

    def render(self) -> list[str]:
        if not self.cells:
            return []
        arches = sorted({a for _, a in self.cells}, key=_arch_order)
        scenarios = sorted({s for s, _ in self.cells})
        width = max(len(s) for s in scenarios)
        lines = [f"{'scenario':<{width}}  " + "  ".join(f"{a:<8}" for a in arches)]
        lines.append("-" * len(lines[0]))
        for s in scenarios:
            row = "  ".join(f"{self.cells.get((s, a), ''):<8}" for a in arches)
            lines.append(f"{s:<{width}}  {row}")
        return lines


def _arch_order(arch: str) -> tuple[int, str]:
    return (ARCHES.index(arch) if arch in ARCHES else len(ARCHES), arch)


def split_arch(nodeid: str) -> tuple[str, str]:
    """'scenarios/x.py::test_a[x86_64-two]' -> ('x.py::test_a[two]', 'x86_64')."""
    name = nodeid.removeprefix("scenarios/")
    m = _ARCH_IN_ID.search(name)
    if not m:
        return name, "-"
    params = m.group(1).split("-")
    arch = next((p for p in params if p in ARCHES), "-")
    rest = [p for p in params if p != arch]
    base = name[: m.start()]
    return (f"{base}[{'-'.join(rest)}]" if rest else base), arch


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    table = config.stash.get(_TABLE_KEY, None)
    if table is None or hasattr(config, "workerinput"):
        return
    _profile_summary(terminalreporter, config)
    lines = table.render()
    if not lines:
        return
    terminalreporter.section("testbed: scenario x architecture")
    for line in lines:
        terminalreporter.write_line(line)
    if table.artifacts:
        terminalreporter.write_line("")
        terminalreporter.write_line("artifacts of failures and expected failures:")
        for nodeid, path in sorted(table.artifacts.items()):
            terminalreporter.write_line(f"  {nodeid}: {path}")


def _profile_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """results/profile.json and its summary (before the table: the table stays last)."""
    profiles = config.stash.get(_PROFILES_KEY, [])
    if not profiles:
        return
    summary = summarize(profiles)
    results = paths.results_dir()
    results.mkdir(parents=True, exist_ok=True)
    data = {
        "summary": summary,
        "scenarios": [
            {"nodeid": p.nodeid, "seconds": round(p.seconds, 3), "phases": p.phases}
            for p in profiles
        ],
    }
    (results / PROFILE_FILE).write_text(json.dumps(data, indent=1) + "\n")
    terminalreporter.section("testbed: where the scenarios' time went")
    for line in render(summary):
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(per scenario: {results / PROFILE_FILE})")
