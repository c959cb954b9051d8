#!/usr/bin/env python3
"""The nightly job: every end-to-end scenario as an avocado test, over arch x accelerator x
guest kernel, and once more with a fresh boot where `make e2e` restores a snapshot.

The scenarios are the pytest ones in scenarios/ (no second copy of any logic): each
(scenario, arch, accel, kernel, start) becomes one avocado test (testbed.nightly.Case,
ScenarioTest) that runs pytest on that one node, with --isolated-boots (every cold-plug
layout in a boot of its own), and keeps what pytest knew: PASS; WARN with the registry id and
signature when a known QEMU bug showed; SKIP with its reason (a missing host capability,
such as no usable KVM); FAIL with pytest's message. Avocado writes its job results,
results.html, results.json and results.xml under --results (results.xml then gets the SKIP
reasons and WARN messages that avocado's xunit writer leaves out).

The job's own data, in <job>/testbed/: job.json (per arch: the QEMU binary and version, the
accelerator decision and why, the guest image hash), the tables of `testbed bugs check`
(every known bug against the QEMU at hand) and of `testbed fuzz` run for a fixed time per
arch (fuzz-<arch>.txt, fuzz-<arch>/summary.json and its findings).

Usage: scripts/nightly.py [--results DIR] [--arch x86_64,aarch64] [--accel kvm,tcg]
                          [--kernels 6.1,6.12] [--no-fresh-boot] [-k EXPR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.images import DEFAULT_KERNEL, kernel_names
from testbed.machine.profiles import ARCHES

ROOT = Path(__file__).resolve().parent.parent


def collect(arch: str, accel: str, kernel: str, keyword: str | None) -> list[str]:
    """The scenario node ids pytest would run for this arch and kernel."""
    cmd = [sys.executable, "-m", "pytest", "scenarios", "--collect-only", "-q"]
    cmd += ["--arch", arch, "--accel", accel, "--kernel", kernel]
    if keyword:
        cmd += ["-k", keyword]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    if not ids:
        raise SystemExit(
            f"nightly: no scenarios collected for {arch}/{accel}:\n{out.stdout}{out.stderr}"
        )
    return ids


def job_data(arches: list[str], accels: list[str]) -> dict[str, Any]:
    """What each cell ran with: QEMU, accelerator decision, guest image."""
    from testbed.errors import TestbedError
    from testbed.host.accel import choose_accel
    from testbed.host.qemu import resolve_qemu
    from testbed.images import ensure_image

    data: dict[str, Any] = {}
    for arch in arches:
        entry: dict[str, Any] = {}
        try:
            qemu = resolve_qemu(arch)
            entry["qemu"] = {"binary": str(qemu.path), "version": qemu.version_str,
                             "source": qemu.source}  # fmt: skip
            entry["accel"] = {}
            for accel in accels:
                try:
                    choice = choose_accel(accel, arch, qemu.path)
                    entry["accel"][accel] = {"runs": choice.name, "why": choice.reason}
                except TestbedError as exc:
                    entry["accel"][accel] = {"runs": None, "why": str(exc)}
            image = ensure_image(arch, log=lambda m: print(m, file=sys.stderr))
            entry["image"] = {"hash": image.content_hash, "kernel": str(image.kernel)}
        except TestbedError as exc:
            entry["error"] = str(exc)
        data[arch] = entry
    return data


def bugs_check(out: Path, arches: list[str]) -> None:
    """`testbed bugs check` per arch, on every vhost-user-base device the QEMU has (which
    bugs reach which device): table and JSON into the job's data."""
    for arch in arches:
        for fmt, name in (([], f"bugs-check-{arch}.txt"), (["--json"], f"bugs-check-{arch}.json")):
            done = subprocess.run(
                [sys.executable, "-m", "testbed", "bugs", "check", "--arch", arch,
                 "--device", "all", *fmt],
                cwd=ROOT, capture_output=True, text=True, check=False,
            )  # fmt: skip
            (out / name).write_text(done.stdout + done.stderr)


