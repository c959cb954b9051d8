"""The relay (testbed/vhost_user/relay.py): its pure checks, and QEMU <-> relay <-> our
Backend without a guest, where the relay must change nothing QEMU sees."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.device import ForeignCommand, ForeignSocket, ShmemLayout, VhostUserDevice
from testbed.errors import ConfigError, PeerClosed, QemuExited, TestbedError
from testbed.host.foreign import ForeignBackend, build_argv
from testbed.host.qemu import resolve_qemu
from testbed.machine import QtestConfig, QtestMachine
from testbed.machine.probe import pci_bar
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user import connection as conn_mod
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.codes import ProtocolFeature, Request
from testbed.vhost_user.connection import Listener
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import REPLY_REQUESTS, U64, Header
from testbed.vhost_user.relay import Relay
from testbed.vhost_user.rules import (
    OLD_SHMEM_DETAIL,
    SHMEM,
)
from testbed.vhost_user.shmem import Memfd
from testbed.vhost_user.trace import TraceEntry

M = 1 << 20
TIMEOUT = 20.0


# --- QEMU <-> relay <-> Backend -----------------------------------------------------------


def _qemu(arch: str) -> Path:
    try:
        return resolve_qemu(arch).path
    except TestbedError as exc:
        pytest.skip(f"no QEMU 11.1 for {arch}: {exc}")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = make_private_dir("test-relay")
    yield path
    remove_tree(path)


def _machine(socket: Path) -> QtestMachine:
    device = VhostUserDevice("vu0", socket)
    return QtestMachine(QtestConfig("x86_64", _qemu("x86_64"), (device,), qtest=False))


def _shape(entries: list[TraceEntry]) -> list[tuple[Any, ...]]:
    """A trace without its timestamps."""
    return [(e.direction, e.request, e.flags, e.size, e.payload, e.fds) for e in entries]


@pytest.mark.qemu
def test_relay_changes_nothing_for_qemu(sockdir: Path) -> None:
    layout = ShmemLayout({0: 2 * M, 1: 2 * M})
    with (
        Backend(sockdir / "be.sock", layout) as backend,
        Relay(sockdir / "vu.sock", sockdir / "be.sock", trace_path=sockdir / "r.jsonl") as relay,
        _machine(sockdir / "vu.sock").start() as qemu,
    ):
        backend.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
        bar4 = pci_bar(qemu.pci_device(), 4)
        assert bar4 is not None and bar4["size"] == layout.total
        # QMP answered: realize is over; both traces saw the same messages.
        assert _shape(relay.trace.entries()) == _shape(backend.trace.entries())
        assert relay.session is not None and relay.session.served == dict(layout.regions)
    assert relay.violations == []
    assert backend.violations == []
    assert (sockdir / "r.jsonl").read_text().count("\n") == len(relay.trace.entries())
    assert not (sockdir / "vu.sock").exists()


@pytest.mark.qemu
def test_relay_reports_shmem_at_bit_21(sockdir: Path) -> None:
    faults = Faults(shmem_bit=21)
    with (
        Backend(sockdir / "be.sock", ShmemLayout({0: 4 * M}), faults=faults) as backend,
        Relay(sockdir / "vu.sock", sockdir / "be.sock") as relay,
        _machine(sockdir / "vu.sock").start() as qemu,
    ):
        backend.wait_for_request(Request.SET_VRING_ERR, TIMEOUT)
        assert pci_bar(qemu.pci_device(), 4) is None
    assert [(v.request, v.rule, v.detail) for v in relay.violations] == [
        ("GET_PROTOCOL_FEATURES", "shmem-bit", OLD_SHMEM_DETAIL)
    ]
    (entry,) = [e for e in relay.trace.entries() if e.violations]
    assert entry.name == "GET_PROTOCOL_FEATURES"


@pytest.mark.qemu
def test_relay_injects_shmem_in_front_of_a_backend_without_it(sockdir: Path) -> None:
    """The back-end offers no SHMEM; the relay offers it and answers request 44 itself."""
    layout = ShmemLayout({0: 4 * M, 2: 4 * M})
    with (
        Backend(sockdir / "be.sock", ShmemLayout(), faults=Faults(no_shmem=True)) as backend,
        Relay(sockdir / "vu.sock", sockdir / "be.sock", inject=layout) as relay,
        _machine(sockdir / "vu.sock").start() as qemu,
    ):
        relay.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
        bar4 = pci_bar(qemu.pci_device(), 4)
        assert bar4 is not None and bar4["size"] == layout.total
        assert Request.GET_SHMEM_CONFIG not in backend.requests_seen
        session = backend.session
        assert session is not None and not session.protocol_features & SHMEM
    # The back-end never saw SHMEM acked, so it flagged nothing either.
    assert backend.violations == []
    assert relay.violations == []


@pytest.mark.qemu
def test_back_end_channel_is_relayed_and_checked(sockdir: Path) -> None:
    """SHMEM_MAP/UNMAP go back-end -> relay -> QEMU over the relay's own socketpair; a MAP
    past its region reaches QEMU unchanged (refused there) and is flagged by the relay."""
    layout = ShmemLayout({0: 2 * M, 1: 2 * M})
    config = QtestConfig("x86_64", _qemu("x86_64"), (VhostUserDevice("vu0", sockdir / "vu.sock"),))
    with (
        Backend(sockdir / "be.sock", layout) as backend,
        Relay(sockdir / "vu.sock", sockdir / "be.sock") as relay,
        QtestMachine(config).start() as qemu,
        Memfd(M) as mem,
    ):
        backend.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
        pci = qemu.pci()
        assert qemu.qtest is not None
        pci.start_device()
        backend.wait_driver_ok(TIMEOUT)
        mem.write(0, b"through the relay")
        assert backend.map(1, 0, M, mem.fileno()) == 0
        assert qemu.qtest.read(pci.bars[4] + layout.offsets()[1], 17) == b"through the relay"
        assert backend.map(0, M, 2 * M, mem.fileno()) != 0  # past the end of region 0
        assert backend.unmap(1, 0, M) == 0
        channel = [e for e in relay.trace.entries() if e.direction.startswith("backend-channel")]
        assert [e.name for e in channel] == ["SHMEM_MAP"] * 4 + ["SHMEM_UNMAP"] * 2
    assert [(v.request, v.rule) for v in relay.violations] == [("SHMEM_MAP", "shmem-map")]
    assert backend.violations == []


# --- a back-end we did not start ourselves (testbed.host.foreign) ------------------


def test_build_argv_substitutes_the_socket_without_a_shell() -> None:
    words = ForeignCommand.of("prog --socket-path={socket} 'a b' $HOME;ls").template
    argv = build_argv(words, Path("/s/x.sock"))
    assert argv == ["prog", "--socket-path=/s/x.sock", "a b", "$HOME;ls"]
    with pytest.raises(ConfigError, match="socket"):
        build_argv(["prog", "--no-socket"], Path("/s"))


def test_foreign_backend_that_exits_early_is_reported(sockdir: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; print('bad', file=sys.stderr); sys.exit(3)"]
    fb = ForeignBackend([*cmd, "{socket}"], sockdir / "x.sock", sockdir)
    with pytest.raises(TestbedError, match=r"status 3.*bad"):
        fb.start()
    assert fb.pid is None and fb.stopped is not None and fb.stopped.returncode == 3


_STUBBORN = """
import os, signal, socket, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
path = sys.argv[1]
open(path + '.pid', 'w').write(str(os.getpid()))
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(1)
print('listening', flush=True)
signal.pause()
"""


def test_foreign_backend_ignoring_sigterm_is_killed_and_its_leftovers_removed(
    sockdir: Path,
) -> None:
    fb = ForeignBackend(
        [sys.executable, "-c", _STUBBORN, "{socket}"], sockdir / "x.sock", sockdir, grace=0.5
    )
    with fb:
        pid = fb.pid
        assert pid is not None and fb.running()
        assert fb.pid_file.exists()
    assert fb.stopped is not None and fb.stopped.killed
    assert fb.stopped.returncode == -signal.SIGKILL
    assert not fb.pid_file.exists() and not (sockdir / "x.sock").exists()
    assert (sockdir / "backend-stdout.log").read_text() == "listening\n"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.qemu
def test_relay_in_front_of_a_foreign_process(sockdir: Path) -> None:
    """Our own back-end, started as somebody else's program would be (`testbed backend`),
    behind the relay: QEMU sees its layout, the relay's trace has the whole handshake."""
    cmd = [sys.executable, "-m", "testbed", "backend", "--socket", "{socket}", "--region", "0=4M"]
    with (
        ForeignBackend(cmd, sockdir / "be.sock", sockdir) as fb,
        Relay(sockdir / "vu.sock", fb.socket) as relay,
        _machine(sockdir / "vu.sock").start() as qemu,
    ):
        relay.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
        bar4 = pci_bar(qemu.pci_device(), 4)
        assert bar4 is not None and bar4["size"] == 4 * M
    assert relay.violations == []
    assert fb.stopped is not None and not fb.stopped.killed


