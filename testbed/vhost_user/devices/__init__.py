"""Device models behind the back-end: features, config space, queues and requests.

- base.py   DeviceModel (the interface), Completion, Later, Problem, DeviceHost
- test.py   TestDevice: the plain test device, no request processing
- pmem.py   PmemDevice: virtio-pmem (virtio-id 27), its range in shared-memory region 0
- fs.py     VirtioFsDevice: virtio-fs (virtio-id 26) over testbed.fuse's FuseServer
- fsdax.py  ShmemMapper: virtio-fs DAX as SHMEM_MAP/UNMAP on region 0, and its account
- spec.py   VirtioFsSpec, PmemSpec: frozen descriptions, built into models by the back-end
"""

from testbed.vhost_user.devices.base import Completion, DeviceHost, DeviceModel, Later, Problem
from testbed.vhost_user.devices.fs import VirtioFsDevice
from testbed.vhost_user.devices.fsdax import MapperStats, ShmemMapper
from testbed.vhost_user.devices.pmem import PmemDevice
from testbed.vhost_user.devices.spec import DeviceSpec, PmemSpec, VirtioFsSpec
from testbed.vhost_user.devices.test import TestDevice

__all__ = [
    "Completion",
    "DeviceHost",
    "DeviceModel",
    "DeviceSpec",
    "Later",
    "MapperStats",
    "PmemDevice",
    "PmemSpec",
    "Problem",
    "ShmemMapper",
    "TestDevice",
    "VirtioFsDevice",
    "VirtioFsSpec",
]