def fuzz(out: Path, arches: list[str], minutes: float, seed: int) -> None:
    """`testbed fuzz` for a fixed time per arch, one arch after the other: its table,
    summary.json and findings. The seed changes every night (the date) unless given: each
    night plays new cases, and its summary.json says which seed to replay."""
    for arch in arches:
        run_dir = out / f"fuzz-{arch}"
        done = subprocess.run(
            [sys.executable, "-m", "testbed", "fuzz", "--arch", arch, "--time", f"{minutes}m",
             "--seed", str(seed), "--output", str(run_dir)],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )  # fmt: skip
        (out / f"fuzz-{arch}.txt").write_text(done.stdout + done.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "results" / "nightly"))
    parser.add_argument("--arch", default=",".join(ARCHES))
    parser.add_argument("--accel", default="kvm,tcg")
    parser.add_argument(
        "--kernels",
        default=",".join(sorted({k for arch in ARCHES for k in kernel_names(arch)})),
        help="guest kernels (default: every kernel the images have)",
    )
    parser.add_argument(
        "--no-fresh-boot", dest="fresh_boot", action="store_false",
        help="skip the pass that boots where make e2e restores (default kernel only)",
    )  # fmt: skip
    parser.add_argument("-k", dest="keyword", help="pytest -k expression to select scenarios")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "2")))
    parser.add_argument("--no-bugs-check", dest="bugs_check", action="store_false")
    parser.add_argument(
        "--fuzz-minutes", type=float, default=60.0, help="testbed fuzz per arch (0: none)"
    )
    parser.add_argument(
        "--fuzz-seed", type=int, default=int(time.strftime("%Y%m%d")), help="default: the date"
    )
    args = parser.parse_args()

    # Imported here so that --help works without avocado installed.
    from avocado.core.job import Job
    from avocado.core.nrunner.runnable import Runnable
    from avocado.core.suite import TestSuite

    from testbed.nightly import CASES_ENV, Case, annotate_xunit, write_cases

    arches, accels = args.arch.split(","), args.accel.split(",")
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    kernels = args.kernels.split(",")
    cases = [
        Case(nodeid, arch, accel, kernel)
        for arch in arches
        for accel in accels
        for kernel in kernels
        for nodeid in collect(arch, accel, kernel, args.keyword)
    ]
    if args.fresh_boot:  # the restored scenarios once more, booted for real
        cases += [Case(c.nodeid, c.arch, c.accel, c.kernel, fresh_boot=True)
                  for c in cases if c.kernel == DEFAULT_KERNEL]  # fmt: skip
    cases_file = results / "cases.json"
    uris = write_cases(cases_file, cases)
    os.environ[CASES_ENV] = str(cases_file)  # the runners' processes inherit it
    runnables = [
        Runnable("avocado-instrumented", uri, identifier=case.name)
        for uri, case in zip(uris, cases, strict=True)
    ]
    config = {
        "run.results_dir": str(results),
        "run.max_parallel_tasks": args.workers,
        "job.run.result.xunit.enabled": True,
        "job.run.result.html.enabled": True,
        "job.run.result.json.enabled": True,
        "task.timeout.running": 900,
        "sysinfo.collect.enabled": "off",
    }
    suite = TestSuite(name="scenarios", tests=runnables, config=config)
    with Job(config, [suite]) as job:
        status: int = job.run()
        job_dir = Path(job.logdir)
    data_dir = job_dir / "testbed"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "job.json").write_text(json.dumps(job_data(arches, accels), indent=2) + "\n")
    if args.bugs_check:
        bugs_check(data_dir, arches)
    if args.fuzz_minutes > 0:
        fuzz(data_dir, arches, args.fuzz_minutes, args.fuzz_seed)
    annotated = annotate_xunit(job_dir)
    print(f"nightly: avocado results in {job_dir} (results.html, results.xml, "
          f"{annotated} SKIP/WARN reasons added to results.xml; testbed/job.json)")  # fmt: skip
    return status


if __name__ == "__main__":
    sys.exit(main())
