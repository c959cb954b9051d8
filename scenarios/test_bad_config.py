"""Bad back-end configurations: each must end in a clear error and QEMU must not crash.

The back-end's fault injection bends one thing at a time. Cold-plugged, the right outcome
is QEMU refusing to start: exit status 1 (not a signal) with a message naming the problem.
Where QEMU 11.1.3 misbehaves instead (crashes, or starts as if nothing were wrong), the case
names the known bug (testbed/bugs/registry.toml): an expected failure while the bug's
signature shows, a failure the day it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from testbed.bugs import KnownBugSeen
from testbed.bugs.marks import known_bug
from testbed.device import VhostUserDevice
from testbed.errors import QemuExited
from testbed.pytest_plugin import Boot
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import Request

M = 1 << 20


@dataclass(frozen=True)
class BadConfig:
    faults: Faults
    message: str
    """What QEMU's error message must mention (case-insensitive)."""
    regions: dict[int, int] = field(default_factory=lambda: {0: 4 * M})
    bug: str = ""
    """The registry id of the known QEMU bug this case shows (testbed/bugs/registry.toml)."""
    accepted: str = ""
    """For a bug that is a silent acceptance: what QEMU accepted."""


CASES: dict[str, BadConfig] = {
    "size-not-page-multiple": BadConfig(Faults(shmem_raw_sizes={0: 4 * M + 512}), "page"),
    "reply-flags-wrong": BadConfig(
        Faults(shmem_reply_flags=0x1), "Flags 0x1 instead of 0x5", bug="vub-get-features-abort"
    ),
    "disconnect-at-get-shmem-config": BadConfig(
        Faults(disconnect_at=Request.GET_SHMEM_CONFIG),
        "Original request 44",
        bug="vub-get-features-abort",
    ),
    "total-not-power-of-two": BadConfig(
        Faults(shmem_raw_sizes={0: 4 * M, 1: 16 * M}),
        "power of 2",
        bug="bar-not-power-of-two-abort",
    ),
    "four-regions-on-root-bus": BadConfig(
        Faults(),
        "capabilit",
        regions={0: 2 * M, 1: 2 * M, 2: 2 * M, 3: 2 * M},
        bug="shmem-caps-overflow-abort",
    ),
    "reply-truncated": BadConfig(
        Faults(shmem_truncate=16),
        "GET_SHMEM_CONFIG",
        bug="truncated-shmem-config-accepted",
        accepted="a truncated GET_SHMEM_CONFIG reply (16 of 2056 bytes)",
    ),
    "nregions-disagrees-with-sizes": BadConfig(
        Faults(shmem_nregions=2),
        "GET_SHMEM_CONFIG",
        bug="nregions-mismatch-accepted",
        accepted="nregions 2 with one non-zero size",
    ),
    "nregions-above-256": BadConfig(
        Faults(shmem_nregions=257), "too many shared memory regions: 257"
    ),
    "nregions-u32-max": BadConfig(
        Faults(shmem_nregions=0xFFFFFFFF), "too many shared memory regions"
    ),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[known_bug(case.bug)] if case.bug else [])
        for name, case in CASES.items()
    ],
)
def test_bad_config_is_refused(boot: Boot, name: str) -> None:
    case = CASES[name]
    try:
        device = VhostUserDevice.of(case.regions, faults=case.faults, allow_overfull=True)
        boot(device, boot_timeout=60)
    except QemuExited as exc:
        assert exc.returncode == 1, f"QEMU exited {exc.returncode}, want 1 (refused): {exc}"
        stderr = exc.stderr_tail
        assert case.message.lower() in stderr.lower(), (
            f"QEMU's message does not mention {case.message!r}:\n{stderr}"
        )
        return
    if case.accepted:
        raise KnownBugSeen(case.bug, f"QEMU started the guest after {case.accepted}")
    pytest.fail(f"QEMU started the guest despite {name}; it should have refused")
