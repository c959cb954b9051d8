"""virtio-pmem (virtio-id 27) with its range in shared-memory region 0.

The device (VIRTIO 1.3 section 5.19; Linux include/uapi/linux/virtio_pmem.h):

- feature VIRTIO_PMEM_F_SHMEM_REGION (bit 0): the guest takes the persistent-memory range
  from shared-memory region 0 instead of config space (Linux's virtio_pmem since 6.9);
- config space ``struct virtio_pmem_config {le64 start; le64 size}`` (16 bytes);
- one request queue: ``struct virtio_pmem_req {le32 type}`` in, ``struct virtio_pmem_resp
  {le32 ret}`` out; type 0 = FLUSH: make the guest's writes durable, ret 0 on success.

The range is a backing file -- a memfd we create, or a file the caller names by path or fd
-- SHMEM_MAPped read-write over all of region 0 each time the device starts. QEMU drops
mappings on a device reset without telling the back-end, so stop() unmaps nothing and the
next start maps again. With ``map_on_start=False`` the map waits for ``map_now()``: what
the guest driver sees of a region nothing is mapped in yet can then be looked at.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

from testbed.device import ShmemLayout
from testbed.errors import ConfigError, RingError, TestbedError
from testbed.resource import Closeable
from testbed.vhost_user.devices.base import Completion, DeviceHost, DeviceModel, Problem
from testbed.vhost_user.memory import GuestMemory
from testbed.vhost_user.virtqueue import F_EVENT_IDX, F_INDIRECT_DESC, Chain

log = logging.getLogger(__name__)

VIRTIO_ID_PMEM = 27
F_SHMEM_REGION = 1 << 0
SHMEM_REGION_ID = 0
REQ_TYPE_FLUSH = 0
CONFIG = struct.Struct("<QQ")
REQUEST = struct.Struct("<I")
RESPONSE = struct.Struct("<I")
CONFIG_SIZE = CONFIG.size
RET_OK = 0
RET_EIO = 1
"""What QEMU's own virtio-pmem answers when the host sync fails (any non-zero makes
Linux's driver return -EIO)."""


