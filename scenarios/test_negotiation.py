"""Feature negotiation: QEMU asks for the shared-memory configuration only when the
back-end offers VHOST_USER_PROTOCOL_F_SHMEM at the bit QEMU 11.1 knows (22); a slow
answer is waited for, not mistaken for a refusal.

The handshake is the device's realize, the same for a device on the command line and one
added with device_add: the realize sequence at boot is checked cold-plugged, the rest is
negotiated through hot-plug into a guest restored from its snapshot (testbed.snapshot)."""

from __future__ import annotations

import pytest

from testbed.device import VhostUserDevice
from testbed.pytest_plugin import Boot
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import F_SHMEM, Request

M = 1 << 20

WITHOUT_SHMEM = {
    "not-offered": Faults(no_shmem=True),
    # Early postings of the series used 20, other implementations 21: QEMU 11.1 uses 22.
    "offered-at-bit-20": Faults(shmem_bit=20),
    "offered-at-bit-21": Faults(shmem_bit=21),
}


@pytest.mark.parametrize("name", list(WITHOUT_SHMEM))
def test_without_shmem_qemu_never_asks(boot: Boot, name: str) -> None:
    vm = boot(VhostUserDevice.of({0: 4 * M}, faults=WITHOUT_SHMEM[name]), plug="hot")
    vm.check_guest_sees({})
    seen = vm.backend.requests_seen
    assert Request.GET_PROTOCOL_FEATURES in seen, f"the handshake did not happen: {seen}"
    assert Request.GET_SHMEM_CONFIG not in seen, f"QEMU asked for the config anyway: {seen}"


def test_handshake_order(boot: Boot) -> None:
    """The realize sequence QEMU 11.1.3 sends at boot, in order, ending with
    GET_SHMEM_CONFIG (cold-plugged: the device is on QEMU's command line)."""
    vm = boot(VhostUserDevice.of({0: 4 * M}))
    seen = vm.backend.requests_seen
    expected_prefix = [
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
    ]
    assert seen[: len(expected_prefix)] == expected_prefix, f"handshake began {seen[:6]}"
    assert Request.SET_BACKEND_REQ_FD in seen and Request.SET_OWNER in seen, seen
    assert seen.count(Request.GET_SHMEM_CONFIG) == 1, f"GET_SHMEM_CONFIG not once: {seen}"
    assert seen.index(Request.SET_BACKEND_REQ_FD) < seen.index(Request.GET_SHMEM_CONFIG)
    assert F_SHMEM == 22


def test_slow_reply_is_waited_for(boot: Boot) -> None:
    """A GET_SHMEM_CONFIG answer delayed by 2 s: QEMU blocks for it and then uses it."""
    layout = {1: 8 * M}
    delayed = Faults(delay_request=Request.GET_SHMEM_CONFIG, delay_seconds=2.0)
    vm = boot(VhostUserDevice.of(layout, faults=delayed), plug="hot")
    vm.check_guest_sees()
