"""The device side of vhost-user-test-device-pci: a back-end serving a shared-memory layout.

Shaped after rust-vmm vhost's back-end, one job per module:

- server.py    Backend: listen/connect, the serving thread, sessions, waits with deadlines
- session.py   Session (one connection's state) and DisconnectKind
- dispatch.py  the dispatcher: checks each request before dispatch (by the spec's rules,
               testbed.vhost_user.rules), owns negotiation, answers replies and REPLY_ACK
- handlers.py  the device logic: one handler per front-end request, in a table by Request
- offer.py     what we offer: feature bits, the GET_SHMEM_CONFIG body (pure)
- mappings.py  the memory-table and vring fds QEMU handed over, owned until replaced
- channel.py   the back-end channel client: SHMEM_MAP/UNMAP and QEMU's u64 verdict
"""

from testbed.vhost_user.backend.server import Backend
from testbed.vhost_user.backend.session import DisconnectKind, Session

# The spec's rules (what QEMU may send, Violation) live in testbed.vhost_user.rules, shared
# with the relay; Violation is re-exported here for the code that imports it from here.
from testbed.vhost_user.rules import Violation

__all__ = ["Backend", "DisconnectKind", "Session", "Violation"]
