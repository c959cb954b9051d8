"""Boot once, restore many: booted, idle guests kept as files, restored by fresh QEMUs.

A scenario that needs no device at boot (it hot-plugs its own) does not have to watch the
firmware and the kernel come up again: a guest booted once, with nothing but its root ports,
is saved with QEMU's migration to a file, and every such scenario starts a *new* QEMU process
restored from that file (``-incoming file:...``). No state leaks from one scenario into the
next: each restore reads the same file into its own memfd-backed RAM (shareable, as
vhost-user needs), and nothing is written back.

The file is only valid for a QEMU with the very same command line (devices, machine, RAM,
kernel and initrd) and the same QEMU binary, so its name is a hash of both
(`snapshot_key`). Snapshots live in the cache (``$TESTBED_CACHE/snapshots``) next to the
images: the first run makes them, every later run, worker and scenario reuses them. One
process makes a given snapshot while the others wait on its lock. Cold-plug scenarios keep
booting: the firmware's and the kernel's first enumeration is what they test.

This module owns restore end to end: the key (pure), the store, the boot that makes a
snapshot (``make_snapshot``), the save and the load over QMP (``save``, ``load``), and the
config a restored VM starts with (``restored``). testbed.vm only asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.booting import boot_to_ssh
from testbed.images import GuestImage
from testbed.machine.cmdline import MachineConfig, build_command
from testbed.machine.guest import GuestMachine
from testbed.machine.qemu import QemuMachine, free_tcp_port
from testbed.paths import cache_dir, make_private_dir, remove_tree

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
"""Bumped when what a snapshot holds changes in a way the key does not show."""
KEEP = 8
"""Snapshots kept in the store; older ones (by last use) are removed when one is made."""
# mapped-ram puts each RAM page at a fixed offset of the file and skips zero pages, so a
# restore preads what is there instead of parsing a stream: 0.12 s instead of 0.8-1.3 s for
# an idle 512 MiB guest (x86_64, TCG, 2 cores).
# mapped-ram: the state file format; events: MIGRATION events, waited on instead of polling.
STATE_FILE_CAPABILITIES = [
    {"capability": "mapped-ram", "state": True},
    {"capability": "events", "state": True},
]
SAVE_TIMEOUT = 60.0


def qemu_identity(binary: Path, version: str) -> str:
    """What tells two QEMU binaries apart cheaply: the real file behind ``binary`` (after
    symlinks), its size and mtime, and the version it reports."""
    real = binary.resolve()
    st = real.stat()
    return f"{real}:{st.st_size}:{st.st_mtime_ns}:{version}"


def snapshot_key(config: MachineConfig, qemu: str) -> str:
    """A name for the snapshot of ``config``'s guest: equal for any two configs whose QEMUs
    can restore each other's state. Sockets, the console file and the ssh port are host
    side only and differ per run, so they are left out."""
    neutral = dataclasses.replace(
        config,
        qmp_socket=Path("qmp.sock"),
        console_log=Path("console.log"),
        ssh_port=22,
        incoming=None,
    )
    payload = json.dumps(
        {"format": SNAPSHOT_FORMAT, "qemu": qemu, "argv": build_command(neutral)}, sort_keys=True
    )
    return f"{config.arch}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class Snapshot:
    """One saved guest: its state file and the logs of the boot that made it."""

    key: str
    state: Path
    """QEMU's migration stream: give it to MachineConfig.incoming."""
    logdir: Path
    """console.log, qmp.log, qemu-cmdline.txt of the boot that made the snapshot."""

    @property
    def console(self) -> Path:
        return self.logdir / "console.log"


