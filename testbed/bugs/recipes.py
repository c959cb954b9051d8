"""Guest-less reproducers, one recipe per registry entry: the steps each bug needs, taken on
a ``Run`` (testbed.bugs.recording) -- our back-end with the bug's ``Faults``, a guest-less
QEMU (qtest accel, or tcg -S), QMP and qtest -- and the checks that show a silent bug.
testbed.bugs.runner runs them; `testbed bugs check` reports the outcome and `testbed bugs
export` writes the recorded script.

The recipes of the fd bugs are in testbed.bugs.recipes_fds, those of the bugs the fuzzer
found in testbed.bugs.recipes_fuzz, their shared parts (the device, `--device`) in
testbed.bugs.recipe_kit. A bug without a recipe on an arch (unplug-channel-close-hangup-
segfault on aarch64: virt's hot-unplug needs a guest's pciehp) reruns its scenario
(testbed.bugs.rerun), or replays its corpus case.
"""

from __future__ import annotations

import contextlib

from testbed.bugs.recipe_kit import (
    M,
    bar4_address,
    check_config_taken,
    device,
    realize_with,
    started,
)
from testbed.bugs.recipes_fds import FD_RECIPES
from testbed.bugs.recipes_fuzz import FUZZ_RECIPES
from testbed.bugs.recording import Recipe, RecipeFailed, Run
from testbed.device import ShmemLayout
from testbed.errors import PeerClosed
from testbed.fuzz.fdspec import FdKind
from testbed.machine.cmdline import behind_root_port_options, root_port_id
from testbed.machine.qtest import acpi_eject, open_root_port
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import BackendRequest, MMap, Request


def vub_get_features_abort(run: Run) -> None:
    realize_with(run, ShmemLayout({0: 4 * M}), Faults(shmem_reply_flags=0xD))


def bar_not_power_of_two_abort(run: Run) -> None:
    realize_with(run, ShmemLayout(), Faults(shmem_raw_sizes={0: 4 * M, 1: 16 * M}))


def shmem_caps_overflow_abort(run: Run) -> None:
    four = ShmemLayout({0: 2 * M, 1: 2 * M, 2: 2 * M, 3: 2 * M})
    realize_with(run, four, Faults(), allow_overfull=True)


def truncated_shmem_config_accepted(run: Run) -> None:
    realize_with(run, ShmemLayout({0: 2 * M, 1: 2 * M}), Faults(shmem_truncate=100))
    say = "QEMU accepted a truncated GET_SHMEM_CONFIG reply (100 of 2056 bytes)"
    check_config_taken(run, 4 * M, say)


def nregions_mismatch_accepted(run: Run) -> None:
    realize_with(run, ShmemLayout({0: 4 * M}), Faults(shmem_nregions=2))
    check_config_taken(run, 4 * M, "nregions 2 with one non-zero size accepted")


def queue_num_ignored(run: Run) -> None:
    """A 2-queue device, a back-end that answers GET_QUEUE_NUM with 1: realize goes on and
    QEMU sets up ring 1 (SET_VRING_CALL/ERR at realize)."""
    realize_with(run, ShmemLayout(), Faults(queue_num=1), num_vqs=2)
    run.check_rings(1, "set up ring 1 after the back-end answered GET_QUEUE_NUM with 1")


def readonly_map_writable(run: Run) -> None:
    """Both faces of the one cause (QEMU maps a read-only request writable): a read-only
    map of a memfd opened read-only is refused; a guest write through a read-only map of
    a read-write memfd reaches the file (on a device whose regions the guest sees)."""
    layout = ShmemLayout({0: 2 * M, 1: 2 * M})
    machine = started(run, layout)
    ro = run.fd(FdKind.ROFD, M)
    refused = run.channel(BackendRequest.SHMEM_MAP, MMap(1, 0, 0, M, 0).pack(), [ro])
    run.check_result(refused, 1, "read-only SHMEM_MAP of a memfd opened read-only refused")
    if not run.base.shmem_bar:
        return
    pattern = bytes(range(256)) * 16
    mem = run.memfd(M, pattern)
    result = run.channel(BackendRequest.SHMEM_MAP, MMap(0, 0, 0, M, 0).pack(), [mem])
    if run.results[result] != 0:
        raise RecipeFailed(f"QEMU refused the read-only SHMEM_MAP (u64 {run.results[result]})")
    run.qtest_write(bar4_address(machine), b"guest wrote through a read-only map")
    run.check_memfd(mem, 0, pattern[:64], "write through a read-only mapping reached the memfd")