# --- the pieces around it: CLI, GuestVM options, optional guest modules -----------------


def test_exec_takes_a_foreign_backend_and_modules() -> None:
    from testbed.cli import build_parser
    from testbed.commands.run import _vm

    args = build_parser().parse_args(
        [
            "exec",
            "--arch",
            "x86_64",
            "--backend-cmd",
            "virtiofsd --socket-path={socket} --shared-dir=/srv",
            "--backend-device",
            "num_vqs=2,config_size=40",
            "--region",
            "0=64M",
            "--load-modules",
            "virtiofs:dyndbg=+p",
            "--",
            "true",
        ]
    )
    vm = _vm(args)
    (device,) = vm.wanted
    assert isinstance(device.backend, ForeignCommand) and not device.ours
    assert device.backend.template[0] == "virtiofsd"
    assert (device.virtio_id, device.num_vqs, device.config_size) == (26, 2, 40)
    assert device.layout == ShmemLayout({0: 64 * M})
    both = build_parser().parse_args(
        ["exec", "--backend-cmd", "x {socket}", "--backend-socket", "/s", "--", "true"]
    )
    with pytest.raises(ConfigError, match="not both"):  # the one place that says so
        _vm(both)


def test_a_foreign_device_without_regions_is_still_a_device() -> None:
    from testbed.cli import build_parser
    from testbed.commands.run import _vm

    args = build_parser().parse_args(
        ["exec", "--backend-socket", "/run/x.sock", "--backend-device", "virtio_id=2,"
         "config_size=60", "--", "true"]
    )  # fmt: skip
    (device,) = _vm(args).wanted
    assert not device.layout and device.virtio_id == 2 and device.config_size == 60
    assert device.backend == ForeignSocket(Path("/run/x.sock"))
    assert _vm(build_parser().parse_args(["exec", "--", "true"])).wanted == ()


