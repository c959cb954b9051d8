"""What serves a device: the one way a back-end comes up for a VM, cold- or hot-plugged.

A placed VhostUserDevice (testbed.device: its socket chosen by the VM) names what serves
it. ``serve`` starts that, listening where QEMU will connect:

- ``OurBackend``: our back-end (testbed.vhost_user.backend) with the device's layout,
  faults and queue count;
- ``ForeignCommand`` / ``ForeignSocket``: a back-end we did not write (testbed.host.foreign
  starts one from a command; a socket is already listening), with the relay
  (testbed.vhost_user.relay) in front of it, recording and checking both sides, and
  offering the device's layout when it has regions.

Either way QEMU talks to one ``Endpoint`` (trace, violations, waits). ``Serving.close()``
closes the relay before the process behind it. Nothing started here is left running when
``serve`` fails half-way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.device import ForeignSocket, OurBackend, ShmemLayout, VhostUserDevice
from testbed.errors import ConfigError
from testbed.host.foreign import ForeignBackend
from testbed.resource import Closeable
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.endpoint import Endpoint
from testbed.vhost_user.relay import Relay


def trace_name(label: str, generation: int = 0) -> str:
    """The trace file of a device's back-end: ``vhost-user-trace.jsonl`` for the VM's first
    (cold) device, ``<label>-vhost-user-trace.jsonl`` for the others; a restarted back-end's
    gets ``-<generation>``, so that it never overwrites the one before."""
    prefix = f"{label}-" if label else ""
    return f"{prefix}vhost-user-trace{f'-{generation}' if generation else ''}.jsonl"


@dataclass
class Serving(Closeable):
    """A device's back-end, up: ``endpoint`` is what QEMU talks to (our Backend, or the
    Relay in front of a foreign back-end), ``process`` the foreign process we started."""

    device: VhostUserDevice
    endpoint: Endpoint
    process: ForeignBackend | None = None
    model: Any = None
    """The device model our back-end serves (built from the device's ModelSpec), if any:
    a scenario reads its state (a pmem's flushes and backing, a virtio-fs's requests)."""
    generation: int = 0
    label: str = ""
    closed: bool = field(default=False, repr=False)

    @property
    def backend(self) -> Backend:
        """Our back-end (ConfigError for a relayed device: it has no map(), no faults)."""
        if not isinstance(self.endpoint, Backend):
            raise ConfigError(f"device {self.device.id} is served by a back-end we did not write")
        return self.endpoint

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.endpoint.close()
        finally:
            if self.process is not None:
                self.process.close()  # stopped and reaped; its socket and pid file removed
            if self.model is not None:
                self.model.close()  # after the back-end: it owns the model's files


def serve(device: VhostUserDevice, *, logdir: Path, run_dir: Path, label: str = "") -> Serving:
    """Start what serves ``device`` (placed: its socket set), listening on its socket.
    ``label`` names its files: ``<label>-vhost-user-trace.jsonl``, the foreign back-end's
    ``<label>-backend-std{out,err}.log`` and socket ``<label>-foreign.sock`` (none: the
    cold-plugged device's plain names)."""
    trace_path = logdir / trace_name(label)
    choice = device.backend
    if isinstance(choice, OurBackend):
        return _ours(device, trace_path, label)
    process: ForeignBackend | None = None
    if isinstance(choice, ForeignSocket):
        target = choice.path
    else:
        prefix = f"{label}-" if label else ""
        process = ForeignBackend(
            choice.template,
            run_dir / f"{prefix}foreign.sock",
            logdir,
            name=f"{prefix}backend",
            ready_timeout=choice.ready_timeout,
        ).start()  # closes what it started if it fails
        target = process.socket
    try:
        relay = Relay(
            device.socket_path, target, trace_path=trace_path, inject=device.layout or None
        )
        return Serving(device, relay.start(), process, label=label)
    except BaseException:
        if process is not None:
            process.close()
        raise


def _ours(device: VhostUserDevice, trace_path: Path, label: str, generation: int = 0) -> Serving:
    """Our back-end for ``device``, with its device model built from the spec when it has
    one (the model decides the layout and the queues: the device was made from it)."""
    spec = device.backend.model if isinstance(device.backend, OurBackend) else None
    model = spec.build() if spec is not None else None
    try:
        backend = Backend(
            device.socket_path,
            None if model is not None else device.layout,
            device=model,
            trace_path=trace_path,
            faults=device.faults,
            num_queues=None if model is not None else device.num_vqs,
        )
        return Serving(device, backend.start(), model=model, generation=generation, label=label)
    except BaseException:
        if model is not None:
            model.close()
        raise


def restart(serving: Serving, layout: ShmemLayout | None, *, logdir: Path) -> Serving:
    """Close ``serving``'s back-end (ours) and start a new one on the same socket, serving
    ``layout`` (None: the same); its trace is a new file. QEMU finds it only when its
    chardev reconnects (reconnect_ms)."""
    if not serving.device.ours:
        raise ConfigError("restarting serves our own back-end, not one we did not write")
    serving.close()
    device = (
        serving.device if layout is None else dataclasses.replace(serving.device, layout=layout)
    )
    generation = serving.generation + 1
    trace_path = logdir / trace_name(serving.label, generation)
    return _ours(device, trace_path, serving.label, generation)
