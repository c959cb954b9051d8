"""Shared-memory region layouts (shmid -> size) and memfds to map into them.

The layout model is pure. Its validation mirrors what QEMU 11.1.3 accepts for
vhost-user-test-device-pci, so a bad layout fails here with a clear message instead of
aborting QEMU (a total that is not a power of two trips an assertion in pci_register_bar).
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field

from testbed.errors import ConfigError, StateError
from testbed.resource import Closeable
from testbed.vhost_user.protocol import MAX_SHMEM_REGIONS, ShMemConfig

PAGE_SIZE = mmap.PAGESIZE

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64K', '4M', '2G', '1T' (binary units; 'MiB'/'MB' accepted) or plain bytes -> bytes."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(
            f"size {text!r} is not understood: write bytes or a number with K, M, G or T "
            "(binary units), e.g. 4M"
        )
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_region(text: str) -> tuple[int, int]:
    """'SHMID=SIZE' (e.g. '1=4M') -> (1, 4194304). Checks the shmid range, not the layout."""
    shmid_text, sep, size_text = text.partition("=")
    if not sep:
        raise ConfigError(f"region {text!r}: expected SHMID=SIZE, e.g. 0=4M")
    try:
        shmid = int(shmid_text.strip(), 0)
    except ValueError:
        raise ConfigError(f"region {text!r}: shmid {shmid_text!r} is not a number") from None
    if not 0 <= shmid < MAX_SHMEM_REGIONS:
        raise ConfigError(f"region {text!r}: shmid {shmid} out of range 0..255")
    return shmid, parse_size(size_text)


def _is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class ShmemLayout:
    """Shared-memory regions by shmid. Validated on construction; empty is valid (no BAR 4).

    In BAR 4 QEMU packs the regions back to back in ascending shmid order, starting at 0.
    """

    regions: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Freeze a sorted copy so a caller's dict cannot change the layout afterwards.
        object.__setattr__(self, "regions", dict(sorted(self.regions.items())))
        self.validate()

    @classmethod
    def parse(cls, specs: list[str] | tuple[str, ...]) -> ShmemLayout:
        """From ['0=4M', '3=8M'] (the --region options); a repeated shmid is an error."""
        regions: dict[int, int] = {}
        for spec in specs:
            shmid, size = parse_region(spec)
            if shmid in regions:
                raise ConfigError(f"region {spec!r}: shmid {shmid} given twice")
            regions[shmid] = size
        return cls(regions)

    def validate(self) -> None:
        if len(self.regions) > MAX_SHMEM_REGIONS:
            raise ConfigError(f"{len(self.regions)} regions: at most {MAX_SHMEM_REGIONS}")
        for shmid, size in self.regions.items():
            if not 0 <= shmid < MAX_SHMEM_REGIONS:
                raise ConfigError(f"shmid {shmid} out of range 0..255")
            if size <= 0:
                raise ConfigError(f"region {shmid}: size {size} must be > 0")
            if size % PAGE_SIZE:
                raise ConfigError(
                    f"region {shmid}: size {size} is not a multiple of the page size "
                    f"({PAGE_SIZE}); QEMU refuses it"
                )
        total = self.total
        if self.regions and not _is_power_of_2(total):
            raise ConfigError(
                f"layout {self.describe()}: total {total} bytes is not a power of two; QEMU "
                "11.1.3 aborts on that (pci_register_bar assertion). Adjust the sizes so they "
                "add up to a power of two"
            )

    @property
    def total(self) -> int:
        """The BAR 4 size: the sum of the region sizes."""
        return sum(self.regions.values())

    def offsets(self) -> dict[int, int]:
        """shmid -> offset of the region in BAR 4."""
        result: dict[int, int] = {}
        offset = 0
        for shmid, size in self.regions.items():
            result[shmid] = offset
            offset += size
        return result

    def to_config(self) -> ShMemConfig:
        return ShMemConfig.from_regions(self.regions)

    def describe(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.regions.items()) or "(none)"

    def __bool__(self) -> bool:
        return bool(self.regions)


class Memfd(Closeable):
    """An anonymous file (memfd) of a fixed size: the memory a back-end maps into a region.

    Owns its fd; close() is idempotent. ``fileno()`` lends the fd (e.g. for SCM_RIGHTS: the
    kernel duplicates it into the receiver, so we keep ours).
    """

    def __init__(self, size: int, name: str = "testbed-shmem") -> None:
        if size <= 0:
            raise ConfigError(f"memfd size {size} must be > 0")
        self.size = size
        self._fd: int | None = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            self.close()
            raise

    def fileno(self) -> int:
        if self._fd is None:
            raise StateError("closed", "open", "memfd")
        return self._fd

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ConfigError(f"memfd write at {offset}+{len(data)} past its size {self.size}")
        os.pwrite(self.fileno(), data, offset)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise ConfigError(f"memfd read at {offset}+{length} past its size {self.size}")
        return os.pread(self.fileno(), length, offset)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
