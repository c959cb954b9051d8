"""The one shape every resource owner in the test bed has: an idempotent close() and
context-manager support that calls it, so `with` always releases what the object owns."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self


class Closeable(abc.ABC):
    """Owns one resource (a process, a socket, an fd, a directory) until close()."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the resource. Must be idempotent: a second call does nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
