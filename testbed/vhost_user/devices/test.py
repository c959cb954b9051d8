"""The plain vhost-user-test-device as the back-end always served it: a shared-memory
layout, any number of queues, no config space, and no request processing -- its rings'
state is kept for QEMU (GET_VRING_BASE answers what SET_VRING_BASE said) but a kick is
never served, so scenarios and the fuzzer that drive it see exactly what they saw before
the back-end had virtqueues."""

from __future__ import annotations

from testbed.device import ShmemLayout
from testbed.vhost_user.devices.base import DeviceModel


class TestDevice(DeviceModel):
    __test__ = False  # not a pytest test class, despite the name

    name = "test"
    serves_queues = False

    def __init__(self, layout: ShmemLayout | None = None, num_queues: int = 1) -> None:
        super().__init__(num_queues=num_queues, layout=layout)
