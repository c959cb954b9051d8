"""`testbed fuzz`: the back-end as a state-aware fuzzer of QEMU's vhost-user front-end."""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from testbed.commands.common import add_arch_option
from testbed.device import DEVICE_TYPE, VHOST_USER_BASE_DEVICES
from testbed.errors import ConfigError
from testbed.fuzz import corpus
from testbed.fuzz.grammar import Case
from testbed.fuzz.run import Campaign, replay, table
from testbed.host import debugger
from testbed.host.qemu import resolve_qemu
from testbed.paths import results_dir


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1h' -> seconds."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not found:
        raise argparse.ArgumentTypeError(f"duration {text!r}: use e.g. 90s, 10m, 1h")
    return float(found[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[found[2]]


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "fuzz",
        help="fuzz QEMU's vhost-user front-end from the back-end side (no guest)",
        description="Play seeded, state-aware cases against guest-less QEMUs: feature "
        "offers, GET_SHMEM_CONFIG replies, bent replies to QEMU's requests and back-end "
        "channel requests (SHMEM_MAP/UNMAP, ...) at chosen moments of the device's life. "
        "Crashes, hangs, fd leaks and oracle violations are findings, matched against the "
        "known-bug registry; new ones are minimised into results/fuzz/<run>/findings/.",
    )
    add_arch_option(parser)
    parser.add_argument("--time", type=parse_duration, default=600.0, help="e.g. 10m")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=int, help="stop after this many cases")
    parser.add_argument("--qemu", metavar="PATH", help="the QEMU binary for --arch")
    parser.add_argument(
        "--device",
        choices=list(VHOST_USER_BASE_DEVICES),
        default=DEVICE_TYPE,
        metavar="TYPE",
        help="the QEMU device every case plugs (default %(default)s; one of: "
        + ", ".join(VHOST_USER_BASE_DEVICES)
        + "). Not pytest's --backend-device (the test device's shape).",
    )
    parser.add_argument("--output", type=Path, help="run directory (default results/fuzz/...)")
    parser.add_argument("--no-minimise", action="store_true", help="save new cases as found")
    parser.add_argument(
        "--replay", type=Path, metavar="CASE.json", help="play one case; exit 1 on a finding"
    )
    parser.add_argument(
        "--record",
        type=Path,
        metavar="ENTRY.json",
        help="with --replay: save the case and the signatures it showed as a corpus entry",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.verbose:
        # QEMUs die by the hundred here: their QMP and our back-end's complaints are noise.
        for name in ("qemu.qmp", "testbed.vhost_user", "testbed.machine"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if args.replay is not None:
        case = Case.load(args.replay)
        binary = resolve_qemu(case.arch, args.qemu)
        # Under a debugger when there is one: a silent crash's site without the kernel log.
        found = replay(case, binary.path, debug=debugger.available())
        for f in found:
            tag = f"known {f.known}" if f.known else "NEW"
            print(f"[{tag}] {f.signature}  (at {f.where})")
        if not found:
            print("no finding: QEMU ran the case clean")
        if args.record is not None:
            corpus.save(args.record, case, found)
            print(f"corpus entry: {args.record}")
        return 1 if found else 0
    binary = resolve_qemu(args.arch, args.qemu)
    version = ".".join(str(v) for v in binary.version)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    short = args.device.removeprefix("vhost-user-").removesuffix("-pci")
    outdir = args.output or results_dir() / "fuzz" / f"{stamp}-{args.arch}-{short}-seed{args.seed}"
    if args.time <= 0:
        raise ConfigError("--time must be positive")
    campaign = Campaign(
        args.arch,
        binary.path,
        version,
        args.seed,
        args.time,
        outdir,
        minimise=not args.no_minimise,
        max_cases=args.cases,
        device=args.device,
    )
    summary = campaign.run()
    print(table(summary))
    print(f"\nsummary: {outdir / 'summary.json'}")
    print(json.dumps({"cases": summary["cases"], "signatures": len(summary["signatures"])}))
    return 0
