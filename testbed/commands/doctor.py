"""`testbed doctor`: can this host run the suite (table, or --json), and what to do."""

from __future__ import annotations

import argparse
import json
from typing import Any

from testbed.commands.common import ARCHES, add_qemu_options, explicit_qemu
from testbed.host import doctor


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "doctor",
        help="check Python, QEMU, KVM, host packages, guest images and the cache",
        description="Check what the suite needs on this host. Exit 0: it can run; 1: it cannot.",
    )
    add_qemu_options(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--no-shmem-probe",
        dest="shmem_probe",
        action="store_false",
        help="skip the GET_SHMEM_CONFIG probe against each QEMU",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = doctor.collect(
        {arch: explicit_qemu(args, arch) for arch in ARCHES}, shmem_probe=args.shmem_probe
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print(doctor.render_table(report))
    return 0 if report.ok else 1
