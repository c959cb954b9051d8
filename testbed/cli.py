"""The `testbed` command: one sub-command per job, each in testbed/commands/."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from testbed import __version__
from testbed.commands import backend, bench, bugs, doctor, fuzz, images, qemu, run
from testbed.errors import TestbedError

COMMAND_MODULES = (doctor, qemu, images, backend, run, bench, bugs, fuzz)


class Terminated(BaseException):
    """SIGTERM turned into an exception so that every `finally` and `with` tears down."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testbed",
        description="End-to-end test bed for VIRTIO Shared Memory Regions over vhost-user.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result: int = args.func(args)
        return result
    except TestbedError as exc:
        print(f"testbed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"testbed {args.command}: interrupted; torn down", file=sys.stderr)
        return 130
    except Terminated:
        print(f"testbed {args.command}: terminated; torn down", file=sys.stderr)
        return 143
