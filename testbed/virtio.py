"""The virtio-pci driver steps the test bed plays by hand, written once (pure, no I/O).

Nothing drives vhost-user-test-device-pci to DRIVER_OK for us: the guest has no driver for
it (virtio-pci binds and stops at ACKNOWLEDGE), and a guest-less QEMU has no guest at all.
So two transports play the same register program: busybox devmem over SSH in a guest
(testbed.guest.datapath) and qtest memory accesses without one (testbed.machine.qtest).
Both execute `DRIVER_OK_PROGRAM`, so the recipe cannot drift between them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from testbed.errors import StateError

# virtio 1.x, struct virtio_pci_common_cfg: offsets in the cfg_type 1 structure.
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
NOTIFY_OFF_MULTIPLIER = 16
"""Offset of notify_off_multiplier (le32) in the notify capability (struct
virtio_pci_notify_cap)."""
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
DEVICE_STATUS = 0x14
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30

STATUS_ACKNOWLEDGE = 0x1
STATUS_DRIVER = 0x2
STATUS_DRIVER_OK = 0x4
STATUS_FEATURES_OK = 0x8
STATUS_FAILED = 0x80
# VIRTIO_F_VERSION_1 is feature bit 32: bit 0 of the high feature word (select 1).
VERSION_1_HIGH_WORD = 0x1
F_VERSION_1 = 1 << 32


@dataclass(frozen=True)
class Write:
    """Write ``value`` (``width`` bits) at ``offset`` of the common config."""

    offset: int
    width: int
    value: int


@dataclass(frozen=True)
class Expect:
    """Read ``width`` bits at ``offset``; every bit of ``mask`` must be set (``clear``:
    none of them may be set)."""

    offset: int
    width: int
    mask: int
    what: str
    clear: int = 0


Step = Write | Expect

_ACKED = STATUS_ACKNOWLEDGE | STATUS_DRIVER
_FEATURES_OK = _ACKED | STATUS_FEATURES_OK


@dataclass(frozen=True)
class QueueSetup:
    """Where the driver put virtqueue ``index`` (guest-physical addresses) and its size."""

    index: int
    size: int
    desc: int
    driver: int
    """The available ring (driver area)."""
    device: int
    """The used ring (device area)."""


ACKNOWLEDGE_PROGRAM: tuple[Step, ...] = (
    Write(DEVICE_STATUS, 8, 0),  # reset first: start from a known state
    Write(DEVICE_STATUS, 8, STATUS_ACKNOWLEDGE),
    Write(DEVICE_STATUS, 8, _ACKED),
)
"""Reset, ACKNOWLEDGE, DRIVER: a driver may now read the device's features."""


def _write64(offset: int, value: int) -> tuple[Write, Write]:
    # Two 32-bit halves, low first, as Linux's vp_iowrite64_twopart does.
    return Write(offset, 32, value & 0xFFFFFFFF), Write(offset + 4, 32, value >> 32)


def queue_program(queue: QueueSetup) -> tuple[Step, ...]:
    """Select the queue, give its size and areas, enable it."""
    return (
        Write(QUEUE_SELECT, 16, queue.index),
        Write(QUEUE_SIZE, 16, queue.size),
        *_write64(QUEUE_DESC, queue.desc),
        *_write64(QUEUE_DRIVER, queue.driver),
        *_write64(QUEUE_DEVICE, queue.device),
        Write(QUEUE_ENABLE, 16, 1),
    )


def negotiate_program(
    features: int = F_VERSION_1, queues: Sequence[QueueSetup] = ()
) -> tuple[Step, ...]:
    """After ACKNOWLEDGE_PROGRAM: accept ``features``, FEATURES_OK, set the queues up,
    DRIVER_OK."""
    what = "VERSION_1 only" if features == F_VERSION_1 else f"features {features:#x}"
    return (
        Write(DRIVER_FEATURE_SELECT, 32, 1),
        Write(DRIVER_FEATURE, 32, features >> 32),
        Write(DRIVER_FEATURE_SELECT, 32, 0),
        Write(DRIVER_FEATURE, 32, features & 0xFFFFFFFF),
        Write(DEVICE_STATUS, 8, _FEATURES_OK),
        Expect(DEVICE_STATUS, 8, STATUS_FEATURES_OK, f"FEATURES_OK ({what})"),
        *(step for queue in queues for step in queue_program(queue)),
        Write(DEVICE_STATUS, 8, _FEATURES_OK | STATUS_DRIVER_OK),
        Expect(DEVICE_STATUS, 8, STATUS_DRIVER_OK, "DRIVER_OK", clear=STATUS_FAILED),
    )


DRIVER_OK_PROGRAM: tuple[Step, ...] = ACKNOWLEDGE_PROGRAM + negotiate_program()
"""A virtio driver that negotiates VERSION_1 only and sets DRIVER_OK (the measured recipe)."""

RESET_PROGRAM: tuple[Step, ...] = (
    Write(DEVICE_STATUS, 8, 0),
    Expect(DEVICE_STATUS, 8, 0, "status 0 after reset", clear=0xFF),
)
"""A virtio reset: device_status 0, read back as 0."""


def check(step: Expect, value: int, device: str) -> None:
    """Raise StateError when ``value`` read for ``step`` does not show what it expects."""
    if value & step.mask != step.mask or value & step.clear:
        raise StateError(f"status {value:#x}", step.what, device)


def run_program(
    program: tuple[Step, ...],
    write: Callable[[Write], None],
    read: Callable[[Expect], int],
    device: str,
) -> None:
    """Play ``program`` through a transport's ``write`` and ``read`` (one access each)."""
    for step in program:
        if isinstance(step, Write):
            write(step)
        else:
            check(step, read(step), device)
