"""`testbed qemu provision|show`: install QEMU 11.1 into the cache, show which QEMU is used."""

from __future__ import annotations

import argparse
import json
from typing import Any

from testbed.commands.common import ARCHES, add_qemu_options, explicit_qemu
from testbed.errors import TestbedError
from testbed.host.qemu import provision, qemu_root, read_stamp, resolve_qemu


def register(sub: Any) -> None:
    parser = sub.add_parser("qemu", help="provision QEMU 11.1 or show which QEMU is used")
    actions = parser.add_subparsers(dest="qemu_command", metavar="ACTION", required=True)

    prov = actions.add_parser(
        "provision",
        help="build a Debian sid sysroot with QEMU 11.1 in the cache (idempotent)",
        description="Build cache/qemu (sysroot + bin/ wrappers). Does nothing when present.",
    )
    prov.add_argument(
        "--install-missing",
        action="store_true",
        help="first apt-get install the host packages it needs (mmdebstrap, ...) as root",
    )
    prov.set_defaults(func=run_provision)

    show = actions.add_parser("show", help="which QEMU each architecture resolves to")
    add_qemu_options(show)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=run_show)


def run_provision(args: argparse.Namespace) -> int:
    paths = provision(log=print, install_missing=args.install_missing)
    for arch, path in paths.items():
        print(f"{arch}: {path}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {"qemu": {}, "provisioned": None}
    failed = False
    for arch in ARCHES:
        try:
            binary = resolve_qemu(arch, explicit_qemu(args, arch))
        except TestbedError as exc:
            out["qemu"][arch] = {"error": str(exc)}
            failed = True
            continue
        out["qemu"][arch] = {
            "path": str(binary.path),
            "version": binary.version_str,
            "source": binary.source,
        }
    stamp = read_stamp()
    if stamp is not None:
        out["provisioned"] = {
            "root": str(qemu_root()),
            "created": stamp.created,
            "packages": stamp.packages,
            "adopted": stamp.adopted,
        }
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return 1 if failed else 0
    for arch, entry in out["qemu"].items():
        if "error" in entry:
            print(f"{arch:8} error: {entry['error']}")
        else:
            print(f"{arch:8} {entry['version']:8} {entry['source']:12} {entry['path']}")
    prov = out["provisioned"]
    if prov is None:
        print(f"provisioned: none in {qemu_root()} (run `testbed qemu provision`)")
    else:
        pkgs = ", ".join(f"{k} {v}" for k, v in sorted(prov["packages"].items()))
        print(f"provisioned: {prov['root']}, made {prov['created']}: {pkgs}")
    return 1 if failed else 0
