"""Where the test bed keeps things: the cache, results, and short per-run directories.

Sockets live in short directories under /tmp because sun_path holds 108 bytes at most.
Every per-run directory is created 0700 so no other user can reach a socket or a key in it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from testbed.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The source tree (holds images/ recipes and scenarios/). Valid for an editable install."""

RECIPES_DIR = PROJECT_ROOT / "images"

# The prefix of every temporary directory we create; leak checks look for it.
TMP_PREFIX = "testbed-"
# sun_path holds 108 bytes with its NUL; our socket names ("qmp.sock", "hp12.sock", ...)
# need up to 16 more after the directory.
MAX_SOCKET_DIR = 108 - 1 - 16


def cache_dir() -> Path:
    """$TESTBED_CACHE, else $XDG_CACHE_HOME/testbed, else ~/.cache/testbed."""
    explicit = os.environ.get("TESTBED_CACHE")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "testbed").resolve()


def results_dir() -> Path:
    """$TESTBED_RESULTS, else results/ in the project tree."""
    explicit = os.environ.get("TESTBED_RESULTS")
    return Path(explicit).expanduser().resolve() if explicit else PROJECT_ROOT / "results"


def tmp_root() -> Path:
    """Base for short-lived per-run dirs: $TESTBED_TMPDIR or /tmp (short, for sun_path)."""
    return Path(os.environ.get("TESTBED_TMPDIR", "/tmp"))


def make_private_dir(purpose: str) -> Path:
    """A fresh 0700 directory under tmp_root(), named testbed-<purpose>-XXXX.

    The caller owns it and must remove it (``remove_tree``) when done.
    """
    root = tmp_root()
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{purpose}-", dir=root))
    if len(str(path)) > MAX_SOCKET_DIR:
        remove_tree(path)
        raise ConfigError(
            f"temporary directory {path} is too long ({len(str(path))} bytes) to hold UNIX "
            f"sockets (at most {MAX_SOCKET_DIR}): set TESTBED_TMPDIR to a shorter directory, "
            "e.g. /tmp"
        )
    path.chmod(0o700)
    return path


def write_atomic(path: Path, text: str, mode: int = 0o600) -> Path:
    """Write ``text`` to ``path`` (permission bits ``mode``) through a temp file beside it
    and a rename: a reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_tree(path: Path) -> None:
    """Remove a directory tree we created; missing is fine."""
    shutil.rmtree(path, ignore_errors=True)


def sanitize(name: str) -> str:
    """A test node id or label turned into a safe single path component."""
    keep = [c if c.isalnum() or c in "-_.=" else "_" for c in name]
    return "".join(keep).strip("._")[:120] or "run"
