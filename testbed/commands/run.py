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
from testbed.device import (
    OurBackend,
    ShmemLayout,
    VhostUserDevice,
    backend_choice,
    parse_device_options,
)
from testbed.errors import ConfigError
from testbed.vm import GuestOptions, GuestVM


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
    parser.add_argument(
        "--backend-cmd",
        metavar="'PROGRAM ARGS... {socket}'",
        help="a vhost-user back-end we did not write: started by the test bed (split like a "
        "shell would, but no shell runs it; {socket} is replaced by the socket path), "
        "stopped at the end, its output kept; QEMU reaches it through the relay, which "
        "traces and checks both sides and, with --region, offers those regions itself",
    )
    parser.add_argument(
        "--backend-socket",
        type=Path,
        metavar="PATH",
        help="an already running vhost-user back-end listening on PATH (through the relay)",
    )
    parser.add_argument(
        "--backend-device",
        default="",
        metavar="virtio_id=N,num_vqs=N,vq_size=N,config_size=N",
        help="what the device looks like (default virtio_id=26,num_vqs=1): the same syntax "
        "as pytest's --backend-device",
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
    parser.add_argument(
        "--kernel",
        metavar="NAME",
        help="the guest kernel, a recipe kernel (6.1, 6.12; default: the images' default)",
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


def device_of(args: argparse.Namespace) -> VhostUserDevice | None:
    """The device the options describe: --region served by our back-end, or the back-end
    given by --backend-cmd/--backend-socket (with the regions injected by the relay); None
    without either (a guest with no vhost-user device)."""
    choice = backend_choice(args.backend_cmd, args.backend_socket)
    options = parse_device_options(args.backend_device)
    if not args.region and isinstance(choice, OurBackend):
        if options:
            raise ConfigError("--backend-device without --region or a back-end: no device")
        return None
    return VhostUserDevice.of(ShmemLayout.parse(args.region), backend=choice, **options)


def injection_note(device: VhostUserDevice | None) -> str | None:
    """What a user must know when the relay injects regions in front of their back-end
    (--region with --backend-cmd/--backend-socket); None otherwise."""
    if device is None or device.ours or not device.layout:
        return None
    return (
        f"testbed: regions {device.layout.describe()} are injected by the relay unless your "
        "back-end offers VHOST_USER_PROTOCOL_F_SHMEM itself: QEMU and the guest then see "
        "them, but an injected region is one your back-end will never map (SHMEM_MAP "
        "comes from the back-end only). A guest driver that relies on it finds nothing "
        "there: virtio-fs mounts -o dax=always and every read then fails with ENOSYS, "
        "because a back-end without DAX (virtiofsd) refuses FUSE_SETUPMAPPING, which "
        "travels in the virtqueues where the relay cannot see it."
    )


def _vm(args: argparse.Namespace) -> GuestVM:
    device = device_of(args)
    note = injection_note(device)
    if note is not None:
        print(note, file=sys.stderr)  # stdout is the guest command's
    return GuestVM(
        args.arch,
        *([device] if device is not None else []),
        options=GuestOptions(boot_timeout=args.boot_timeout, kernel=args.kernel),
        accel=args.accel,
        qemu=explicit_qemu(args, args.arch),
        artifacts_dir=args.keep_artifacts,
    )


def _load_modules(vm: GuestVM, args: argparse.Namespace) -> None:
    if args.load_modules:
        specs = [spec.partition(":") for spec in args.load_modules]
        params = {name: extra for name, _, extra in specs if extra}
        vm.guest.load_modules(*(name for name, _, _ in specs), params=params)


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
