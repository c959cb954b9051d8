"""Device models behind the back-end: features, config space, queues and requests.

- base.py  DeviceModel (the interface), Completion, Problem, DeviceHost
- test.py  TestDevice: the plain test device, no request processing
- pmem.py  PmemDevice: virtio-pmem (virtio-id 27), its range in shared-memory region 0
"""

from testbed.vhost_user.devices.base import Completion, DeviceHost, DeviceModel, Problem
from testbed.vhost_user.devices.pmem import PmemDevice
from testbed.vhost_user.devices.test import TestDevice

__all__ = ["Completion", "DeviceHost", "DeviceModel", "PmemDevice", "Problem", "TestDevice"]
