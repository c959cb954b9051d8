"""Guest-less reproducers of the bugs `testbed fuzz` found, written from their minimised
corpus cases (tests/data/fuzz-corpus/): the fuzzer's own back-end (testbed.fuzz.backend)
plays the case's offer, config and bent replies, recorded byte for byte, so that `testbed
bugs export` writes a repro.py for each like for any other bug.
"""

from __future__ import annotations

import contextlib

from testbed.bugs.recipe_kit import M, bent, check_config_taken, device
from testbed.bugs.recording import NO_ANSWER, Recipe, Run
from testbed.device import ShmemLayout
from testbed.errors import PeerClosed, QemuExited
from testbed.fuzz.grammar import ReplyKind, ReplyMutation
from testbed.machine.cmdline import behind_root_port_options, root_port_id
from testbed.machine.qtest import PciFunctionDriver, acpi_eject, open_root_port
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import BackendRequest, MMap, ProtocolFeature, Request
from testbed.virtio import DEVICE_STATUS

SIZES = {0: 2 * M, 1: 2 * M}
LAYOUT = ShmemLayout(SIZES)


def _start(run: Run) -> PciFunctionDriver:
    """DRIVER_OK over qtest without waiting for the back-end to see the device start (a
    start the bug makes fail never gets there)."""
    with run.recording_qtest() as client:
        driver = PciFunctionDriver(client, run.arch)
        driver.start_device()
    return driver


def _reset(run: Run, driver: PciFunctionDriver) -> None:
    """device_status 0, as a guest's driver resets the device."""
    run.qtest_write(driver.common_address(DEVICE_STATUS), b"\0")


def backend_reconnect_vhost_dev_start_abort(run: Run) -> None:
    """QEMU listens; the back-end connects, the guest starts the device, the back-end
    hangs up and connects again."""
    case = bent(run, SIZES)
    run.start_bent_backend(case, dial=True)
    run.start_qemu([device(run, LAYOUT)], listen=True)
    run.start_device()
    run.close_backend()
    with contextlib.suppress(QemuExited, PeerClosed):
        run.redial(case)
    run.wait_exit()


def shmem_config_reply_request_unchecked(run: Run) -> None:
    """GET_SHMEM_CONFIG answered by a reply that names request 1."""
    run.start_bent_backend(bent(run, SIZES, ReplyMutation(Request.GET_SHMEM_CONFIG, "request", 1)))
    run.start_qemu([device(run, LAYOUT)], qtest=False)
    run.wait_request(Request.GET_SHMEM_CONFIG)
    say = "GET_SHMEM_CONFIG accepted: a reply carrying request 1 taken as request 44's"
    check_config_taken(run, 4 * M, say)


def _start_reset_count(run: Run, mutation: ReplyMutation, say: str) -> None:
    """QEMU's fds once realized, then after a device start (with ``mutation``) and a reset."""
    run.start_bent_backend(bent(run, SIZES, mutation))
    run.start_qemu([device(run, LAYOUT)])
    run.wait_request(Request.GET_SHMEM_CONFIG)
    run.count_fds("realized")
    driver = _start(run)
    _reset(run, driver)
    run.check_fds_grew("realized", say)


def failed_start_eventfd_leak(run: Run) -> None:
    """SET_VRING_ENABLE's REPLY_ACK with header flags 0: the start fails."""
    mutation = ReplyMutation(Request.SET_VRING_ENABLE, ReplyKind.FLAGS, 0)
    _start_reset_count(run, mutation, "the device stopped both times: eventfd")


def reply_fds_kept(run: Run) -> None:
    """GET_STATUS answered with three memfds attached."""
    mutation = ReplyMutation(Request.GET_STATUS, ReplyKind.FDS, 3)
    _start_reset_count(run, mutation, "the device stopped both times: the back-end's memfd")