def test_optional_modules_load_command() -> None:
    from testbed.images.extra import load_command, module_path, order_path

    assert module_path("virtio-blk") == "extra/modules/virtio_blk.ko.gz"
    assert order_path("virtiofs") == "extra/modules/virtiofs.order"
    command = load_command(["virtiofs"], {"virtiofs": "dyndbg=+p"})
    assert "/extra/modules/virtiofs.order" in command
    assert "insmod /extra/modules/$m.ko.gz dyndbg=+p" in command
    assert "/lib/" not in command  # never under lib: it would shadow the lib -> usr/lib link
    with pytest.raises(ConfigError):
        load_command(["x; reboot"])


def test_a_built_in_module_gets_its_dyndbg_at_run_time(tmp_path: Path) -> None:
    """virtiofs is built into 6.12: its (empty) load order loads nothing, and dyndbg=+p goes
    to /proc/dynamic_debug/control instead; any other parameter cannot reach it and fails."""
    from testbed.images.extra import load_command

    with_debug = load_command(["virtiofs"], {"virtiofs": "dyndbg=+p"})
    assert (
        "grep -qx virtiofs /extra/modules/virtiofs.order || "
        "{ echo 'module virtiofs +p' > /proc/dynamic_debug/control; }"
    ) in with_debug
    other = load_command(["virtiofs"], {"virtiofs": "cache=1 dyndbg=+pf"})
    assert "cannot reach it" in other and "'module virtiofs +pf'" in other
    assert "dynamic_debug" not in load_command(["virtio_blk"])


def test_recipes_carry_optional_modules_apart_from_the_boot_list() -> None:
    from testbed.images.recipe import load_recipe

    for arch in ("x86_64", "aarch64"):
        recipe, _ = load_recipe(arch)
        assert {"virtiofs", "virtio_blk", "virtio_pmem", "ext4"} <= set(recipe.optional_modules)
        # Loaded at boot, virtio-fs would bind every test device (virtio-id 26).
        assert not set(recipe.optional_modules) & set(recipe.modules)


def test_outside_backends_run_through_the_sysroot_loader() -> None:
    from testbed.host.backends import loader_wrapper

    text = loader_wrapper(Path("/c/backends/v/usr/libexec/virtiofsd"), Path("/c/sysroot"), "x86_64")
    assert text.startswith("#!/bin/sh\n")
    assert (
        'exec "/c/sysroot/usr/lib64/ld-linux-x86-64.so.2" --library-path '
        '"/c/sysroot/usr/lib/x86_64-linux-gnu" "/c/backends/v/usr/libexec/virtiofsd" "$@"'
    ) in text


@pytest.mark.qemu
def test_relay_serves_one_qemu_after_another(sockdir: Path) -> None:
    """Each QEMU connection gets its own back-end connection and a fresh negotiation."""
    layout = ShmemLayout({0: 4 * M})
    with (
        Backend(sockdir / "be.sock", layout) as backend,
        Relay(sockdir / "vu.sock", sockdir / "be.sock") as relay,
    ):
        for n in (1, 2):
            with _machine(sockdir / "vu.sock").start() as qemu:
                relay.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT, count=n)
                bar4 = pci_bar(qemu.pci_device(), 4)
                assert bar4 is not None and bar4["size"] == layout.total
            relay.wait_disconnected(TIMEOUT, count=n)
            backend.wait_disconnected(TIMEOUT, count=n)
    assert relay.violations == [] and backend.violations == []


