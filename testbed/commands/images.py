"""`testbed images`: build the guest images (build) and describe a built one (show)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from testbed.commands.common import ARCHES, add_arch_option
from testbed.errors import ConfigError
from testbed.images import ensure_image, image_summary, kernel_names, load_image
from testbed.images.recipe import DEFAULT_KERNEL


def _add_kernel_option(parser: argparse.ArgumentParser, default: str) -> None:
    # Free text, not choices: the names live in images/<arch>.json ("kernels"), and the
    # recipe's error lists the ones an architecture has.
    parser.add_argument(
        "--kernel",
        default=default,
        metavar="NAME|all",
        help="which of the recipe's kernels, e.g. 6.1 or 6.12, or all (default: %(default)s)",
    )


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "images",
        help="build or show the guest images (Debian packages, no root)",
        description="Guest images: a Debian kernel and a tiny initramfs with busybox, "
        "dropbear and lspci, built from Debian packages without root and cached; one image "
        "per architecture and kernel.",
    )
    actions = parser.add_subparsers(dest="images_command", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="build (or find cached) images")
    add_arch_option(build, allow_all=True)
    _add_kernel_option(build, "all")
    build.add_argument(
        "--refresh",
        action="store_true",
        help="re-read the Debian suites (apt-get update) and rebuild if a package changed",
    )
    build.set_defaults(func=run_build)

    show = actions.add_parser("show", help="describe the cached image of one architecture")
    add_arch_option(show)
    _add_kernel_option(show, DEFAULT_KERNEL)
    show.add_argument("--json", action="store_true", help="print as JSON")
    show.set_defaults(func=run_show)


def _progress(line: str) -> None:
    print(line, flush=True)


def _kernels(arch: str, choice: str) -> tuple[str, ...]:
    names = kernel_names(arch)
    if choice == "all":
        return names
    if choice not in names:
        raise ConfigError(
            f"no kernel {choice!r} for {arch}: use one of {', '.join(names)} or all "
            f"(images/{arch}.json, 'kernels')"
        )
    return (choice,)


def run_build(args: argparse.Namespace) -> int:
    arches = ARCHES if args.arch == "all" else (args.arch,)
    for arch in arches:
        for name in _kernels(arch, args.kernel):
            started = time.monotonic()
            image = ensure_image(arch, log=_progress, refresh=args.refresh, kernel=name)
            print(
                f"{arch} ({image.kernel_name}, {image.kernel_release}): {image.kernel.parent} "
                f"({time.monotonic() - started:.1f} s)",
                flush=True,
            )
    return 0


def run_show(args: argparse.Namespace) -> int:
    images = []
    for name in _kernels(args.arch, args.kernel):
        image = load_image(args.arch, name)
        if image is None:
            raise ConfigError(
                f"no {args.arch} image with kernel {name} built from the current recipe; "
                f"run `testbed images build --arch {args.arch} --kernel {name}`"
            )
        images.append(image)
    if args.json:
        data: Any = [image_summary(i) for i in images]
        json.dump(data if args.kernel == "all" else data[0], sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    for n, image in enumerate(images):
        if n:
            print()
        _print_image(image)
    return 0


def _print_image(image: Any) -> None:
    rows = [
        ("arch", image.arch),
        ("kernel name", image.kernel_name),
        ("kernel version", f"{image.kernel_version} (uname -r: {image.kernel_release})"),
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
