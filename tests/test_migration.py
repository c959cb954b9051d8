"""Saving and loading a QEMU's state to a file, as testbed.snapshot does, with real QEMU
(guest-less, -accel tcg -S): the end of a migration is QEMU's MIGRATION event, not a
poll, and a load that fails says why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.errors import QemuExited, TestbedError
from testbed.host.qemu import resolve_qemu
from testbed.machine import QtestConfig, QtestMachine
from testbed.paths import make_private_dir, remove_tree
from testbed.snapshot import STATE_FILE_CAPABILITIES, save


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = make_private_dir("test-migration")
    yield path
    remove_tree(path)


def guestless(arch: str, *extra: str) -> QtestMachine:
    try:
        qemu = resolve_qemu(arch).path
    except TestbedError as exc:
        pytest.skip(f"host capability missing: no QEMU 11.1 for {arch}: {exc}")
    return QtestMachine(QtestConfig(arch, qemu, qtest=False, extra_args=extra))


def load(machine: QtestMachine, state: Path) -> None:
    machine.qmp("migrate-set-capabilities", capabilities=STATE_FILE_CAPABILITIES)
    machine.qmp("migrate-incoming", uri=f"file:{state}")
    machine.wait_migration(f"loading {state}", timeout=30)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_save_then_load_ends_on_the_migration_event(arch: str, workdir: Path) -> None:
    state = workdir / "state"
    with guestless(arch) as source:
        source.start()
        save(source, state)
        assert any(
            e["event"] == "MIGRATION" and e["data"]["status"] == "completed" for e in source.events
        )
        # (Not query-status: QEMU sends the event while still in finish-migrate, and only
        # then moves to postmigrate.)
        assert source.qmp("query-migrate")["status"] == "completed"
    with guestless(arch, "-incoming", "defer") as target:
        target.start()
        load(target, state)
        assert target.qmp("query-migrate")["status"] == "completed"


def test_a_load_that_fails_says_why(workdir: Path) -> None:
    state = workdir / "state"
    with guestless("x86_64") as source:
        source.start()
        save(source, state)
    state.write_bytes(state.read_bytes()[:4096])  # the header and nothing else
    with guestless("x86_64", "-incoming", "defer") as target:
        target.start()
        # QEMU ends a failed incoming migration by exiting: the status and its stderr say why.
        with pytest.raises(QemuExited) as raised:
            load(target, state)
    assert "load of migration failed" in str(raised.value), str(raised.value)
