"""`testbed shell` on a real terminal: a pty, a prompt, a command, the shell's exit status."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TESTBED = Path(sys.executable).with_name("testbed")


def _read_until(fd: int, needle: bytes, deadline: float, seen: bytearray) -> bool:
    """Read the pty into ``seen`` until ``needle`` shows up, EOF, or the deadline."""
    while needle not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the other side of the pty closed
            return needle in seen
        if not data:
            return needle in seen
        seen += data
    return True


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short scratch dir: pytest's tmp_path under xdist is too long for UNIX sockets."""
    path = Path(tempfile.mkdtemp(prefix="tb-shell-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_shell_runs_commands_and_returns_exit_status(short_tmp: Path) -> None:
    tmp_path = short_tmp
    primary, secondary = pty.openpty()
    env = {**os.environ, "TERM": "dumb", "TESTBED_TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [str(TESTBED), "shell", "--arch", "x86_64"],
        stdin=secondary,
        stdout=secondary,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    os.close(secondary)
    seen = bytearray()
    try:
        # busybox sh as root prints a prompt ending in '# '.
        if not _read_until(primary, b"# ", time.monotonic() + 120, seen):
            proc.kill()
            assert proc.stderr is not None
            err = proc.stderr.read().decode(errors="replace")[-2000:]
            pytest.fail(f"no shell prompt; terminal showed {bytes(seen)[-500:]!r}; stderr:\n{err}")
        os.write(primary, b"echo marker-$((6*7)); uname -m; exit 3\n")
        _read_until(primary, b"\x00never", time.monotonic() + 30, seen)
        returncode = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    text = bytes(seen).decode(errors="replace")
    assert "marker-42" in text, f"the command did not run:\n{text}\n{stderr}"
    assert "x86_64" in text, text
    assert returncode == 3, f"want the shell's exit status 3, got {returncode}:\n{stderr}"
    assert list(tmp_path.iterdir()) == [], "testbed shell left files behind"
