"""`testbed bugs`: the registry of known QEMU bugs, and reproducing them.

testbed bugs [--json]                 list the registry (every field with --json)
testbed bugs reproduce NODEID         rerun one scenario; exit 0 iff it shows its bug
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any

from testbed.errors import ConfigError


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


def run_list(args: argparse.Namespace) -> int:
    from testbed.bugs import registry

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
    from testbed.bugs.rerun import rerun_scenario

    if "::" not in args.nodeid:
        raise ConfigError(f"{args.nodeid!r} is not a pytest node id (path::test[params])")
    result = rerun_scenario(args.nodeid, args.pytest_arg)
    print(result.summary(), file=sys.stdout if result.reproduced else sys.stderr)
    return 0 if result.reproduced else 1
