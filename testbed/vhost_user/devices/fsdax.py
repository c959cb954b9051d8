"""virtio-fs DAX over vhost-user: the FUSE server's DaxMapper (testbed.fuse.dax) as
SHMEM_MAP / SHMEM_UNMAP on shared-memory region 0, the DAX cache window
(include/uapi/linux/virtio_fs.h: ``#define VIRTIO_FS_SHMCAP_ID_CACHE 0``), and the account
of what QEMU acked -- the invariant a scenario checks: every SHMEM_MAP has had its
SHMEM_UNMAP by DESTROY, or was dropped by QEMU itself at a device reset.

Threading: ``map``/``unmap`` block on QEMU's reply, so they run on the back-end's deferred
worker (the device routes the FUSE requests that may reach them there), never on the
serving thread, which must stay free to answer the SET_MEM_TABLE QEMU sends while it
handles the map. The account is guarded by a lock: the worker writes it, the serving
thread resets it, tests read it.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from testbed.errors import TestbedError
from testbed.vhost_user.devices.base import DeviceHost

log = logging.getLogger(__name__)

CACHE_SHMID = 0
"""VIRTIO_FS_SHMCAP_ID_CACHE: the shared-memory region Linux's virtio_fs_setup_dax() asks
for (virtio_get_shm_region(vdev, &cache_reg, (u8)VIRTIO_FS_SHMCAP_ID_CACHE))."""

REFUSED_ERRNO = errno.EIO
"""The FUSE error for a map or unmap QEMU did not carry out. QEMU 11.1.3 answers a failed
SHMEM_MAP/UNMAP with u64 1 -- the handler replies ``!!ret``, not an errno -- and prints the
cause on its own stderr only (backing store too small, overlap, range outside the region,
unknown range), so the back-end cannot tell the guest why. EIO, not EINVAL: the FUSE
server has already checked the request against the window and the alignment INIT
announced (testbed.fuse.dax.DaxWindow), so what failed is the host's side of the mapping,
and a guest application reading through DAX is told an I/O error rather than that its own
arguments were wrong. A request that got no verdict at all (the channel broke, QEMU did
not answer in time, the device is not started) is answered the same way."""


def verdict_errno(verdict: int) -> int:
    """QEMU's u64 verdict on a SHMEM_MAP/UNMAP as the mapper's result: 0, or an errno."""
    return 0 if verdict == 0 else REFUSED_ERRNO


@dataclass(frozen=True)
class MapperStats:
    """What the mapper sent on the back-end channel and what QEMU answered."""

    maps_sent: int
    maps_acked: int  # verdict 0
    maps_refused: int  # a non-zero verdict
    unmaps_sent: int
    unmaps_acked: int
    unmaps_refused: int
    no_verdict: int  # no answer (channel gone, timeout, device not started)
    dropped_by_reset: int  # acked maps QEMU dropped itself at a device reset (no UNMAP)


class ShmemMapper:
    """The DaxMapper for one virtio-fs device: SHMEM_MAP/UNMAP on region ``shmid``
    through the DeviceHost the device was started with (none before start and after stop:
    every call then fails at once with EIO, nothing reaches QEMU)."""

    def __init__(self, shmid: int = CACHE_SHMID) -> None:
        self.shmid = shmid
        self._lock = threading.Lock()
        self._host: DeviceHost | None = None
        self._live: dict[int, int] = {}
        self._counts: Counter[str] = Counter()

    def attach(self, host: DeviceHost | None) -> None:
        """The device started (``host``) or stopped (None)."""
        with self._lock:
            self._host = host

    # --- the DaxMapper contract ----------------------------------------------------------

    def map(self, fd: int, foffset: int, length: int, moffset: int, writable: bool) -> int:
        # The fd travels by SCM_RIGHTS inside this call: the kernel duplicates it, so the
        # server may close it as soon as we return (the DaxMapper contract).
        return self._send(
            "map",
            lambda host: host.map(self.shmid, moffset, length, fd, foffset, writable),
            lambda: self._live.__setitem__(moffset, length),
            f"file offset {foffset:#x}, {length:#x} bytes at window offset {moffset:#x}",
        )

    def unmap(self, moffset: int, length: int) -> int:
        return self._send(
            "unmap",
            lambda host: host.unmap(self.shmid, moffset, length),
            lambda: self._live.pop(moffset, None),
            f"{length:#x} bytes at window offset {moffset:#x}",
        )

    def _send(
        self, kind: str, send: Callable[[DeviceHost], int], acked: Callable[[], object], what: str
    ) -> int:
        """One SHMEM_MAP (``kind`` "map") or SHMEM_UNMAP ("unmap"), counted; ``acked``
        updates the account (under the lock) when QEMU says 0."""
        request = f"SHMEM_{kind.upper()}"
        with self._lock:
            host = self._host
        if host is None:
            return self._no_verdict(request, "the device is not started")
        self._count(f"{kind}s_sent")
        try:
            verdict = send(host)
        except TestbedError as exc:
            return self._no_verdict(request, str(exc))
        with self._lock:
            if verdict == 0:
                self._counts[f"{kind}s_acked"] += 1
                acked()
            else:
                self._counts[f"{kind}s_refused"] += 1
        if verdict:
            log.warning("QEMU refused %s of %s (verdict %d); QEMU's stderr says why", request,
                        what, verdict)  # fmt: skip
        return verdict_errno(verdict)

    # --- the account ---------------------------------------------------------------------

    def forget_all(self) -> int:
        """A device reset: QEMU dropped every mapping without telling the back-end
        (qemu-upstream notes; vhost-user.rst: mappings are dropped on device reset), so
        nothing is sent. Returns how many acked mappings were dropped that way."""
        with self._lock:
            dropped = len(self._live)
            self._counts["dropped_by_reset"] += dropped
            self._live.clear()
        return dropped

    @property
    def live(self) -> dict[int, int]:
        """What QEMU holds mapped now, by our account: window offset -> length."""
        with self._lock:
            return dict(sorted(self._live.items()))

    @property
    def stats(self) -> MapperStats:
        with self._lock:
            c = Counter(self._counts)
        return MapperStats(
            maps_sent=c["maps_sent"],
            maps_acked=c["maps_acked"],
            maps_refused=c["maps_refused"],
            unmaps_sent=c["unmaps_sent"],
            unmaps_acked=c["unmaps_acked"],
            unmaps_refused=c["unmaps_refused"],
            no_verdict=c["no_verdict"],
            dropped_by_reset=c["dropped_by_reset"],
        )

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _no_verdict(self, request: str, why: str) -> int:
        self._count("no_verdict")
        log.warning("%s got no verdict from QEMU: %s", request, why)
        return REFUSED_ERRNO
