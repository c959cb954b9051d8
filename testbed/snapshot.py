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

This module is the store and the key (pure, no QEMU); testbed.vm boots and saves the guest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.machine.cmdline import MachineConfig, build_command
from testbed.paths import cache_dir, remove_tree

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
"""Bumped when what a snapshot holds changes in a way the key does not show."""
KEEP = 8
"""Snapshots kept in the store; older ones (by last use) are removed when one is made."""


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
        {"format": SNAPSHOT_FORMAT, "qemu": qemu, "argv": build_command(neutral)},
        sort_keys=True,
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
        with os.fdopen(fd, "w") as lock:
            # Blocks while another process makes this snapshot (bounded by its boot timeout).
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

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
