"""Busybox's applet links, made when the image is built instead of at every boot (pure).

`busybox --install -s` in /init cost ~50 ms of TCG per boot (exec of a 2 MB static binary
and ~280 symlink calls before anything else could run). The names come from the binary's
own applet table, the NUL-separated, sorted list busybox keeps for `--list` (it starts
"[\\0[[\\0"), so the image needs no busybox that runs on the build host (aarch64 on x86_64).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from testbed.errors import ProvisionError
from testbed.images.cpio import CpioEntry

_TABLE_START = b"[\0[[\0"
_NAME = re.compile(r"^[a-z0-9_.\[-]+$")
_MIN_APPLETS = 50
"""Fewer names than this means the table was not found, not a small busybox."""
LINK_DIR = "usr/bin"
"""Where the links go: /bin and /sbin lead to /usr here, and /init's PATH has /usr/bin."""


def applet_names(binary: bytes, what: str = "busybox") -> list[str]:
    """The applet names in ``binary``'s table, as `busybox --list` prints them."""
    at = binary.find(_TABLE_START)
    if at < 0 or binary.find(_TABLE_START, at + 1) >= 0:
        raise ProvisionError(f"{what}: no single applet table found (is it busybox?)")
    names: list[str] = []
    while True:
        end = binary.index(b"\0", at)
        raw = binary[at:end]
        if not raw:
            break
        name = raw.decode("ascii", errors="replace")
        if not _NAME.match(name) or (names and name <= names[-1]):
            break  # past the table: the next datum is not a sorted applet name
        names.append(name)
        at = end + 1
    if len(names) < _MIN_APPLETS:
        raise ProvisionError(f"{what}: applet table has {len(names)} names, want >= 50")
    return names


def applet_links(names: Iterable[str], taken: Iterable[str]) -> list[CpioEntry]:
    """Symlinks /usr/bin/NAME -> busybox for each applet whose name no file in the image
    already has (a real lspci wins, as with `--install`). ``taken``: the image's paths."""
    have = set(taken)
    return [
        CpioEntry.symlink(f"{LINK_DIR}/{name}", "busybox")
        for name in names
        if not {f"usr/bin/{name}", f"usr/sbin/{name}"} & have
    ]
