"""virtio-fs's FUSE layer, without virtqueues.

Pure: the wire format (``wire``: opcodes, flags, headers; ``structs``: the payloads;
``codec``: whole requests and replies) and the DAX contract and mapping model (``dax``).
With host I/O: a file server over a host directory (``server``: session and dispatch;
``fileops`` and ``daxops``: the operations; ``host``: nodes and handles as host fds).

The device glue hands ``FuseServer.handle`` the device-readable bytes of a chain, writes
the reply into its device-writable buffers, and implements ``DaxMapper`` with
SHMEM_MAP/SHMEM_UNMAP on shared-memory region 0.
"""

from testbed.fuse.dax import DaxMapper, LiveMapping
from testbed.fuse.server import FuseServer, FuseStats, Negotiated, SessionState

__all__ = ["DaxMapper", "FuseServer", "FuseStats", "LiveMapping", "Negotiated", "SessionState"]
