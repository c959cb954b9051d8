"""Options shared by several sub-commands (QEMU selection, accelerator, architecture)."""

from __future__ import annotations

import argparse

from testbed.machine.profiles import ARCHES


def add_arch_option(parser: argparse.ArgumentParser, allow_all: bool = False) -> None:
    choices = [*ARCHES, "all"] if allow_all else list(ARCHES)
    parser.add_argument(
        "--arch",
        choices=choices,
        default="all" if allow_all else "x86_64",
        help="guest architecture (default: %(default)s)",
    )


def add_qemu_options(parser: argparse.ArgumentParser) -> None:
    """--qemu-x86_64 / --qemu-aarch64: an explicit QEMU binary (beats env, PATH, cache)."""
    for arch in ARCHES:
        parser.add_argument(
            f"--qemu-{arch}",
            dest=f"qemu_{arch}",
            metavar="PATH",
            help=f"qemu-system-{arch} to use (else $TESTBED_QEMU_{arch.upper()}, "
            "a suitable one on PATH, or the provisioned one)",
        )


def add_accel_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        default="auto",
        help="accelerator; auto picks KVM only where it really works (default: auto)",
    )


def explicit_qemu(args: argparse.Namespace, arch: str) -> str | None:
    return getattr(args, f"qemu_{arch}", None)
