"""Bad back-end configurations: each must end in a clear error and QEMU must not crash.

The back-end's fault injection bends one thing at a time. Cold-plugged, the right outcome
is QEMU refusing to start: exit status 1 (not a signal) with a message naming the problem.
Where QEMU 11.1.3 misbehaves instead (crashes, or starts as if nothing were wrong), the case
is a strict expected failure quoting what QEMU does, so that it turns visible (XPASS, which
strict mode fails) the day QEMU is fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from testbed.errors import QemuExited
from testbed.pytest_plugin import KnownQemuBug, known_qemu_bug, raise_if_known_crash
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import Request
from testbed.vm import GuestVM

M = 1 << 20
# Seen with every fault that makes GET_SHMEM_CONFIG fail: QEMU logs the error, carries on
# realizing the device with no back-end features, and aborts.
VUB_ABORT = "vub_get_features: assertion failed: (backend_features)"


@dataclass(frozen=True)
class BadConfig:
    faults: Faults
    message: str
    """What QEMU's error message must mention (case-insensitive)."""
    regions: dict[int, int] = field(default_factory=lambda: {0: 4 * M})
    crash: str = ""
    """Known QEMU 11.1.3 crash: a piece of its abort message."""
    accepts: str = ""
    """Known QEMU 11.1.3 bug: it starts the guest although it should refuse."""


CASES: dict[str, BadConfig] = {
    "size-not-page-multiple": BadConfig(Faults(shmem_raw_sizes={0: 4 * M + 512}), "page"),
    "reply-flags-wrong": BadConfig(
        Faults(shmem_reply_flags=0x1), "Flags 0x1 instead of 0x5", crash=VUB_ABORT
    ),
    "disconnect-at-get-shmem-config": BadConfig(
        Faults(disconnect_at=Request.GET_SHMEM_CONFIG), "Original request 44", crash=VUB_ABORT
    ),
    "total-not-power-of-two": BadConfig(
        Faults(shmem_raw_sizes={0: 4 * M, 1: 16 * M}),
        "power of 2",
        crash="pci_register_bar: Assertion `is_power_of_2(size)' failed",
    ),
    "four-regions-on-root-bus": BadConfig(
        Faults(),
        "capabilit",
        regions={0: 2 * M, 1: 2 * M, 2: 2 * M, 3: 2 * M},
        crash="pci_add_capability: Assertion `offset' failed",
    ),
    "reply-truncated": BadConfig(
        Faults(shmem_truncate=16),
        "GET_SHMEM_CONFIG",
        accepts="a GET_SHMEM_CONFIG reply of 16 of 2056 bytes (reads the rest as zeros)",
    ),
    "nregions-disagrees-with-sizes": BadConfig(
        Faults(shmem_nregions=2),
        "GET_SHMEM_CONFIG",
        accepts="nregions 2 with one non-zero size (keeps the one region it finds)",
    ),
}


def _marks(case: BadConfig) -> list[pytest.MarkDecorator]:
    if case.crash:
        return [known_qemu_bug(f"QEMU 11.1.3 aborts: {case.crash}")]
    if case.accepts:
        return [known_qemu_bug(f"QEMU 11.1.3 starts the guest after {case.accepts}")]
    return []


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=_marks(case)) for name, case in CASES.items()]
)
def test_bad_config_is_refused(boot: Callable[..., GuestVM], name: str) -> None:
    case = CASES[name]
    try:
        boot(regions=case.regions, faults=case.faults, allow_overfull=True, boot_timeout=60)
    except QemuExited as exc:
        if case.crash:
            raise_if_known_crash(exc, case.crash)
        assert exc.returncode is not None
        assert exc.returncode >= 0, f"QEMU crashed instead of refusing: {exc}"
        assert exc.returncode == 1, f"QEMU exited {exc.returncode}, want 1 (refused): {exc}"
        stderr = exc.stderr_tail
        assert case.message.lower() in stderr.lower(), (
            f"QEMU's message does not mention {case.message!r}:\n{stderr}"
        )
        return
    if case.accepts:
        raise KnownQemuBug(f"QEMU started the guest after {case.accepts}")
    pytest.fail(f"QEMU started the guest despite {name}; it should have refused")
