"""A recipe's run: our stack (back-end, guest-less QEMU, qtest) driven step by step, and
every step recorded as the stand-alone script testbed.bugs.standalone replays.

``Run`` both acts (our back-end, QMP, qtest via the machine's PCI driver) and records what
it did: the QEMU argv, what our back-end answered to each front-end request, the back-end
channel requests with their fds, every QMP command and qtest line, and the checks that show
a silent bug. Its ``evidence()`` is what the registry's Bug.matches judges.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.bugs import Bug
from testbed.bugs.signature import Evidence, exit_of, exited_line
from testbed.device import ShmemLayout, VhostUserDevice
from testbed.errors import TestbedError
from testbed.machine import QtestConfig, QtestMachine
from testbed.machine.cmdline import GUESTLESS_SLOT, build_qtest_command
from testbed.machine.probe import pci_bar
from testbed.machine.qtest import PciFunctionDriver, QtestClient
from testbed.resource import Closeable
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import BackendRequest, Header, Request
from testbed.vhost_user.shmem import Memfd
from testbed.vhost_user.trace import FROM_QEMU, TO_QEMU

TIMEOUT = 10.0
EXIT_TIMEOUT = 5.0
"""How long a crash may take to land once its trigger was answered."""


class RecipeFailed(TestbedError):
    """A recipe could not do a step a working QEMU would let it do (not the bug itself)."""


@dataclass
class Run(Closeable):
    """One recipe's stack and the stand-alone script recorded from it."""

    bug: Bug
    arch: str
    qemu: Path
    workdir: Path
    trace_path: Path | None = None
    backend: Backend | None = None
    machine: QtestMachine | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    qtest: bool = False
    observed: list[str] = field(default_factory=list)
    disconnect_at: int | None = None
    _raw: list[tuple[str, Header, bytes]] = field(default_factory=list)
    _memfds: list[Memfd] = field(default_factory=list)
    _memfd_names: dict[int, str] = field(default_factory=dict)
    _sent_fd: dict[int, int] = field(default_factory=dict)
    """A memfd's fd -> the read-only fd of it that travels instead (memfd(readonly=))."""
    results: dict[str, int] = field(default_factory=dict)
    _results: int = 0

    # -- the stack -------------------------------------------------------------------------

    @property
    def socket(self) -> Path:
        return self.workdir / "vu.sock"

    def start_backend(self, layout: ShmemLayout, faults: Faults | None = None) -> Backend:
        faults = faults or Faults()
        backend = Backend(self.socket, layout, faults=faults, trace_path=self.trace_path)
        self._keep_raw(backend)
        self.backend = backend.start()
        self.disconnect_at = int(faults.disconnect_at) if faults.disconnect_at else None
        return backend

    def _keep_raw(self, backend: Backend) -> None:
        """Keep the exact bytes of every traced front-end message: the trace decodes
        payloads to JSON, the replay needs what went on the wire (a truncated or
        mis-flagged reply included). Wraps the one Trace the dispatcher records through."""
        record = backend.trace.record

        def keeping(direction: str, header: Header, body: bytes, nfds: int, *rest: Any) -> Any:
            if direction in (FROM_QEMU, TO_QEMU):
                self._raw.append((direction, header, bytes(body)))
            return record(direction, header, body, nfds, *rest)

        setattr(backend.trace, "record", keeping)  # noqa: B010 (an instance override)

    def start_qemu(
        self,
        devices: Sequence[VhostUserDevice],
        *,
        qtest: bool = True,
        extra_args: Sequence[str] = (),
    ) -> QtestMachine:
        """Start the guest-less QEMU; QemuExited if it dies on the way (a realize crash)."""
        config = QtestConfig(
            self.arch, self.qemu, tuple(devices), qtest, extra_args=tuple(extra_args)
        )
        self.qtest = qtest
        template = build_qtest_command(
            config, self.workdir / "qmp.sock", self.workdir / "qtest.sock"
        )
        self.argv = ["{qemu}", *(w.replace(str(self.workdir), "{dir}") for w in template[1:])]
        self.steps.append({"op": "connect"})
        machine = QtestMachine(config, logdir=self.workdir / "qemu")
        self.machine = machine
        machine.start(timeout=30.0)
        return machine

    def _m(self) -> QtestMachine:
        if self.machine is None:
            raise RecipeFailed("the recipe has no QEMU yet")
        return self.machine

    def _b(self) -> Backend:
        if self.backend is None:
            raise RecipeFailed("the recipe has no back-end")
        return self.backend

    def qmp(self, cmd: str, arguments: dict[str, Any] | None = None) -> Any:
        self.steps.append({"op": "qmp", "cmd": cmd, "args": dict(arguments or {})})
        return self._m().qmp(cmd, arguments)

    def start_device(self, driver: PciFunctionDriver | None = None) -> None:
        """DRIVER_OK over qtest (we play the guest's PCI core and virtio driver), then
        wait until our back-end saw the device start."""
        with self.recording_qtest() as client:
            (driver or PciFunctionDriver(client, self.arch)).start_device()
        self.wait_backend(lambda b: b.wait_driver_ok(TIMEOUT))

    @contextlib.contextmanager
    def recording_qtest(self) -> Iterator[QtestClient]:
        """The qtest client, every line sent through it inside the block recorded (the
        drivers in testbed.machine.qtest speak qtest themselves)."""
        client = self._m().qtest
        if client is None:
            raise RecipeFailed("this step needs a qtest QEMU")
        lines: list[str] = []
        command = client.command

        def recording(line: str) -> str:
            lines.append(line)
            return command(line)

        setattr(client, "command", recording)  # noqa: B010 (an instance override)
        try:
            yield client
        finally:
            delattr(client, "command")
            if lines:
                self.steps.append({"op": "qtest", "lines": lines})

    def wait_request(self, request: Request, count: int = 1) -> None:
        self.wait_backend(lambda b: b.wait_for_request(request, TIMEOUT, count))

    def wait_backend(self, wait: Callable[[Backend], None]) -> None:
        """Wait on our back-end; recorded as "until the request it last saw has come as
        often as now" -- the same point in QEMU's conversation for the replay."""
        backend = self._b()
        wait(backend)
        seen = backend.requests_seen
        if seen:
            self.steps.append(
                {"op": "wait_request", "request": int(seen[-1]), "count": seen.count(seen[-1])}
            )

    def memfd(self, size: int, fill: bytes = b"", *, readonly: bool = False) -> Memfd:
        """A memfd of ``size`` bytes starting with ``fill``; ``readonly``: what travels
        on the channel for it is an fd of it opened O_RDONLY (a file the back-end may
        only read), as the replay does too."""
        mem = Memfd(size)
        self._memfds.append(mem)
        if fill:
            mem.write(0, fill)
        name = f"m{len(self._memfds) - 1}"
        self._memfd_names[mem.fileno()] = name
        if readonly:
            self._sent_fd[mem.fileno()] = os.open(f"/proc/self/fd/{mem.fileno()}", os.O_RDONLY)
        self.steps.append({"op": "memfd", "name": name, "size": size, "fill": fill.hex(),
                           "readonly": readonly})  # fmt: skip
        return mem

    def truncate(self, mem: Memfd, size: int) -> None:
        """Another host process shrinks (or grows) the file under QEMU's mapping."""
        self.steps.append({"op": "truncate", "memfd": self._memfd_names[mem.fileno()],
                           "size": size})  # fmt: skip
        os.ftruncate(mem.fileno(), size)

    def channel(
        self,
        request: BackendRequest,
        body: bytes,
        fds: Sequence[Memfd] = (),
        *,
        unguarded: bool = False,
    ) -> str:
        """Send a back-end channel request; returns the name of its recorded result, whose
        value (QEMU's u64) is in self.results. ``unguarded``: even to a device that is not
        started, which Backend otherwise refuses (a bug needs exactly that)."""
        name = f"r{self._results}"
        self._results += 1
        self.steps.append(
            {
                "op": "channel",
                "request": int(request),
                "body": body.hex(),
                "fds": [self._memfd_names[m.fileno()] for m in fds],
                "result": name,
            }
        )
        fd_list = [self._sent_fd.get(m.fileno(), m.fileno()) for m in fds]
        value = self._b().channel_request(
            request, body, fd_list, timeout=TIMEOUT, unguarded=unguarded
        )
        self.results[name] = value
        return name

    def qtest_write(self, addr: int, data: bytes) -> None:
        with self.recording_qtest() as client:
            client.write(addr, data)

    def qtest_read(self, addr: int, length: int) -> bytes:
        """What the guest reads at ``addr`` (a guest-physical address)."""
        with self.recording_qtest() as client:
            return client.read(addr, length)

    def close_backend(self) -> None:
        self.steps.append({"op": "close_backend"})
        self._b().close()

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int | None:
        self.steps.append({"op": "wait_exit", "timeout": timeout})
        return self._m().wait_exited(timeout)

    # -- checks: a silent bug is what a check saw ------------------------------------------

    def check_bar4(self, size: int, say: str) -> None:
        bar = pci_bar(self._m().pci_device(), 4)
        self.steps.append({"op": "check_bar4", "slot": GUESTLESS_SLOT, "size": size, "say": say})
        if bar is not None and bar["size"] == size:
            self.observed.append(say)

    def check_result(self, result: str, equals: int, say: str) -> None:
        self.steps.append({"op": "check_result", "result": result, "equals": equals, "say": say})
        if self.results.get(result) == equals:
            self.observed.append(say)

    def check_rings(self, queues: int, say: str) -> None:
        """Observed when QEMU sent a per-ring request for a ring at or beyond ``queues``
        (what our back-end flags as queue-count once it answered GET_QUEUE_NUM)."""
        self.steps.append({"op": "check_rings", "queues": queues, "say": say})
        if any(v.rule == "queue-count" for v in self._b().violations):
            self.observed.append(say)

    def check_memfd(self, mem: Memfd, offset: int, was: bytes, say: str) -> None:
        name = self._memfd_names[mem.fileno()]
        self.steps.append(
            {"op": "check_memfd", "memfd": name, "offset": offset, "was": was.hex(), "say": say}
        )
        if mem.read(offset, len(was)) != was:
            self.observed.append(say)

    # -- the outcome -----------------------------------------------------------------------

    def evidence(self) -> Evidence:
        """QEMU's stderr and exit; for a silent bug, what the checks saw, naming the bug."""
        machine = self.machine
        code = machine.returncode if machine is not None else None
        if machine is not None and code is None and self.bug.stderr:
            # A crash can land just after the answer that triggered it.
            code = machine.wait_exited(0.5)
        stderr = machine.stderr_text() if machine is not None else ""
        if self.bug.observable:
            seen = self.observed
            return Evidence.gather(seen or [stderr], code, names=self.bug.id if seen else None)
        # A SIGSEGV prints nothing: the exit itself is the message.
        exited = [] if code is None else [exited_line(exit_of(code))]
        return Evidence.gather([stderr, *exited], code)

    def script(self) -> dict[str, Any]:
        """The stand-alone script (see testbed.bugs.standalone): pure data, JSON-ready."""
        exchanges: list[list[Any]] = []
        for direction, header, body in self._raw:
            if direction == FROM_QEMU:
                exchanges.append([header.request, None])
            elif exchanges and exchanges[-1][1] is None:
                reply = {"flags": header.flags, "size": header.size, "body": body.hex()}
                exchanges[-1][1] = reply
        return {
            "bug": self.bug.id,
            "title": self.bug.title,
            "arch": self.arch,
            "signature": {
                "stderr": self.bug.stderr,
                "exit": self.bug.exit,
                "observable": self.bug.observable,
            },
            "argv": self.argv,
            "qtest": self.qtest,
            "backend": {
                "socket": self.socket.name,
                "exchanges": exchanges,
                "disconnect_at": self.disconnect_at,
            },
            "steps": self.steps,
        }

    def close(self) -> None:
        try:
            if self.machine is not None:
                self.machine.close()
        finally:
            if self.backend is not None:
                self.backend.close()
            for mem in self._memfds:
                mem.close()
            for fd in self._sent_fd.values():
                os.close(fd)
            self._sent_fd.clear()


Recipe = Callable[[Run], None]
"""One registry bug's reproducer: the steps it takes on a Run."""
