"""Guest-side waits: shell scripts that loop *inside* the guest until a condition holds.

Why in the guest: one SSH round trip for the whole wait instead of one per look, and the
loop itself uses shell built-ins only (a look that forks `od`, `cat` and `readlink` for each
PCI function costs ~40 execs under TCG). The host side (testbed.vm.GuestVM.wait_in_guest)
runs one of these with an SSH timeout a little longer than the script's own, and on
failure asks the guest once more for what it shows, so that the error says what was
waited for and what was seen last. Pure: text in, text out.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

STEP = 0.02
"""Seconds between two looks (the loop's only exec is busybox's usleep)."""

SYSFS_PCI_DEVICES = "/sys/bus/pci/devices"
VIRTIO_STATUS_DRIVER_OK = 4


def wait_script(condition: str, timeout: float, *, then: str = "", sleep: str | None = None) -> str:
    """A guest script that evaluates ``condition`` (sh; its exit status is the answer)
    every STEP s until it holds, then runs ``then`` (which may print what was found)
    and exits 0; or exits 1 after about ``timeout`` s. ``condition`` may also end the
    script itself with `exit 0` once it has printed its finding. ``sleep``: the pause
    command (default busybox's `usleep`; the fast tests run these in the host's sh)."""
    pause = sleep or f"usleep {round(STEP * 1e6)}"
    return (
        f"i=0; until {{ {condition}; }}; do "
        f"[ $i -ge {max(1, round(timeout / STEP))} ] && exit 1; "
        f"{pause}; i=$((i + 1)); done; {then or 'true'}"
    )


def new_function_condition(device_id: int, known: Sequence[str], root: str) -> str:
    """Holds (printing its BDF, then ending the script) once a PCI function that is not in
    ``known`` and has PCI device id ``device_id`` has a driver bound."""
    skip = " ".join(sorted(known))
    return (
        f"for d in {root}/*; do "
        f'case " {skip} " in *" ${{d##*/}} "*) continue;; esac; '
        'read id < "$d/device" || continue; '
        f'if [ "$id" = {device_id:#06x} ] && [ -e "$d/driver" ]; then '
        'echo "${d##*/}"; exit 0; fi; '
        "done; false"
    )


def function_gone_condition(bdf: str, root: str = SYSFS_PCI_DEVICES) -> str:
    """Holds once PCI function ``bdf`` is no longer listed."""
    return f"[ ! -e {root}/{bdf} ]"


def virtio_driver_condition(bdf: str, driver: str, root: str = SYSFS_PCI_DEVICES) -> str:
    """Holds once the virtio device under PCI function ``bdf`` is bound to ``driver`` AND
    its probe is over. The driver link alone is not enough: the driver core makes it
    before it calls the driver's probe (really_probe: driver_sysfs_add, then probe), so a
    reader that only waited for the link can look while the probe is still printing. The
    virtio core sets DRIVER_OK when the probe returns (or the driver sets it itself at the
    end of its set-up), and the device's sysfs `status` shows it."""
    base = f"{root}/{bdf}"
    return (
        f"for v in {base}/virtio[0-9]*; do "
        f'cd -P "$v/driver" 2>/dev/null || continue; '
        f'n=${{PWD##*/}}; cd /; [ "$n" = {shlex.quote(driver)} ] || continue; '
        f'read s < "$v/status" || continue; '
        f"[ $((s & {VIRTIO_STATUS_DRIVER_OK})) -ne 0 ] && exit 0; "
        "done; false"
    )


def virtio_driver_show(bdf: str, root: str = SYSFS_PCI_DEVICES) -> str:
    """What virtio_driver_condition looks at, for an error message."""
    base = f"{root}/{bdf}"
    return (
        f'for v in {base}/virtio[0-9]*; do echo "$v: driver $(readlink $v/driver), '
        f'status $(cat $v/status)"; done; echo "pci driver: $(readlink {base}/driver)"'
    )


def dmesg_condition(pattern: str) -> str:
    """Holds once the kernel log has a line matching ``pattern`` (grep -E); prints every
    matching line and ends the script."""
    quoted = shlex.quote(pattern)
    return f"dmesg | grep -E {quoted} && exit 0"
