"""Artifacts: where the evidence of a run goes, and the one writer of every script in it.

Every executable file the test bed leaves for a human (a scenario's reproduce.sh and
qemu-by-hand.sh, a fuzz finding's reproduce.sh, an exported bug's repro.py) is written by
``write_script``: the text as given, mode 0755, so that each of them is runnable the same
way and none is left half-written or without its execute bit.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from testbed.device import VhostUserDevice
from testbed.machine.cmdline import MachineConfig, build_command
from testbed.paths import results_dir, sanitize, write_atomic

log = logging.getLogger(__name__)


def write_script(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` as an executable script (0755), atomically: a reader
    never sees a half-written file. Returns ``path``."""
    return write_atomic(Path(path), text if text.endswith("\n") else text + "\n", 0o755)


def _dq(word: str) -> str:
    """Double-quote for sh, so that ${RUN} placeholders still expand."""
    escaped = "".join("\\" + c if c in '\\$`"' else c for c in word)
    return f'"{escaped}"'


def write_by_hand(
    config: MachineConfig, run_dir: Path, logdir: Path, ours: Sequence[VhostUserDevice]
) -> Path:
    """A VM's qemu-by-hand.sh in ``logdir``: `testbed backend` serving the layout of each of
    ``ours`` (the devices our back-end serves: one we did not write is not ours to replay),
    then QEMU with the same command line in the foreground, for gdb. It serves the layouts
    only: a scenario's faults and steps are replayed by its reproduce.sh (testbed bugs
    reproduce), not here.

    Paths under the run dir become ${RUN}, a fresh 0700 dir, so the script works after the
    original run dir is gone (the console file too, so a rerun never clobbers the logs);
    testbed runs from this venv, found by absolute path."""
    prefix = str(run_dir)

    def arg(word: str) -> str:
        return _dq(word).replace(prefix, "${RUN}")

    lines = [
        "#!/bin/sh",
        "# This VM's QEMU by hand, against a back-end serving the same layout (no faults:",
        "# reproduce.sh reruns a failed scenario as it ran). GDB='gdb --args' sh qemu-by-hand.sh",
        "set -eu",
        "RUN=$(mktemp -d /tmp/testbed-repro-XXXXXX)",
        'chmod 700 "$RUN"',
        'PIDS=""',
        'cleanup() { for p in $PIDS; do kill "$p" 2>/dev/null; done; rm -rf "$RUN"; }',
        "trap cleanup EXIT INT TERM",
    ]
    for device in ours:
        sock = arg(str(device.socket_path))
        lines += [
            f"{shlex.quote(sys.executable)} -m testbed backend --socket {sock} "
            f"{' '.join(device.layout.region_args())} &",
            'PIDS="$PIDS $!"',
            f"while [ ! -S {sock} ]; do sleep 0.1; done",
        ]
    lines.append('echo "console: $RUN/console.log  QMP: $RUN/qmp.sock" >&2')
    if config.incoming is not None:
        # -incoming defer: the guest comes from a snapshot (testbed.snapshot), loaded
        # once the file's format is set; say how, since nothing else here does it.
        steps = [
            '{"execute": "qmp_capabilities"}',
            '{"execute": "migrate-set-capabilities", "arguments": {"capabilities": '
            '[{"capability": "mapped-ram", "state": true}]}}',
            f'{{"execute": "migrate-incoming", "arguments": {{"uri": "file:{config.incoming}"}}}}',
            '{"execute": "cont"}',
        ]
        lines.append(
            "echo 'restored guest: send these on QMP ($RUN/qmp.sock), e.g. with socat:' >&2"
        )
        lines += [f"echo {shlex.quote(step)} >&2" for step in steps]
    console, moved = str(logdir / "console.log"), str(run_dir / "console.log")
    argv = [w.replace(console, moved) for w in build_command(config)]
    lines.append("${GDB:-} " + " \\\n    ".join(arg(w) for w in argv))
    return write_script(logdir / "qemu-by-hand.sh", "\n".join(lines))


def keep_failed(logdir: Path, label: str) -> Path:
    """Copy a failed run's logs (made in its private run dir) to results/failed/."""
    kept = results_dir() / "failed" / f"{sanitize(label)}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.copytree(logdir, kept, dirs_exist_ok=True)
    log.warning("artifacts of the failed run kept in %s", kept)
    return kept