@pytest.mark.qemu
def test_relay_without_a_backend_lets_qemu_fail_as_it_would(sockdir: Path) -> None:
    """No back-end behind the relay: QEMU's connection is dropped, QEMU refuses to start
    (exit 1), as it does with no back-end at all; the relay waited a bounded time."""
    with Relay(sockdir / "vu.sock", sockdir / "nobody.sock", backend_timeout=0.5):
        qemu = _machine(sockdir / "vu.sock")
        with pytest.raises(QemuExited) as info:
            qemu.start()
        assert info.value.returncode == 1


# --- both sides judged, with a scripted front-end and back-end ----------------------------


def test_request_44_before_shmem_is_flagged_on_the_front_end_side(sockdir: Path) -> None:
    """The relay judges QEMU's requests with the back-end's own rule table."""
    faults = Faults(no_shmem=True)
    with (
        Backend(sockdir / "be.sock", ShmemLayout(), faults=faults) as backend,
        Relay(sockdir / "vu.sock", sockdir / "be.sock") as relay,
    ):
        front = conn_mod.connect(sockdir / "vu.sock", TIMEOUT)
        with front:
            for request, body in [
                (Request.GET_FEATURES, b""),
                (Request.GET_PROTOCOL_FEATURES, b""),
                (Request.SET_PROTOCOL_FEATURES, U64(int(ProtocolFeature.REPLY_ACK)).pack()),
                (Request.GET_SHMEM_CONFIG, b""),
            ]:
                front.send(Header.make(request, len(body)), body)
                if request in REPLY_REQUESTS:
                    with front.recv() as reply:
                        assert reply.header.is_reply_for(request)
        relay.wait_disconnected(TIMEOUT)
    assert [(v.request, v.rule) for v in relay.violations] == [("GET_SHMEM_CONFIG", "feature")]
    assert [(v.request, v.rule) for v in backend.violations] == [("GET_SHMEM_CONFIG", "feature")]


def test_a_bad_reply_is_flagged_and_passed_on_unchanged(sockdir: Path) -> None:
    """A back-end answering GET_FEATURES with 4 bytes: the front-end gets those 4 bytes
    (the relay changes nothing), the relay records a reply-size violation."""
    listener = Listener(sockdir / "be.sock")

    def scripted_backend() -> None:
        with listener.accept() as conn, conn.recv() as msg:
            assert msg.header.request == Request.GET_FEATURES
            conn.send(Header.make(Request.GET_FEATURES, 4, reply=True), b"\1\0\0\0")
            conn.settimeout(TIMEOUT)
            with contextlib.suppress(PeerClosed):
                conn.recv()  # until the relay hangs up

    thread = threading.Thread(target=scripted_backend, daemon=True)
    with listener, Relay(sockdir / "vu.sock", sockdir / "be.sock") as relay:
        thread.start()
        with conn_mod.connect(sockdir / "vu.sock", TIMEOUT) as front:
            front.send(Header.make(Request.GET_FEATURES, 0))
            front.settimeout(TIMEOUT)
            with front.recv() as reply:
                assert reply.body == b"\1\0\0\0"
        relay.wait_disconnected(TIMEOUT)
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert [(v.request, v.rule) for v in relay.violations] == [("GET_FEATURES", "reply-size")]


def test_an_unknown_request_is_passed_on_and_flagged(sockdir: Path) -> None:
    """Request 99 is in no spec we know: the relay still passes it on (the back-end may
    know it), flags it, and the connection carries on."""
    listener = Listener(sockdir / "be.sock")
    got: list[int] = []

    def scripted_backend() -> None:
        with listener.accept() as conn:
            conn.settimeout(TIMEOUT)
            with conn.recv(strict=False) as odd:
                got.append(odd.header.request)
            with conn.recv() as msg:
                got.append(msg.header.request)
                conn.send(Header.make(Request.GET_FEATURES, 8, reply=True), U64(1).pack())
            with contextlib.suppress(PeerClosed):
                conn.recv()

    thread = threading.Thread(target=scripted_backend, daemon=True)
    with listener, Relay(sockdir / "vu.sock", sockdir / "be.sock") as relay:
        thread.start()
        with conn_mod.connect(sockdir / "vu.sock", TIMEOUT) as front:
            front.send(Header(99, 1, 4), b"abcd")
            front.send(Header.make(Request.GET_FEATURES, 0))
            front.settimeout(TIMEOUT)
            with front.recv() as reply:
                assert U64.unpack(reply.body).value == 1
        relay.wait_disconnected(TIMEOUT)
        thread.join(TIMEOUT)
    assert got == [99, Request.GET_FEATURES]
    assert [(v.request, v.rule) for v in relay.violations] == [("UNKNOWN_99", "unknown-request")]
    assert relay.trace.entries()[0].name == "UNKNOWN_99"