def shmem_map_extra_fds_accepted(run: Run) -> None:
    """SHMEM_MAP with two memfds."""
    run.start_bent_backend(bent(run, SIZES))
    run.start_qemu([device(run, LAYOUT)])
    run.start_device()
    one, two = run.memfd(M), run.memfd(M)
    result = run.channel(BackendRequest.SHMEM_MAP, MMap(0, 0, 0, M, 1).pack(), [one, two])
    run.check_result(result, 0, "SHMEM_MAP with 2 fds accepted")


# An IOTLB miss QEMU can look up: an iova in guest RAM (x86_64 q35's starts at 0, aarch64
# virt's at 1 GiB); outside RAM QEMU answers 1 ("Fail to lookup the translated address").
IOTLB_IOVA = {"x86_64": 0x1000, "aarch64": 0x40000000}
IOTLB_MISS = 1
HANG_TIMEOUT = 3.0


def iotlb_miss_need_reply_hang(run: Run) -> None:
    """No REPLY_ACK offered; after DRIVER_OK the back-end sends an IOTLB miss."""
    withheld = int(ProtocolFeature.REPLY_ACK)
    run.start_bent_backend(bent(run, SIZES, withhold=withheld))
    run.start_qemu([device(run, LAYOUT)])
    run.start_device()
    miss = IOTLB_IOVA[run.arch].to_bytes(8, "little") + (4096).to_bytes(8, "little")
    miss += bytes(8) + bytes([0, IOTLB_MISS]) + bytes(6)
    result = run.channel(
        BackendRequest.IOTLB_MSG, miss, may_fail=True, timeout=HANG_TIMEOUT, unguarded=True
    )
    run.check_result(result, NO_ANSWER, "IOTLB_MSG went unanswered")
    say = f"QMP silent for {HANG_TIMEOUT:.0f}s after IOTLB_MSG went unanswered"
    run.check_qmp_silent(HANG_TIMEOUT, say)


def unplug_channel_close_hangup_segfault(run: Run) -> None:
    """Behind a root port (q35: ACPI hot-plug, guest-less through qtest): device_del, the
    eject, and a back-end that hangs up when QEMU closes the back-end channel."""
    one = ShmemLayout({0: 4 * M})  # one region: all a root port's config space holds
    run.start_backend(one, Faults(hang_up_on_channel_close=True))
    behind = device(run, one, bus=root_port_id(0), addr=0)
    run.start_qemu([], extra_args=behind_root_port_options(run.arch, behind))
    with run.recording_qtest() as client:
        open_root_port(client, run.arch)
    run.qmp("device_del", {"id": behind.device_id})
    with run.recording_qtest() as client:
        acpi_eject(client)
    run.wait_exit()


FUZZ_RECIPES: dict[str, Recipe] = {
    "backend-reconnect-vhost-dev-start-abort": backend_reconnect_vhost_dev_start_abort,
    "shmem-config-reply-request-unchecked": shmem_config_reply_request_unchecked,
    "failed-start-eventfd-leak": failed_start_eventfd_leak,
    "reply-fds-kept": reply_fds_kept,
    "shmem-map-extra-fds-accepted": shmem_map_extra_fds_accepted,
    "iotlb-miss-need-reply-hang": iotlb_miss_need_reply_hang,
    "unplug-channel-close-hangup-segfault": unplug_channel_close_hangup_segfault,
}
RECIPE_ARCHES: dict[str, tuple[str, ...]] = {
    # virt's native PCIe hot-plug needs a guest's pciehp: aarch64 reruns the scenario.
    "unplug-channel-close-hangup-segfault": ("x86_64",),
}
"""Recipes for some arches only; on the others the bug's scenario is rerun."""
RECIPE_ATTEMPTS: dict[str, int] = {
    # A race between QEMU's unrealize and the back-end's hang-up: measured 11 of 12 runs
    # on a loaded 2-core host. The reproducer tries a fresh QEMU up to this many times.
    "unplug-channel-close-hangup-segfault": 3,
}
"""Recipes of a race: how many tries before the bug counts as not reproduced."""