class PmemDevice(DeviceModel, Closeable):
    """virtio-pmem over a backing of ``size`` bytes (a page multiple, a power of two: the
    region is all of BAR 4).

    Backing, exactly one of: ``size`` alone (a memfd, ours), ``path`` (a file opened
    read-write, ours; ``size`` defaults to the file's), ``fd`` (the caller's, lent; ``size``
    defaults to its). ``sync`` is what FLUSH calls on the backing's fd (os.fdatasync;
    tests pass a fake). ``ring_features``: the ring features offered besides the device's.
    """

    name = "pmem"

    def __init__(
        self,
        size: int | None = None,
        *,
        path: Path | str | None = None,
        fd: int | None = None,
        ring_features: int = F_INDIRECT_DESC | F_EVENT_IDX,
        sync: Callable[[int], None] = os.fdatasync,
        map_on_start: bool = True,
    ) -> None:
        if path is not None and fd is not None:
            raise ConfigError("pmem backing: give a path or an fd, not both")
        self._owned_fd: int | None = None
        if fd is not None:
            self.fd = fd
        elif path is not None:
            try:
                self.fd = self._owned_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise ConfigError(f"pmem backing {path}: cannot open it read-write: {exc}") from exc
        else:
            if size is None:
                raise ConfigError("pmem backing: give a size (a memfd), a path or an fd")
            self.fd = self._owned_fd = os.memfd_create("testbed-pmem", os.MFD_CLOEXEC)
        try:
            if size is None:
                size = os.fstat(self.fd).st_size
            elif os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
            layout = ShmemLayout({SHMEM_REGION_ID: size})
        except (OSError, ConfigError) as exc:
            self.close()
            raise ConfigError(f"pmem backing of {size} bytes: {exc}") from exc
        super().__init__(
            num_queues=1,
            layout=layout,
            features=F_SHMEM_REGION | ring_features,
            config_size=CONFIG_SIZE,
        )
        self.size = size
        self._sync = sync
        self.map_on_start = map_on_start
        self._host: DeviceHost | None = None
        self.flushes = 0
        """FLUSH requests served (failed syncs included)."""
        self.failed_flushes = 0
        self.map_results: list[int] = []
        """QEMU's verdict on each start's SHMEM_MAP of region 0, in order (0 = mapped)."""
        self.map_errors: list[str] = []
        """Maps that got no verdict (the device stopped first, the channel broke, ...)."""

    # --- the backing, as the host sees it -------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ConfigError(f"pmem backing access at {offset}+{length}: size is {self.size}")

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return os.pread(self.fd, length, offset)

    def write(self, offset: int, data: bytes) -> None:
        self._check_range(offset, len(data))
        os.pwrite(self.fd, data, offset)

    # --- the device -----------------------------------------------------------------------

    def config(self) -> bytes:
        # start 0: with F_SHMEM_REGION the guest takes the range from region 0; the back-end
        # cannot know where the guest placed BAR 4, so no guest-physical start is offered.
        return CONFIG.pack(0, self.size)

    def start(self, host: DeviceHost) -> None:
        super().start(host)
        self._host = host
        if self.map_on_start:
            self.map_now()

    def stop(self) -> None:
        super().stop()
        self._host = None

    def map_now(self) -> None:
        """SHMEM_MAP the backing over region 0 of the started device (on the back-end's
        worker: the result lands in ``map_results``). Not on the serving thread: at start it
        is inside QEMU's vhost_dev_start, and QEMU reads the back-end channel only after
        that returns -- waiting for the map's reply there would deadlock."""
        host = self._host
        if host is None:
            raise ConfigError("pmem: the device is not started: nothing to map into")
        host.defer("SHMEM_MAP of pmem region 0", lambda: self._map(host))

    def _map(self, host: DeviceHost) -> None:
        try:
            verdict = host.map(SHMEM_REGION_ID, 0, self.size, self.fd, 0, writable=True)
        except TestbedError as exc:
            log.error("pmem: SHMEM_MAP of region 0 got no verdict: %s", exc)
            self.map_errors.append(str(exc))
            return
        if verdict:
            log.error("pmem: QEMU refused the SHMEM_MAP of region 0 (verdict %d)", verdict)
        self.map_results.append(verdict)

    def handle(self, queue: int, chain: Chain, memory: GuestMemory) -> Completion:
        if queue != 0:
            raise RingError(
                "device-request", f"virtio-pmem has one queue; got a chain on queue {queue}",
                head=chain.head,
            )  # fmt: skip
        raw = chain.read(memory, REQUEST.size)
        problems: list[Problem] = []
        if len(raw) < REQUEST.size:
            problems.append(
                Problem(
                    "device-request",
                    f"request of {len(raw)} bytes; struct virtio_pmem_req is {REQUEST.size}",
                )
            )
            code, name, ret = -1, "SHORT", RET_EIO
        else:
            (code,) = REQUEST.unpack(raw)
            if code == REQ_TYPE_FLUSH:
                name, ret = "FLUSH", self._flush()
            else:
                name, ret = f"UNKNOWN_{code}", RET_EIO
                problems.append(Problem("device-request", f"unknown request type {code}"))
        if chain.writable_bytes < RESPONSE.size:
            problems.append(
                Problem(
                    "device-request",
                    f"response buffer of {chain.writable_bytes} bytes; struct virtio_pmem_resp "
                    f"is {RESPONSE.size}: the answer (ret {ret}) cannot be given",
                )
            )
            written, reply = 0, {}
        else:
            written, reply = chain.write(memory, RESPONSE.pack(ret)), {"ret": ret}
        request = {"type": code} if code >= 0 else {"bytes": raw.hex()}
        return Completion(written, name, code, request, reply, tuple(problems))

    def _flush(self) -> int:
        self.flushes += 1
        try:
            self._sync(self.fd)
        except OSError as exc:
            self.failed_flushes += 1
            log.error("pmem: FLUSH: syncing the backing failed: %s", exc)
            return RET_EIO
        return RET_OK

    def close(self) -> None:
        fd, self._owned_fd = self._owned_fd, None
        if fd is not None:
            os.close(fd)
