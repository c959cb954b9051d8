"""`testbed images`: build the guest images (build) and describe a built one (show)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from testbed.commands.common import ARCHES, add_arch_option
from testbed.errors import ConfigError


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "images",
        help="build or show the guest images (Debian packages, no root)",
        description="Guest images: a Debian kernel and a tiny initramfs with busybox, "
        "dropbear and lspci, built from Debian packages without root and cached.",
    )
    actions = parser.add_subparsers(dest="images_command", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="build (or find cached) images")
    add_arch_option(build, allow_all=True)
    build.add_argument(
        "--refresh",
        action="store_true",
        help="re-read the Debian suite (apt-get update) and rebuild if a package changed",
    )
    build.set_defaults(func=run_build)

    show = actions.add_parser("show", help="describe the cached image of one architecture")
    add_arch_option(show)
    show.add_argument("--json", action="store_true", help="print as JSON")
    show.set_defaults(func=run_show)


def _progress(line: str) -> None:
    print(line, flush=True)


def run_build(args: argparse.Namespace) -> int:
    from testbed.images import ensure_image

    arches = ARCHES if args.arch == "all" else (args.arch,)
    for arch in arches:
        started = time.monotonic()
        image = ensure_image(arch, log=_progress, refresh=args.refresh)
        print(f"{arch}: {image.kernel.parent} ({time.monotonic() - started:.1f} s)", flush=True)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from testbed.images import image_summary, load_image

    image = load_image(args.arch)
    if image is None:
        raise ConfigError(
            f"no {args.arch} image built from the current recipe; "
            f"run `testbed images build --arch {args.arch}`"
        )
    if args.json:
        json.dump(image_summary(image), sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    rows = [
        ("arch", image.arch),
        ("content hash", image.content_hash),
        ("kernel", str(image.kernel)),
        ("initrd", str(image.initrd)),
        ("client key", str(image.client_key)),
        ("host public key", str(image.host_public_key)),
        ("host key line", image.host_key_line),
        ("kernel cmdline", image.cmdline),
        ("ready line", image.ready_line),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("packages:")
    for name, version in image.packages.items():
        print(f"  {name:<40} {version}")
    return 0
