"""The host kernel's log, for what QEMU cannot print itself: where a segfault happened.

A SIGSEGV leaves nothing on QEMU's stderr; the kernel logs "segfault at ... ip ... in
qemu-system-X[offset,...]" instead. Reading it takes dmesg (root, or a readable kernel log);
where it cannot be read, or the kernel rate-limited the line, there is no site.
"""

from __future__ import annotations

import subprocess

from testbed.bugs.signature import segfault_in_log
from testbed.errors import WaitTimeout
from testbed.waiting import wait_until

LINE_DELAY = 2.0
"""How long the kernel's line may take to land after the signal."""


def segfault_site(pid: int | None) -> dict[str, str]:
    """The kernel's segfault line for ``pid``, parsed (testbed.bugs.signature.segfault_in_log:
    binary, offset, ip, addr); empty when the log is not readable or has no such line."""
    if pid is None:
        return {}

    def look() -> dict[str, str] | None:
        try:
            log = subprocess.run(
                ["dmesg"], capture_output=True, text=True, timeout=LINE_DELAY, check=False
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return {}  # no kernel log to read: no site, and no point in looking again
        return segfault_in_log(log, pid) or None

    try:
        return wait_until(look, LINE_DELAY, f"the kernel's segfault line for pid {pid}")
    except WaitTimeout:
        return {}
