"""Device descriptions that travel from a scenario to the back-end: frozen, checked where
they are made, and built into a device model only where the back-end runs (``build()``).

Pure but for ``build()``, which opens what the model needs (a memfd, a backing file, the
share's root). The VM layer reads ``virtio_id``, ``num_vqs``, ``config_size`` and
``layout`` to describe QEMU's vhost-user-test-device-pci for the same device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from testbed.device import ShmemLayout
from testbed.errors import ConfigError
from testbed.fuse.server import TAG_MAX
from testbed.vhost_user.devices.fs import CONFIG_SIZE as FS_CONFIG_SIZE
from testbed.vhost_user.devices.fs import VIRTIO_ID_FS, VirtioFsDevice
from testbed.vhost_user.devices.fsdax import CACHE_SHMID
from testbed.vhost_user.devices.pmem import CONFIG_SIZE as PMEM_CONFIG_SIZE
from testbed.vhost_user.devices.pmem import SHMEM_REGION_ID, VIRTIO_ID_PMEM, PmemDevice


@dataclass(frozen=True)
class VirtioFsSpec:
    """A virtio-fs device sharing ``share`` as ``tag``; DAX window of ``window_size``
    bytes in shared-memory region 0 (0: no DAX); ``num_request_queues`` after hiprio."""

    share: Path
    tag: str
    window_size: int = 0
    num_request_queues: int = 1
    timeout: float = 1.0
    """How long the guest may cache entries and attributes, in seconds (FUSE's
    entry_valid / attr_valid)."""
    virtio_id: ClassVar[int] = VIRTIO_ID_FS
    config_size: ClassVar[int] = FS_CONFIG_SIZE

    def __post_init__(self) -> None:
        encoded = self.tag.encode()
        if not 1 <= len(encoded) <= TAG_MAX or b"\0" in encoded or "\n" in self.tag:
            # virtio_fs_read_tag(): an empty tag or one with a newline is refused.
            raise ConfigError(
                f"virtio-fs tag {self.tag!r}: 1..{TAG_MAX} bytes of UTF-8, no NUL or newline"
            )
        if self.num_request_queues < 1:
            raise ConfigError(f"virtio-fs: {self.num_request_queues} request queues, need >= 1")
        if self.window_size < 0:
            raise ConfigError(f"virtio-fs: window size {self.window_size} is negative")
        _ = self.layout  # checked against QEMU's limits here, not at build()

    @property
    def layout(self) -> ShmemLayout:
        return ShmemLayout({CACHE_SHMID: self.window_size} if self.window_size else {})

    @property
    def num_vqs(self) -> int:
        return 1 + self.num_request_queues

    def build(self) -> VirtioFsDevice:
        return VirtioFsDevice(
            self.share,
            tag=self.tag,
            window_size=self.window_size,
            num_request_queues=self.num_request_queues,
            timeout=self.timeout,
        )

    def template_values(self) -> dict[str, str]:
        """``{share}``, ``{tag}`` and ``{window}`` (bytes) in a user's back-end command:
        the same share, the same window."""
        return {"share": str(self.share), "tag": self.tag, "window": str(self.window_size)}


@dataclass(frozen=True)
class PmemSpec:
    """A virtio-pmem device of ``size`` bytes in shared-memory region 0: over a memfd, or
    over the file at ``path`` (grown to ``size`` if shorter)."""

    size: int
    path: Path | None = None
    map_on_start: bool = True
    """False: the backing is mapped when the scenario says (PmemDevice.map_now)."""
    virtio_id: ClassVar[int] = VIRTIO_ID_PMEM
    num_vqs: ClassVar[int] = 1
    config_size: ClassVar[int] = PMEM_CONFIG_SIZE

    def __post_init__(self) -> None:
        _ = self.layout  # a page multiple, a power of two: checked here

    @property
    def layout(self) -> ShmemLayout:
        return ShmemLayout({SHMEM_REGION_ID: self.size})

    def build(self) -> PmemDevice:
        return PmemDevice(self.size, path=self.path, map_on_start=self.map_on_start)

    def template_values(self) -> dict[str, str]:
        """``{backing}`` in a user's back-end command: the backing file, if there is one."""
        return {"backing": str(self.path)} if self.path is not None else {}


DeviceSpec = VirtioFsSpec | PmemSpec
