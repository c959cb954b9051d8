"""`testbed exec` and `testbed shell`: boot a guest, run one command (or a shell), tear down."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from testbed.commands.common import (
    add_accel_option,
    add_arch_option,
    add_qemu_options,
    explicit_qemu,
)
from testbed.errors import ConfigError


def _add_vm_options(parser: argparse.ArgumentParser) -> None:
    add_arch_option(parser)
    add_accel_option(parser)
    add_qemu_options(parser)
    parser.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="SHMID=SIZE",
        help="a shared memory region served by our vhost-user back-end (repeatable; "
        "e.g. --region 0=4M --region 1=4M); without it no vhost-user device is added",
    )
    foreign = parser.add_mutually_exclusive_group()
    foreign.add_argument(
        "--backend-cmd",
        metavar="'PROGRAM ARGS... {socket}'",
        help="a vhost-user back-end we did not write: started by the test bed (split like a "
        "shell would, but no shell runs it; {socket} is replaced by the socket path), "
        "stopped at the end, its output kept; QEMU reaches it through the relay, which "
        "traces and checks both sides and, with --region, offers those regions itself",
    )
    foreign.add_argument(
        "--backend-socket",
        type=Path,
        metavar="PATH",
        help="an already running vhost-user back-end listening on PATH (through the relay)",
    )
    parser.add_argument(
        "--virtio-id", type=int, default=None, help="the device's virtio id (default 26)"
    )
    parser.add_argument("--num-vqs", type=int, default=1, help="virtqueues (default 1)")
    parser.add_argument("--vq-size", type=int, default=None, help="virtqueue size")
    parser.add_argument(
        "--config-size", type=int, default=None, help="bytes of device config space"
    )
    parser.add_argument(
        "--load-modules",
        action="append",
        default=[],
        metavar="NAME[:PARAMS]",
        help="insmod an optional guest driver before COMMAND (repeatable; e.g. virtiofs, "
        "virtio_blk, or virtiofs:dyndbg=+p for its debug lines; the image carries them "
        "under /extra)",
    )
    parser.add_argument(
        "--keep-artifacts",
        type=Path,
        metavar="DIR",
        help="keep the command line, console, QMP log, QEMU stderr, vhost-user trace and "
        "reproduce.sh in DIR (else they are kept under results/failed/ only on failure)",
    )
    parser.add_argument(
        "--boot-timeout", type=float, default=90.0, metavar="S", help="seconds to SSH"
    )


def register(sub: Any) -> None:
    exec_parser = sub.add_parser(
        "exec",
        help="boot a guest, run a command in it over SSH, exit with its status",
        description="Boot a guest (with a vhost-user device when --region is given), run "
        "COMMAND over SSH, pass its stdout/stderr through as bytes and exit with its status.",
    )
    _add_vm_options(exec_parser)
    exec_parser.add_argument("--timeout", type=float, default=600.0, help="command timeout (s)")
    exec_parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND...")
    exec_parser.set_defaults(func=run_exec)

    shell_parser = sub.add_parser(
        "shell",
        help="boot a guest and open an interactive shell in it",
        description="Boot a guest and open an interactive SSH shell; everything is torn "
        "down when the shell exits.",
    )
    _add_vm_options(shell_parser)
    shell_parser.set_defaults(func=run_shell)


def _regions(specs: list[str]) -> Any:
    if not specs:
        return None
    from testbed.device import ShmemLayout

    return ShmemLayout.parse(specs)


def _vm(args: argparse.Namespace) -> Any:
    from testbed.device import DEFAULT_VIRTIO_ID
    from testbed.vm import GuestVM

    return GuestVM(
        args.arch,
        regions=_regions(args.region),
        accel=args.accel,
        qemu=explicit_qemu(args, args.arch),
        artifacts_dir=args.keep_artifacts,
        boot_timeout=args.boot_timeout,
        backend_cmd=args.backend_cmd,
        backend_socket=args.backend_socket,
        virtio_id=DEFAULT_VIRTIO_ID if args.virtio_id is None else args.virtio_id,
        num_vqs=args.num_vqs,
        vq_size=args.vq_size,
        config_size=args.config_size,
    )


def _load_modules(vm: Any, args: argparse.Namespace) -> None:
    if args.load_modules:
        specs = [spec.partition(":") for spec in args.load_modules]
        params = {name: extra for name, _, extra in specs if extra}
        vm.load_modules(*(name for name, _, _ in specs), params=params)


def run_exec(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ConfigError("no command given: use `testbed exec [options] -- COMMAND...`")
    # One word is taken as a shell command line (`-- 'ls | wc -l'`); several as argv.
    command: str | list[str] = argv[0] if len(argv) == 1 else argv
    with _vm(args) as vm:
        _load_modules(vm, args)
        result = vm.run(command, timeout=args.timeout)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.buffer.flush()
    return result.returncode


def run_shell(args: argparse.Namespace) -> int:
    with _vm(args) as vm:
        _load_modules(vm, args)
        return int(vm.ssh.interactive())