class SnapshotStore:
    """The snapshots in ``root`` (default: $TESTBED_CACHE/snapshots), made on first use."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else cache_dir() / "snapshots"

    def snapshot(self, key: str) -> Snapshot:
        return Snapshot(key, self.root / f"{key}.state", self.root / f"{key}.boot")

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as lock:  # closing it releases the lock
            # Blocks while another process makes this snapshot (bounded by its boot timeout).
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def get_or_make(self, key: str, make: Callable[[Snapshot, Path], None]) -> Snapshot:
        """The snapshot ``key``; if missing, ``make(snapshot, partial)`` boots a guest, saves
        it to ``partial`` and keeps its logs in ``snapshot.logdir``; ``partial`` becomes the
        state file only when make returns, so a failed or interrupted make leaves nothing
        that a later run would take for a snapshot."""
        snap = self.snapshot(key)
        with self._locked(key):
            if snap.state.exists():
                os.utime(snap.state)  # last use, for pruning
                return snap
            partial = snap.state.with_suffix(".partial")
            remove_tree(snap.logdir)
            snap.logdir.mkdir(mode=0o700, parents=True)
            started = time.monotonic()
            try:
                make(snap, partial)
                os.replace(partial, snap.state)
            finally:
                partial.unlink(missing_ok=True)
            log.info("made snapshot %s in %.1f s", key, time.monotonic() - started)
        self.prune(keep=KEEP)
        return snap

    def prune(self, keep: int) -> list[str]:
        """Remove all but the ``keep`` most recently used snapshots (not locked ones being
        made: those have no state file yet); returns the keys removed."""
        states = sorted(self.root.glob("*.state"), key=lambda p: p.stat().st_mtime, reverse=True)
        removed = []
        for state in states[keep:]:
            key = state.stem
            with contextlib.suppress(FileNotFoundError):
                state.unlink()
            remove_tree(self.root / f"{key}.boot")
            (self.root / f"{key}.lock").unlink(missing_ok=True)
            removed.append(key)
        return removed


# -- QEMU's side: save and load over QMP (QEMU's migration to and from a file) -------------


def save(machine: QemuMachine, path: Path) -> None:
    """Stop the guest and write its whole state (devices and RAM) to ``path``. QEMU stays
    paused; a GuestMachine started with that file as ``incoming`` continues from here."""
    machine.qmp("stop")
    machine.qmp("migrate-set-capabilities", capabilities=STATE_FILE_CAPABILITIES)
    machine.qmp("migrate", uri=f"file:{path}")
    machine.wait_migration(f"saving the guest to {path}", SAVE_TIMEOUT)


def load(machine: GuestMachine, timeout: float) -> None:
    """Load ``machine.config.incoming`` into a QEMU started with `-incoming defer` (its
    GuestMachine's before-`cont` hook): the file's format must be set first. The saved guest
    was stopped, so the restored one stays paused until `cont`."""
    state = machine.config.incoming
    assert state is not None
    machine.qmp("migrate-set-capabilities", capabilities=STATE_FILE_CAPABILITIES)
    machine.qmp("migrate-incoming", uri=f"file:{state}")
    machine.wait_migration(f"restoring the guest from {state}", timeout)


# -- making one, and restoring from it ------------------------------------------------------


def make_snapshot(
    config: MachineConfig, image: GuestImage, boot_timeout: float
) -> Callable[[Snapshot, Path], None]:
    """The maker of ``config``'s snapshot: the same guest booted for real (its own sockets
    and port, which the key leaves out), logged in once so that it is fully up, saved."""

    def make(snap: Snapshot, partial: Path) -> None:
        run_dir = make_private_dir("snap")
        try:
            boot = dataclasses.replace(
                config,
                qmp_socket=run_dir / "qmp.sock",
                console_log=snap.console,
                ssh_port=free_tcp_port(),
                incoming=None,
            )
            with GuestMachine(boot, snap.logdir) as machine:
                machine.start()
                boot_to_ssh(machine, image, boot_timeout).close()
                save(machine, partial)
        finally:
            remove_tree(run_dir)

    return make


def restored(
    config: MachineConfig, qemu_identity: str, image: GuestImage, boot_timeout: float
) -> tuple[MachineConfig, Snapshot]:
    """``config`` set to restore its guest's snapshot (made first if missing), and the
    snapshot. The restored guest's console log begins with the boot it comes from (QEMU
    appends to it), so a failure's console tail tells the whole story."""
    key = snapshot_key(config, qemu_identity)
    snap = SnapshotStore().get_or_make(key, make_snapshot(config, image, boot_timeout))
    shutil.copyfile(snap.console, config.console_log)
    return dataclasses.replace(config, incoming=snap.state), snap
