#!/usr/bin/env python3
"""The nightly job: every end-to-end scenario as an avocado test, over arch x accelerator.

The scenarios are the pytest ones in scenarios/ (no second copy of any logic): each
(scenario, arch, accel) becomes one avocado exec-test that runs pytest on that one node.
pytest's exit status maps onto avocado's verdict: 0 PASS, a scenario skipped for a missing
host capability (no usable KVM, say) SKIP -- with the reason in the test's log --, anything
else FAIL. Avocado writes its job results, results.html and xunit under --results.

Usage: scripts/nightly.py [--results DIR] [--arch x86_64,aarch64] [--accel kvm,tcg] [-k EXPR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from testbed.machine.profiles import ARCHES

ROOT = Path(__file__).resolve().parent.parent
# pytest exits 77 when every selected test was skipped (see scenarios/conftest.py).
SKIP_EXIT = 77


def collect(arch: str, accel: str, keyword: str | None) -> list[str]:
    """The scenario node ids pytest would run for this arch."""
    cmd = [sys.executable, "-m", "pytest", "scenarios", "--collect-only", "-q"]
    cmd += ["--arch", arch, "--accel", accel]
    if keyword:
        cmd += ["-k", keyword]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    if not ids:
        raise SystemExit(
            f"nightly: no scenarios collected for {arch}/{accel}:\n{out.stdout}{out.stderr}"
        )
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "results" / "nightly"))
    parser.add_argument("--arch", default=",".join(ARCHES))
    parser.add_argument("--accel", default="kvm,tcg")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression to select scenarios")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "2")))
    args = parser.parse_args()

    # Imported here so that --help works without avocado installed.
    from avocado.core.job import Job
    from avocado.core.nrunner.runnable import Runnable
    from avocado.core.suite import TestSuite

    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    runnables = []
    for arch in args.arch.split(","):
        for accel in args.accel.split(","):
            for nodeid in collect(arch, accel, args.keyword):
                runnables.append(
                    Runnable(
                        "exec-test",
                        sys.executable,
                        "-m",
                        "pytest",
                        "-p",
                        "no:cacheprovider",
                        "-q",
                        "-rs",
                        "--rootdir",
                        str(ROOT),
                        "--arch",
                        arch,
                        "--accel",
                        accel,
                        "--junitxml",
                        os.devnull,
                        str(ROOT / nodeid),
                        identifier=f"{nodeid}@{accel}",
                        # Per runnable: avocado does not copy job config into runnables
                        # that a script builds itself.
                        config={"runner.exectest.exitcodes.skip": [SKIP_EXIT]},
                        TESTBED_EXIT_ON_ALL_SKIPPED=str(SKIP_EXIT),
                        TESTBED_RESULTS=str(results / "pytest"),
                        PATH=os.environ.get("PATH", ""),
                        HOME=os.environ.get("HOME", "/root"),
                    )
                )
    config = {
        "run.results_dir": str(results),
        "run.max_parallel_tasks": args.workers,
        "runner.exectest.exitcodes.skip": [SKIP_EXIT],
        "job.run.result.xunit.enabled": True,
        "job.run.result.html.enabled": True,
        "job.run.result.json.enabled": True,
        "task.timeout.running": 900,
        "sysinfo.collect.enabled": "off",
    }
    suite = TestSuite(name="scenarios", tests=runnables, config=config)
    with Job(config, [suite]) as job:
        status: int = job.run()
    print(f"nightly: avocado results in {results}/latest (results.html, results.xml)")
    return status


if __name__ == "__main__":
    sys.exit(main())
