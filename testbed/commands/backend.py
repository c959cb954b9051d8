"""`testbed backend`: run the vhost-user back-end in the foreground for a hand-started QEMU."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from testbed.commands.common import ARCHES
from testbed.device import ShmemLayout
from testbed.errors import ConfigError
from testbed.machine.cmdline import attach_options
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.codes import F_SHMEM
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.trace import TraceEntry


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "backend",
        help="run the vhost-user back-end in the foreground",
        description="Serve VIRTIO shared memory regions to a QEMU you start yourself. Prints "
        "the QEMU options that attach to it, logs every vhost-user message on stderr, and "
        "stops cleanly (removing its socket) on Ctrl-C.",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="UNIX socket to listen on; its directory must be private (mode 0700). "
        "Default: a fresh private directory under /tmp",
    )
    parser.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="SHMID=SIZE",
        help="a shared memory region (repeatable), e.g. --region 0=4M --region 3=4M",
    )
    parser.add_argument("--trace", type=Path, metavar="FILE", help="write a JSON-lines trace")
    parser.add_argument(
        "--no-shmem",
        action="store_true",
        help="do not offer VHOST_USER_PROTOCOL_F_SHMEM (QEMU then never asks for regions)",
    )
    parser.add_argument(
        "--shmem-bit",
        type=int,
        default=F_SHMEM,
        metavar="N",
        help="protocol feature bit to offer SHMEM at (default: %(default)s, as QEMU 11.1)",
    )
    parser.add_argument(
        "--connect",
        action="store_true",
        help="connect to QEMU's socket (chardev server=on) instead of listening",
    )
    parser.set_defaults(func=run_backend)


def qemu_options_text(socket_path: Path) -> str:
    lines = []
    for arch in ARCHES:
        options = attach_options(arch, socket_path)
        lines.append(f"# qemu-system-{arch}:\n  " + shlex.join(options))
    return "\n".join(lines)


def _log_entry(entry: TraceEntry) -> None:
    print(entry.one_line(), file=sys.stderr, flush=True)


def run_backend(args: argparse.Namespace) -> int:
    layout = ShmemLayout.parse(args.region)
    faults = Faults(no_shmem=args.no_shmem, shmem_bit=args.shmem_bit)
    owned_dir: Path | None = None
    socket_path: Path | None = args.socket
    if socket_path is None:
        owned_dir = make_private_dir("backend")
        socket_path = owned_dir / "vhost-user.sock"
    elif args.connect and not socket_path.exists():
        raise ConfigError(f"--connect: {socket_path} does not exist; start QEMU first")
    try:
        backend = Backend(
            socket_path,
            layout,
            trace_path=args.trace,
            faults=faults,
            connect=args.connect,
            on_message=_log_entry,
        )
        with backend:
            mode = "connecting to" if args.connect else "listening on"
            print(f"vhost-user back-end {mode} {socket_path}", file=sys.stderr)
            print(f"regions: {layout.describe()} (BAR 4: {layout.total} bytes)", file=sys.stderr)
            if not args.connect:
                print("attach QEMU with:", file=sys.stderr)
                print(qemu_options_text(socket_path), flush=True)
            backend.serve_forever()
    finally:
        if owned_dir is not None:
            remove_tree(owned_dir)
    return 0
