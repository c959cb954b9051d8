"""A wire trace: every vhost-user message, both directions, as one JSON line each.

Entries go to a file (optional, line-buffered so a crash keeps what came before) and to an
in-memory list that tests assert on. A request that breaks the spec carries its violations
(rule and detail, from the back-end's dispatcher) on its own line. Thread-safe: the serving
thread and a caller driving SHMEM_MAP both record.

A served virtqueue chain is two entries, like a request and its reply on the socket:

    {"time": ..., "direction": "queue:driver->device", "queue": 0, "head": 3, "request": 0,
     "name": "FLUSH", "size": 4, "payload": {"type": 0}}
    {"time": ..., "direction": "queue:device->driver", "queue": 0, "head": 3, "request": 0,
     "name": "FLUSH", "size": 4, "payload": {"ret": 0}}

``request`` is the device's request type (-1: unreadable), ``name`` the device's name for
it, ``size`` the bytes the driver offered (request) or the used length (reply), ``payload``
the decoded request or reply. A chain against the spec carries ``error`` and
``violations`` on its request entry (and is answered with size 0); a queue the back-end
stopped serving has one request entry with ``head`` null. A chain the device answers later
(virtio-fs: what waits on a SHMEM_MAP) has its request entry when it is taken off the ring
and its reply entry when it is completed, with whatever it caused in between (the channel
entries) and other chains' entries around it.

virtio-fs chains are named by FUSE opcode ("INIT", "READ", "SETUPMAPPING", "FORGET";
"SHORT" for one too short to hold a fuse_in_header); ``request`` is the opcode. The request
payload has ``unique``, ``nodeid``, ``len`` (fuse_in_header's) and, where a scenario pairs or
counts them, the arguments: SETUPMAPPING ``foffset``, ``moffset``, ``length``, ``flags``;
REMOVEMAPPING ``ranges`` ([moffset, len] each); READ ``fh``, ``offset``, ``size``; FORGET
``nlookup``. The reply payload is fuse_out_header's ``unique``, ``error`` (0 or -errno) and
``len`` (= the entry's size, the used length); a FORGET's reply payload is {} with size 0.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from testbed.errors import ProtocolError
from testbed.resource import Closeable
from testbed.vhost_user.codes import request_name
from testbed.vhost_user.protocol import Header, decode_payload

FROM_QEMU = "qemu->backend"
TO_QEMU = "backend->qemu"
# On the back-end channel the back-end is the one asking.
CHANNEL_TO_QEMU = "backend-channel:backend->qemu"
CHANNEL_FROM_QEMU = "backend-channel:qemu->backend"
# A virtqueue's chains: what the guest's driver asked, what the device answered.
QUEUE_REQUEST = "queue:driver->device"
QUEUE_REPLY = "queue:device->driver"


@dataclass(frozen=True)
class TraceEntry:
    time: float
    direction: str
    request: int
    name: str
    flags: int
    size: int
    payload: dict[str, Any] | None
    fds: int
    error: str | None = None
    violations: tuple[Mapping[str, str], ...] = ()
    queue: int | None = None
    """Queue entries only: the queue index and the chain's head (None: the whole queue)."""
    head: int | None = None

    @property
    def is_queue(self) -> bool:
        return self.direction.startswith("queue:")

    def one_line(self) -> str:
        """A human log line: time, direction, request, flags, size, fds, payload."""
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time))
        millis = int(self.time * 1000) % 1000
        payload = "" if self.payload is None else " " + json.dumps(self.payload)
        error = f" ERROR: {self.error}" if self.error else ""
        error += "".join(f" VIOLATION {v['rule']}: {v['detail']}" for v in self.violations)
        if self.is_queue:
            return (
                f"{stamp}.{millis:03d} {self.direction} queue={self.queue} head={self.head} "
                f"{self.name}({self.request}) size={self.size}{payload}{error}"
            )
        return (
            f"{stamp}.{millis:03d} {self.direction} {self.name}({self.request}) "
            f"flags=0x{self.flags:x} size={self.size} fds={self.fds}{payload}{error}"
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"time": round(self.time, 6), "direction": self.direction}
        if self.is_queue:
            data |= {"queue": self.queue, "head": self.head}
        data |= {"request": self.request, "name": self.name}
        if not self.is_queue:
            data["flags"] = self.flags
        data |= {"size": self.size, "payload": self.payload}
        if not self.is_queue:
            data["fds"] = self.fds
        if self.error:
            data["error"] = self.error
        if self.violations:
            data["violations"] = [dict(v) for v in self.violations]
        return data


class Trace(Closeable):
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: list[TraceEntry] = []
        self._file: IO[str] | None = (
            open(path, "w", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115
        )

    def record(
        self,
        direction: str,
        header: Header,
        body: bytes,
        nfds: int,
        violations: Sequence[Mapping[str, str]] = (),
    ) -> TraceEntry:
        backend_channel = direction.startswith("backend-channel")
        error = None
        try:
            payload = decode_payload(
                header.request, body, reply=header.is_reply, backend_channel=backend_channel
            )
            payload_json = None if payload is None else payload.to_json()
        except ProtocolError as exc:
            # The trace shows what was sent even when it is malformed (fault injection).
            payload_json = {"raw": body.hex()}
            error = str(exc)
        entry = TraceEntry(
            time=time.time(),
            direction=direction,
            request=header.request,
            name=request_name(header.request, backend_channel),
            flags=header.flags,
            size=header.size,
            payload=payload_json,
            fds=nfds,
            error=error,
            violations=tuple(violations),
        )
        return self._append(entry)

    def record_queue(
        self,
        direction: str,
        queue: int,
        head: int | None,
        request: int,
        name: str,
        size: int,
        payload: dict[str, Any] | None,
        *,
        error: str | None = None,
        violations: Sequence[Mapping[str, str]] = (),
    ) -> TraceEntry:
        """One side of a served chain (QUEUE_REQUEST or QUEUE_REPLY); see the module doc."""
        entry = TraceEntry(
            time=time.time(),
            direction=direction,
            request=request,
            name=name,
            flags=0,
            size=size,
            payload=payload,
            fds=0,
            error=error,
            violations=tuple(violations),
            queue=queue,
            head=head,
        )
        return self._append(entry)

    def _append(self, entry: TraceEntry) -> TraceEntry:
        with self._lock:
            self._entries.append(entry)
            if self._file is not None:
                self._file.write(json.dumps(entry.to_json()) + "\n")
        return entry

    def entries(self) -> list[TraceEntry]:
        with self._lock:
            return list(self._entries)

    def names(self, direction: str = FROM_QEMU) -> list[str]:
        """Request names in arrival order for one direction (default: what QEMU sent)."""
        return [e.name for e in self.entries() if e.direction == direction]

    def close(self) -> None:
        with self._lock:
            f, self._file = self._file, None
        if f is not None:
            f.close()
