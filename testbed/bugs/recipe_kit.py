"""What the guest-less reproducers share (testbed.bugs.recipes, recipes_fds, recipes_fuzz):
the device a recipe plugs (the test device, or another built on vhost-user-base: `testbed
bugs check --device`), starting it, and the checks that read the same on every device.
"""

from __future__ import annotations

from typing import Any

from testbed.bugs.recording import RecipeFailed, Run
from testbed.device import ShmemLayout, VhostUserDevice
from testbed.fuzz.grammar import Case, Offer, ReplyMutation, ShmemConfig
from testbed.machine import QtestMachine
from testbed.machine.probe import pci_bar
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import Request

M = 1 << 20


def device(run: Run, layout: ShmemLayout, **kwargs: Any) -> VhostUserDevice:
    """The recipe's device: the run's type (its queue count is the type's own)."""
    base = run.base
    if not base.shmem_bar:
        kwargs.setdefault("num_vqs", base.queues)
    return VhostUserDevice("vu0", run.socket, layout, device_type=base.type, **kwargs)


def realize_with(run: Run, layout: ShmemLayout, faults: Faults, **options: Any) -> None:
    """Cold-plug one device served with ``faults``: the crash comes in realize."""
    run.start_backend(ShmemLayout() if faults.shmem_raw_sizes else layout, faults)
    run.start_qemu([device(run, layout, **options)], qtest=False)
    run.wait_request(Request.GET_SHMEM_CONFIG)


def started(run: Run, layout: ShmemLayout) -> QtestMachine:
    """A device at DRIVER_OK (qtest plays the guest's driver)."""
    run.start_backend(layout)
    machine = run.start_qemu([device(run, layout)])
    run.start_device()
    return machine


def bent(run: Run, sizes: dict[int, int], *replies: ReplyMutation, **offer: Any) -> Case:
    """The fuzzer's case a fuzz-found bug's recipe plays: a config, bent replies, an offer
    (the run's device type decides the queue count and CONFIG)."""
    return Case(run.arch, 0, 0, Offer(**offer), ShmemConfig(sizes), tuple(replies))


def bar4_address(machine: QtestMachine) -> int:
    bar = pci_bar(machine.pci_device(), 4)
    if bar is None:
        raise RecipeFailed("the device has no BAR 4")
    return int(bar["address"])


def check_config_taken(run: Run, total: int, say: str) -> None:
    """What shows that QEMU took a GET_SHMEM_CONFIG reply it should have refused: on the
    test device, a BAR 4 of the config's total; on a device that keeps its regions inside
    QEMU (no shared-memory BAR), the device realized at all."""
    if run.base.shmem_bar:
        run.check_bar4(total, say)
    else:
        run.check_device(say)