def _channel_accepts(run: Run, body: bytes, say: str) -> None:
    layout = ShmemLayout({0: 2 * M, 1: 2 * M})
    started(run, layout)
    mem = run.memfd(M)
    result = run.channel(BackendRequest.SHMEM_MAP, body, [mem])
    run.check_result(result, 0, say)


def shmem_map_unknown_flags_accepted(run: Run) -> None:
    body = MMap(0, 0, 0, M, 0xF0).pack()
    _channel_accepts(run, body, "SHMEM_MAP ignores unknown flag bits (0xf0): QEMU answered 0")


def shmem_map_payload_size_accepted(run: Run) -> None:
    body = MMap(0, 0, 0, M, 1).pack()[:-8]
    _channel_accepts(run, body, f"SHMEM_MAP with a {len(body)}-byte payload is mapped")


def reconnect_realize_no_wait(run: Run) -> None:
    """Cold-plugged with reconnect-ms: the chardev connects in the background, realize
    does not wait for it (QEMU exits 1 with "Failed to set msg fds")."""
    layout = ShmemLayout({0: 4 * M})
    run.start_backend(layout)
    run.start_qemu([device(run, layout, reconnect_ms=200)], qtest=False)


def backend_hangup_del_eventfd_abort(run: Run) -> None:
    """Closed right after realize (no driver: as in the guest scenario, where nothing binds
    to the device). Measured: once qtest has driven the device to DRIVER_OK, the hang-up
    is survived ("Unexpected end-of-file"); the abort is the realized-not-started path."""
    layout = ShmemLayout({0: 4 * M})
    run.start_backend(layout)
    run.start_qemu([device(run, layout)], qtest=False)
    run.wait_request(Request.GET_SHMEM_CONFIG)
    run.close_backend()
    run.wait_exit()


def unplug_live_mapping_del_subregion_abort(run: Run) -> None:
    """Cold-plugged behind a pcie-root-port (q35 hot-unplugs through ACPI there), started
    and mapped; then device_del and the eject a guest's ACPI _EJ0 would write, over qtest."""
    layout = ShmemLayout({0: 4 * M})
    run.start_backend(layout)
    behind = device(run, layout, bus=root_port_id(0), addr=0)
    run.start_qemu([], extra_args=behind_root_port_options(run.arch, behind))
    with run.recording_qtest() as client:
        function = open_root_port(client, run.arch)
    run.start_device(function)
    mem = run.memfd(64 * 1024, bytes(range(256)) * 256)
    result = run.channel(BackendRequest.SHMEM_MAP, MMap(0, 0, M, 64 * 1024, 1).pack(), [mem])
    if run.results[result] != 0:
        raise RecipeFailed(f"QEMU refused the SHMEM_MAP (u64 {run.results[result]})")
    run.qmp("device_del", {"id": behind.device_id})
    with run.recording_qtest() as client:
        acpi_eject(client)
    run.wait_exit()


def shmem_map_stopped_device_segfault(run: Run) -> None:
    """SHMEM_MAP on the channel of a realized device nobody started (no DRIVER_OK)."""
    layout = ShmemLayout({0: 2 * M, 1: 2 * M})
    run.start_backend(layout)
    run.start_qemu([device(run, layout)], qtest=False)
    run.wait_request(Request.GET_SHMEM_CONFIG)
    mem = run.memfd(64 * 1024)
    body = MMap(1, 0, M, 64 * 1024, 1).pack()
    with contextlib.suppress(PeerClosed):  # QEMU dies instead of answering
        run.channel(BackendRequest.SHMEM_MAP, body, [mem], unguarded=True)
    run.wait_exit()


RECIPES: dict[str, Recipe] = {
    "vub-get-features-abort": vub_get_features_abort,
    "bar-not-power-of-two-abort": bar_not_power_of_two_abort,
    "shmem-caps-overflow-abort": shmem_caps_overflow_abort,
    "truncated-shmem-config-accepted": truncated_shmem_config_accepted,
    "nregions-mismatch-accepted": nregions_mismatch_accepted,
    "readonly-map-writable": readonly_map_writable,
    "reconnect-realize-no-wait": reconnect_realize_no_wait,
    "backend-hangup-del-eventfd-abort": backend_hangup_del_eventfd_abort,
    "shmem-map-unknown-flags-accepted": shmem_map_unknown_flags_accepted,
    "shmem-map-payload-size-accepted": shmem_map_payload_size_accepted,
    "unplug-live-mapping-del-subregion-abort": unplug_live_mapping_del_subregion_abort,
    "shmem-map-stopped-device-segfault": shmem_map_stopped_device_segfault,
    "queue-num-ignored": queue_num_ignored,
    **FD_RECIPES,
    **FUZZ_RECIPES,
}
"""Bugs without an entry here are rerun through their scenario (needs_guest ones)."""
