"""The device side of vhost-user-test-device-pci: a back-end serving a shared-memory layout.

Shaped after rust-vmm vhost's back-end, one job per module:

- server.py    Backend: the serving thread and its sessions (lifecycle and waits: the
               Endpoint's, testbed/vhost_user/endpoint.py, shared with the relay)
- session.py   Session (one connection's state) and DisconnectKind
- dispatch.py  the dispatcher: checks each request before dispatch (by the spec's rules,
               testbed.vhost_user.rules), owns negotiation, answers replies and REPLY_ACK
- handlers.py  one handler per front-end request, in a table by Request (device specifics
               come from the device model, testbed.vhost_user.devices)
- offer.py     what we offer: feature bits, the GET_SHMEM_CONFIG body (pure)
- mappings.py  the memory-table and vring fds QEMU handed over, owned until replaced
- vrings.py    each ring's state, and serving a kicked ring for the device model
- deferred.py  a worker for what the serving thread must not wait for (a model's SHMEM_MAP)
- channel.py   the back-end channel client: SHMEM_MAP/UNMAP and QEMU's u64 verdict
"""

from testbed.vhost_user.backend.server import Backend
from testbed.vhost_user.backend.session import DisconnectKind, Session

# The spec's rules (what QEMU may send, Violation) live in testbed.vhost_user.rules, shared
# with the relay; Violation is re-exported here for the code that imports it from here.
from testbed.vhost_user.rules import Violation

__all__ = ["Backend", "DisconnectKind", "Session", "Violation"]
