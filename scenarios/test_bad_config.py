"""Bad back-end configurations: each must end in a clear error and QEMU must not crash.

The back-end's fault injection bends one thing at a time. Cold-plugged, the right outcome is
QEMU refusing to start: exit status 1 (not a signal) with a message naming the problem.
Where QEMU 11.1.3 crashes instead, the case is a strict expected failure quoting the crash,
so that it turns visible (XPASS -> failure) the day QEMU is fixed.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from testbed.errors import QemuExited
from testbed.pytest_plugin import known_qemu_crash, raise_if_known_crash
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import Request
from testbed.vm import GuestVM

M = 1 << 20

# name -> (regions served, faults, a piece of QEMU's error message we expect)
REFUSED: dict[str, tuple[dict[int, int], Faults, str]] = {
    "reply-flags-wrong": ({0: 4 * M}, Faults(shmem_reply_flags=0x1), "GET_SHMEM_CONFIG"),
    "reply-truncated": ({0: 4 * M}, Faults(shmem_truncate=8), "GET_SHMEM_CONFIG"),
    "nregions-too-many": ({0: 4 * M}, Faults(shmem_nregions=2), "GET_SHMEM_CONFIG"),
    "size-not-page-multiple": (
        {0: 4 * M},
        Faults(shmem_raw_sizes={0: 4 * M + 512}),
        "page",
    ),
    "disconnect-at-get-shmem-config": (
        {0: 4 * M},
        Faults(disconnect_at=Request.GET_SHMEM_CONFIG),
        "vhost",
    ),
}

CRASHES: dict[str, tuple[dict[int, int], Faults, str]] = {
    "total-not-power-of-two": (
        {0: 4 * M, 1: 16 * M},
        Faults(shmem_raw_sizes={0: 4 * M, 1: 16 * M}),
        "pci_register_bar: Assertion 'is_power_of_2(size)' failed",
    ),
    "four-regions-on-root-bus": (
        {0: 2 * M, 1: 2 * M, 2: 2 * M, 3: 2 * M},
        Faults(),
        "pci_add_capability: Assertion 'offset' failed",
    ),
}


def _expect_refusal(
    boot: Callable[..., GuestVM], regions: dict[int, int], faults: Faults, crash: str = ""
) -> str:
    with pytest.raises(QemuExited) as info:
        boot(regions=regions, faults=faults, allow_overfull=True, boot_timeout=30)
    exc = info.value
    if crash:
        raise_if_known_crash(exc, crash)
    assert exc.returncode is not None
    assert exc.returncode >= 0, f"QEMU crashed instead of refusing: {exc}"
    assert exc.returncode == 1, f"QEMU exited {exc.returncode}, want 1 (refused): {exc}"
    assert exc.stderr_tail.strip(), "QEMU refused without saying why"
    return exc.stderr_tail


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused(boot: Callable[..., GuestVM], name: str) -> None:
    regions, faults, message = REFUSED[name]
    stderr = _expect_refusal(boot, regions, faults)
    assert message.lower() in stderr.lower(), f"QEMU's message does not name {message!r}:\n{stderr}"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=known_qemu_crash(f"QEMU 11.1.3 aborts: {crash}"))
        for name, (_, _, crash) in CRASHES.items()
    ],
)
def test_known_qemu_crash(boot: Callable[..., GuestVM], name: str) -> None:
    regions, faults, crash = CRASHES[name]
    _expect_refusal(boot, regions, faults, crash)
