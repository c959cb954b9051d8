"""The snapshot store and its key (testbed.snapshot): pure code and files, no QEMU.

Save and restore themselves run in every hot-plug scenario (a restored guest), and
`make bench` times them."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from test_cmdline import config, option_values

from testbed.device import ForeignCommand, VhostUserDevice
from testbed.errors import ConfigError
from testbed.machine.cmdline import build_command
from testbed.snapshot import Snapshot, SnapshotStore, snapshot_key
from testbed.vm import GuestVM

QEMU = "/q/qemu-system-x86_64:1:2:11.1.3"


def test_key_ignores_what_differs_per_run() -> None:
    base = config(root_ports=1)
    other_run = replace(
        base,
        qmp_socket=Path("/elsewhere/qmp.sock"),
        console_log=Path("/elsewhere/console.log"),
        ssh_port=50022,
        incoming=Path("/cache/x.state"),
    )
    assert snapshot_key(base, QEMU) == snapshot_key(other_run, QEMU)


@pytest.mark.parametrize(
    "change",
    [
        {"root_ports": 2},
        {"root_port_pref64": 256 << 20},
        {"memory_mib": 1024},
        {"kernel": Path("/k/other-vmlinux")},
        {"extra_kernel_args": ("loglevel=8",)},
        {"accel": "kvm"},
    ],
)
def test_key_follows_what_the_guest_state_depends_on(change: dict[str, object]) -> None:
    base = config(root_ports=1)
    assert snapshot_key(base, QEMU) != snapshot_key(replace(base, **change), QEMU)  # type: ignore[arg-type]


def test_key_follows_the_qemu_binary() -> None:
    base = config(root_ports=1)
    assert snapshot_key(base, QEMU) != snapshot_key(base, QEMU.replace("11.1.3", "11.2.0"))


def test_incoming_defers_the_load_to_qmp() -> None:
    argv = build_command(config(incoming=Path("/cache/x.state")), paused=True)
    assert option_values(argv, "-incoming") == ["defer"]
    assert "/cache/x.state" not in " ".join(argv)  # the file comes over QMP


def test_store_makes_once_then_reuses(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    made: list[str] = []

    def make(snap: Snapshot, partial: Path) -> None:
        made.append(snap.key)
        assert snap.logdir.is_dir()
        (snap.logdir / "console.log").write_text("booted\n")
        partial.write_bytes(b"state")

    first = store.get_or_make("x86_64-aaaa", make)
    second = store.get_or_make("x86_64-aaaa", make)
    assert made == ["x86_64-aaaa"]
    assert first == second and first.state.read_bytes() == b"state"
    assert first.console.read_text() == "booted\n"
    assert (tmp_path / "snapshots").stat().st_mode & 0o777 == 0o700


def test_failed_make_leaves_no_state(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)

    def make(snap: Snapshot, partial: Path) -> None:
        partial.write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the boot

    with pytest.raises(KeyboardInterrupt):
        store.get_or_make("x86_64-bbbb", make)
    assert not list(tmp_path.glob("*.state")) and not list(tmp_path.glob("*.partial"))


def test_prune_keeps_the_most_recently_used(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    for i, key in enumerate(["a", "b", "c"]):
        snap = store.snapshot(key)
        snap.state.write_bytes(b"s")
        snap.logdir.mkdir()
        os.utime(snap.state, (1000 + i, 1000 + i))
    assert store.prune(keep=2) == ["a"]
    assert sorted(p.stem for p in tmp_path.glob("*.state")) == ["b", "c"]
    assert not (tmp_path / "a.boot").exists()


DEVICE = VhostUserDevice.of({0: 4 << 20})
FOREIGN = VhostUserDevice.of(None, backend=ForeignCommand.of("virtiofsd --socket-path {socket}"))


@pytest.mark.parametrize(
    ("devices", "plug", "restored"),
    [
        ((), "cold", True),  # no device at all: a hot-plug scenario's guest
        ((DEVICE,), "cold", False),  # cold-plugged: firmware and kernel see it at boot
        ((FOREIGN,), "cold", False),
        ((DEVICE,), "hot", True),
    ],
)
def test_guest_restores_unless_a_device_is_cold_plugged(
    devices: tuple[VhostUserDevice, ...], plug: str, restored: bool
) -> None:
    assert GuestVM("x86_64", *devices, plug=plug, restore=None).restore is restored


def test_restore_refuses_a_cold_plugged_device() -> None:
    with pytest.raises(ConfigError, match="cold-plug needs a real boot"):
        GuestVM("x86_64", DEVICE, restore=True)
