"""`testbed bench`: boot-to-SSH, scenario and suite times against the floor (issue 8)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from testbed.bench import BenchOptions, run_bench
from testbed.commands.common import ARCHES, add_accel_option
from testbed.paths import results_dir


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "bench",
        help="measure boot-to-SSH, a scenario and the suite against bare QEMU (the floor)",
        description="The benchmark: each figure is the median of several runs (with min "
        "and max), ratios are taken within one run. Writes bench.json, bench.txt and "
        "bench-boot.png (where the time of one boot goes). Reports targets, never fails "
        "on them.",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="directory for bench.json, the table and the chart (default: results/)",
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="runs per figure (default: %(default)s)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="skip the e2e suite (minutes) and the fresh, network-bound builds",
    )
    parser.add_argument(
        "--arch",
        choices=[*ARCHES, "all"],
        default="all",
        help="guest architecture(s) to boot (default: %(default)s)",
    )
    add_accel_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = BenchOptions(
        output=(args.output or results_dir()).resolve(),
        runs=args.runs,
        quick=args.quick,
        arches=ARCHES if args.arch == "all" else (args.arch,),
        accel=args.accel,
    )
    run_bench(options, say=lambda line: print(line, flush=True))
    return 0
