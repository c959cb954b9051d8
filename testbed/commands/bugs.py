"""`testbed bugs`: the registry of known QEMU bugs, and reproducing them.

testbed bugs [--json]                 list the registry (every field with --json)
testbed bugs reproduce NODEID         rerun one scenario; exit 0 iff it shows its bug
testbed bugs check [ID...] [--arch A|all] [--qemu PATH] [--device TYPE|all] [--json]
                                      run the guest-less reproducers against a QEMU
testbed bugs export ID DIR [--arch A] [--qemu PATH] [--device TYPE]
                                      write README.md, qemu-cmdline.txt, repro.py to DIR
testbed bugs report ID [--arch A] [--qemu PATH] [--device TYPE]
                                      print the upstream-ready report (a fresh run)

--device is the QEMU device type the reproducer plugs (vhost-user-test-device-pci, the
default, vhost-user-rng-pci, ...: every device QEMU builds on vhost-user-base with shared
memory). Not to be confused with pytest's and `testbed exec`'s --backend-device, which
describes the shape (virtio_id=..,num_vqs=..) of the test device a back-end serves.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from testbed.bugs import lookup, registry, select
from testbed.bugs.check import check, exit_code, format_table
from testbed.bugs.export import export, recipe_arch, report
from testbed.bugs.rerun import rerun_scenario
from testbed.commands.common import add_arch_option
from testbed.device import DEVICE_TYPE, VHOST_USER_BASE_DEVICES, base_devices_in
from testbed.errors import ConfigError
from testbed.host.qemu import resolve_qemu
from testbed.machine.probe import device_types
from testbed.machine.profiles import ARCHES
from testbed.machine.qemu import quiet_qmp_logs


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "bugs",
        help="the known QEMU bugs: list, check against a QEMU, reproduce, export",
        description="The registry of known QEMU bugs (testbed/bugs/registry.toml).",
    )
    parser.add_argument("--json", action="store_true", help="every field of every entry")
    parser.set_defaults(func=run_list)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    rep = verbs.add_parser(
        "reproduce",
        help="rerun a scenario (its back-end, faults, QEMU command line, QMP and guest steps)",
        description="Rerun one scenario in a temp dir with fresh ports. Exit 0 if and only "
        "if it failed again: with its known bug's signature when it is marked with one.",
    )
    rep.add_argument("nodeid", help="pytest node id, e.g. 'scenarios/test_x.py::test_y[x86_64]'")
    rep.add_argument(
        "--pytest-arg", action="append", default=[], help="pass one more argument to pytest"
    )
    rep.set_defaults(func=run_reproduce)

    chk = verbs.add_parser(
        "check",
        help="run every bug's guest-less reproducer against the QEMU at hand",
        description="Run the guest-less reproducers (testbed/bugs/recipes.py). Exit 0 only "
        "when every applicable bug reproduced on a QEMU version the registry lists; on a "
        "version it does not list, outcomes are reported, not judged.",
    )
    chk.add_argument("ids", nargs="*", metavar="ID", help="bug ids (default: all)")
    add_arch_option(chk, allow_all=True)
    chk.add_argument("--qemu", metavar="PATH", help="the QEMU binary (needs one --arch)")
    add_device_option(chk, allow_all=True)
    chk.add_argument("--json", action="store_true", help="one JSON object per check")
    chk.set_defaults(func=run_check)

    exp = verbs.add_parser(
        "export",
        help="write an upstream report kit: README.md, qemu-cmdline.txt, stdlib-only repro.py",
        description="Run the bug's reproducer with a trace and write DIR/README.md, "
        "DIR/qemu-cmdline.txt and DIR/repro.py (python3 DIR/repro.py --qemu PATH: exit 0 "
        "iff the bug reproduced; needs nothing but QEMU and Python 3).",
    )
    exp.add_argument("id", metavar="ID", help="bug id")
    exp.add_argument("dir", type=Path, metavar="DIR", help="where to write (created)")
    exp.add_argument("--arch", choices=list(ARCHES), help="default: the bug's first arch")
    exp.add_argument("--qemu", metavar="PATH", help="the QEMU binary to record against")
    add_device_option(exp)
    exp.set_defaults(func=run_export)

    rpt = verbs.add_parser(
        "report",
        help="print an upstream-ready report: what happens, the spec, the reproducer inline",
        description="Run the bug's reproducer and print its report: title, QEMU versions and "
        "architectures seen, what happens and what the spec says should, the minimal "
        "reproducer (command line and steps), the signature, the root cause and its source.",
    )
    rpt.add_argument("id", metavar="ID", help="bug id")
    rpt.add_argument("--arch", choices=list(ARCHES), help="default: the bug's first arch")
    rpt.add_argument("--qemu", metavar="PATH", help="the QEMU binary to record against")
    add_device_option(rpt)
    rpt.set_defaults(func=run_report)


def add_device_option(parser: argparse.ArgumentParser, *, allow_all: bool = False) -> None:
    """--device TYPE: the QEMU device the reproducer plugs (not --backend-device)."""
    choices = [*VHOST_USER_BASE_DEVICES, *(["all"] if allow_all else [])]
    parser.add_argument(
        "--device",
        choices=choices,
        default=DEVICE_TYPE,
        metavar="TYPE",
        help="the QEMU device type (default %(default)s; "
        + ("'all': every one this QEMU has; " if allow_all else "")
        + "one of: "
        + ", ".join(VHOST_USER_BASE_DEVICES)
        + "). Not pytest's --backend-device (the test device's shape).",
    )


def run_list(args: argparse.Namespace) -> int:
    bugs = list(registry().values())
    if args.json:
        print(json.dumps([b.to_json() for b in bugs], indent=2))
        return 0
    width = max(len(b.id) for b in bugs)
    print(f"{'id':<{width}}  {'seen on':<8}  {'arches':<15}  guest  title")
    for bug in bugs:
        guest = "yes" if bug.needs_guest else "no"
        print(
            f"{bug.id:<{width}}  {','.join(bug.versions):<8}  {','.join(bug.arches):<15}  "
            f"{guest:<5}  {bug.title}"
        )
        print(textwrap.indent(f"signature: {bug.signature()}", " " * (width + 2)))
    return 0


def run_reproduce(args: argparse.Namespace) -> int:
    if "::" not in args.nodeid:
        raise ConfigError(f"{args.nodeid!r} is not a pytest node id (path::test[params])")
    result = rerun_scenario(args.nodeid, args.pytest_arg)
    print(result.summary(), file=sys.stdout if result.reproduced else sys.stderr)
    return 0 if result.reproduced else 1


def _qemus(arches: list[str], explicit: str | None) -> dict[str, tuple[Path, str]]:
    """arch -> (binary, version), resolved as everywhere else (--qemu beats the rest)."""
    resolved = {}
    for arch in arches:
        binary = resolve_qemu(arch, explicit)
        resolved[arch] = (binary.path, binary.version_str)
    return resolved


def run_check(args: argparse.Namespace) -> int:
    quiet_qmp_logs()
    select(args.ids)  # unknown ids fail before any QEMU starts
    arches = list(ARCHES) if args.arch == "all" else [args.arch]
    if args.qemu and len(arches) > 1:
        raise ConfigError("--qemu names one binary: give its --arch too")
    qemus = _qemus(arches, args.qemu)
    devices = [args.device]
    if args.device == "all":
        devices = base_devices_in(device_types(qemus[arches[0]][0]))
    rows = [row for device in devices for row in check(args.ids, arches, qemus, device)]
    if args.json:
        print(json.dumps([row.to_json() for row in rows], indent=2))
    else:
        print(format_table(rows), end="")
    return exit_code(rows)


def run_export(args: argparse.Namespace) -> int:
    quiet_qmp_logs()
    bug = lookup(args.id)
    arch = recipe_arch(bug, args.arch)
    path, version = _qemus([arch], args.qemu)[arch]
    done = export(bug.id, args.dir, arch, path, version, args.device)
    seen = done.outcome.evidence.headline() if done.outcome.evidence else ""
    print(f"{bug.id} reproduced on QEMU {version} ({arch}): {seen}")
    for file in done.files:
        print(f"  wrote {file}")
    print(f"run: python3 {done.directory / 'repro.py'} --qemu {path}")
    return 0


def run_report(args: argparse.Namespace) -> int:

    quiet_qmp_logs()
    bug = lookup(args.id)
    arch = recipe_arch(bug, args.arch)
    path, version = _qemus([arch], args.qemu)[arch]
    print(report(bug.id, arch, path, version, args.device), end="")
    return 0
