"""Artifacts: where the evidence of a run goes, and the one writer of every script in it.

Every executable file the test bed leaves for a human (a scenario's reproduce.sh and
qemu-by-hand.sh, a fuzz finding's reproduce.sh, an exported bug's repro.py) is written by
``write_script``: the text as given, mode 0755, so that each of them is runnable the same
way and none is left half-written or without its execute bit.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_script(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` as an executable script (0755), atomically: a reader
    never sees a half-written file. Returns ``path``."""
    path = Path(path)
    if not text.endswith("\n"):
        text += "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
