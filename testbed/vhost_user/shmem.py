"""Memfds: the memory a back-end maps into a shared-memory region with SHMEM_MAP."""

from __future__ import annotations

import os

from testbed.errors import ConfigError, StateError
from testbed.resource import Closeable


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
