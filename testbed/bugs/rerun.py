"""Rerun one scenario as it ran: the reproducer behind every artifact dir's reproduce.sh.

The scenario's own code builds the same device (full layout, feature offer, every fault
and delay), the same QEMU command line and the same QMP and guest steps; only ports and
temp dirs are fresh. pytest runs it in a child process with its own results dir; the
JUnit report says how it ended.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import TestbedError
from testbed.paths import PROJECT_ROOT, cache_dir, make_private_dir, remove_tree

RERUN_TIMEOUT = 900.0


@dataclass(frozen=True)
class Rerun:
    nodeid: str
    outcome: str
    """'xfailed' (a known bug showed), 'failed', 'passed', 'skipped' or 'error'."""
    message: str

    @property
    def reproduced(self) -> bool:
        """A known bug's scenario reproduces when it is an expected failure again (its
        signature showed); any other scenario when it fails again."""
        return self.outcome in ("xfailed", "failed")

    def summary(self) -> str:
        verdict = "REPRODUCED" if self.reproduced else "NOT REPRODUCED"
        return f"{verdict} ({self.outcome}): {self.nodeid}\n  {self.message}"


def outcome_of(report: ET.Element) -> tuple[str, str]:
    """(outcome, message) of the first test case in a JUnit XML report (or one of its
    testcase elements). Pure."""
    case = report if report.tag == "testcase" else report.find(".//testcase")
    if case is None:
        return "error", "pytest ran no test: check the node id"
    for tag in ("failure", "error"):
        node = case.find(tag)
        if node is not None:
            return ("failed" if tag == "failure" else "error"), node.get("message", "")
    skipped = case.find("skipped")
    if skipped is not None:
        kind = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
        return kind, skipped.get("message", "")
    return "passed", "the scenario passed"


def reproduce_script(nodeid: str, about: str) -> str:
    """The reproduce.sh of a failed or known-bug scenario: absolute paths only, so it
    runs from any directory, with no venv on PATH and an empty environment."""
    lines = [
        "#!/bin/sh",
        f"# Reproduce {nodeid}",
        *(f"# {line}" for line in about.splitlines()),
        "# Reruns the scenario: the same back-end (full layout, feature offer, faults and",
        "# delays), the same QEMU command line (qemu-cmdline.txt), the same QMP and guest",
        "# steps, with fresh ports and its own temp dir. Prints the signature it saw and",
        "# exits 0 if and only if the bug reproduced.",
        f"TESTBED_CACHE={shlex.quote(str(cache_dir()))}",
        "export TESTBED_CACHE",
        f"exec {shlex.quote(sys.executable)} -m testbed bugs reproduce {shlex.quote(nodeid)}",
    ]
    return "\n".join(lines) + "\n"


def run_pytest(targets: list[str], workdir: Path, extra: list[str] | None = None) -> ET.Element:
    """Run pytest on ``targets`` in a child process with its results under ``workdir``;
    its JUnit report's root. Raises TestbedError when pytest wrote no report."""
    junit = workdir / "junit.xml"
    argv = [
        sys.executable, "-m", "pytest", *targets, "-p", "no:cacheprovider", "-q",
        f"--junitxml={junit}", "-o", "addopts=", *(extra or []),
    ]  # fmt: skip
    env = {**os.environ, "TESTBED_RESULTS": str(workdir / "results")}
    done = subprocess.run(
        argv, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, timeout=RERUN_TIMEOUT,
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if not junit.exists():
        raise TestbedError("pytest wrote no report: " + (done.stdout + done.stderr).strip()[-2000:])
    return ET.parse(junit).getroot()


def rerun_scenario(nodeid: str, extra: list[str] | None = None) -> Rerun:
    """Run ``nodeid`` once with pytest in a private results dir, removed afterwards."""
    workdir = make_private_dir("rerun")
    try:
        try:
            report = run_pytest([nodeid], workdir, extra)
        except TestbedError as exc:
            return Rerun(nodeid, "error", str(exc))
        outcome, message = outcome_of(report)
        return Rerun(nodeid, outcome, message)
    finally:
        remove_tree(workdir)
