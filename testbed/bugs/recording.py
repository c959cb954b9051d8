"""A recipe's run: our stack (back-end, guest-less QEMU, qtest) driven step by step, and
every step recorded as the stand-alone script testbed.bugs.standalone replays.

``Run`` both acts (our back-end, QMP, qtest via the machine's PCI driver) and records what
it did: the QEMU argv, what our back-end answered to each front-end request, the back-end
channel requests with their fds, every QMP command and qtest line, and the checks that show
a silent bug. Its ``evidence()`` is what the registry's Bug.matches judges.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.bugs import Bug
from testbed.bugs.signature import SILENT_EXITS, Evidence, crash_site, exit_of, exited_line
from testbed.device import DEVICE_TYPE, BaseDevice, ShmemLayout, VhostUserDevice, base_device
from testbed.errors import PeerClosed, TestbedError, WaitTimeout
from testbed.fuzz.backend import FuzzBackend
from testbed.fuzz.fdspec import FdKind, FdSpec, Op
from testbed.fuzz.files import OpenFd, open_fd
from testbed.fuzz.grammar import Case
from testbed.machine import QtestConfig, QtestMachine
from testbed.machine.cmdline import GUESTLESS_SLOT, build_qtest_command
from testbed.machine.probe import pci_bar
from testbed.machine.qtest import PciFunctionDriver, QtestClient
from testbed.resource import Closeable
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import BackendRequest, Header, ProtocolFeature, Request
from testbed.vhost_user.shmem import Memfd
from testbed.vhost_user.trace import FROM_QEMU, TO_QEMU
from testbed.waiting import wait_until

TIMEOUT = 10.0
EXIT_TIMEOUT = 5.0
CLOSED = -1
"""A channel request's result when QEMU closed the channel instead of answering."""
NO_ANSWER = -2
"""... when QEMU did not answer within the step's timeout."""
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
    device_type: str | None = None
    """The QEMU device the recipe's device is (None: the test device; `--device`)."""
    site: str = ""
    """The site of a crash that printed nothing (from gdb, else the kernel's log)."""
    _raw: list[tuple[str, Header, bytes, int]] = field(default_factory=list)
    _memfds: list[Memfd] = field(default_factory=list)
    _memfd_names: dict[int, str] = field(default_factory=dict)
    _fds: list[OpenFd] = field(default_factory=list)
    results: dict[str, int] = field(default_factory=dict)
    _results: int = 0
    dials: bool = False
    """The back-end connects to QEMU (which listens) instead of listening."""
    hang_up_on_channel_close: bool = False
    _counts: dict[str, int] = field(default_factory=dict)

    # -- the stack -------------------------------------------------------------------------

    @property
    def socket(self) -> Path:
        return self.workdir / "vu.sock"

    @property
    def base(self) -> BaseDevice:
        """The device type's facts (queues, CONFIG, a shared-memory BAR)."""
        return base_device(self.device_type or DEVICE_TYPE)

    def _faults(self, faults: Faults) -> Faults:
        """The run's faults, plus PROTOCOL_F_CONFIG for a device that refuses a back-end
        without it (vhost-user-gpio, -input, -snd, -spi)."""
        if not self.base.needs_config:
            return faults
        extra = faults.extra_features | int(ProtocolFeature.CONFIG)
        return dataclasses.replace(faults, extra_features=extra)

    def start_backend(self, layout: ShmemLayout, faults: Faults | None = None) -> Backend:
        faults = self._faults(faults or Faults())
        backend = Backend(
            self.socket, layout, faults=faults, trace_path=self.trace_path,
            num_queues=self.base.queues,
        )  # fmt: skip
        self._keep_raw(backend)
        self.backend = backend.start()
        self.disconnect_at = int(faults.disconnect_at) if faults.disconnect_at else None
        self.hang_up_on_channel_close = faults.hang_up_on_channel_close
        return backend

    def start_bent_backend(self, case: Case, *, dial: bool = False) -> Backend:
        """The fuzzer's back-end for ``case``: its offer, its GET_SHMEM_CONFIG reply and its
        bent replies, recorded byte for byte. ``dial``: it connects to QEMU (QEMU
        listens, QtestConfig(listen=True)) instead of listening."""
        case = self._offered(case)
        backend = FuzzBackend(
            self.socket, case, case.replies, trace_path=self.trace_path, connect=dial,
            connect_timeout=TIMEOUT, num_queues=self.base.queues,
        )  # fmt: skip
        self._keep_raw(backend)
        if dial:
            self.steps.append({"op": "dial"})
        self.backend = backend.start()
        self.dials = dial
        return backend

    def _keep_raw(self, backend: Backend) -> None:
        """Keep the exact bytes of every traced front-end message: the trace decodes
        payloads to JSON, the replay needs what went on the wire (a truncated or
        mis-flagged reply included). Wraps the one Trace the dispatcher records through."""
        record = backend.trace.record

        def keeping(direction: str, header: Header, body: bytes, nfds: int, *rest: Any) -> Any:
            if direction in (FROM_QEMU, TO_QEMU):
                self._raw.append((direction, header, bytes(body), nfds))
            return record(direction, header, body, nfds, *rest)

        setattr(backend.trace, "record", keeping)  # noqa: B010 (an instance override)

    def start_qemu(
        self,
        devices: Sequence[VhostUserDevice],
        *,
        qtest: bool = True,
        extra_args: Sequence[str] = (),
        listen: bool = False,
    ) -> QtestMachine:
        """Start the guest-less QEMU; QemuExited if it dies on the way (a realize crash).
        A bug whose crash prints nothing gets gdb attached (its site is the signature)."""
        config = QtestConfig(
            self.arch, self.qemu, tuple(devices), qtest, listen=listen,
            extra_args=tuple(extra_args),
        )  # fmt: skip
        self.qtest = qtest
        template = build_qtest_command(
            config, self.workdir / "qmp.sock", self.workdir / "qtest.sock"
        )
        self.argv = ["{qemu}", *(w.replace(str(self.workdir), "{dir}") for w in template[1:])]
        self.steps.append({"op": "connect"})
        # A crash that prints nothing is known by its site: gdb on QEMU for that.
        silent = self.bug.exit in SILENT_EXITS
        machine = QtestMachine(config, logdir=self.workdir / "qemu", crash_sites=silent)
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

    def memfd(self, size: int, fill: bytes = b"") -> Memfd:
        mem = Memfd(size)
        self._memfds.append(mem)
        if fill:
            mem.write(0, fill)
        name = f"m{len(self._memfds) - 1}"
        self._memfd_names[mem.fileno()] = name
        self.steps.append({"op": "memfd", "name": name, "size": size, "fill": fill.hex()})
        return mem

    def channel(
        self,
        request: BackendRequest,
        body: bytes,
        fds: Sequence[Memfd | OpenFd] = (),
        *,
        unguarded: bool = False,
        may_fail: bool = False,
        timeout: float = TIMEOUT,
    ) -> str:
        """Send a back-end channel request; returns the name of its recorded result, whose
        value (QEMU's u64) is in self.results. ``unguarded``: even to a device that is not
        started, which Backend otherwise refuses (a bug needs exactly that). ``may_fail``:
        QEMU closing the channel (CLOSED) or not answering within ``timeout`` (NO_ANSWER)
        is the result, not an error."""
        name = f"r{self._results}"
        self._results += 1
        fd_list = [m.fileno() if isinstance(m, Memfd) else m.sent for m in fds]
        self.steps.append(
            {
                "op": "channel",
                "request": int(request),
                "body": body.hex(),
                "fds": [self._memfd_names[fd] for fd in fd_list],
                "result": name,
                "may_fail": may_fail,
                "timeout": timeout,
            }
        )
        try:
            value = self._b().channel_request(
                request, body, fd_list, timeout=timeout, unguarded=unguarded
            )
        except PeerClosed:
            if not may_fail:
                raise
            value = CLOSED
        except WaitTimeout:
            if not may_fail:
                raise
            value = NO_ANSWER
        self.results[name] = value
        return name

    def qtest_write(self, addr: int, data: bytes) -> None:
        with self.recording_qtest() as client:
            client.write(addr, data)

    def close_backend(self) -> None:
        self.steps.append({"op": "close_backend"})
        self._b().close()

    def _offered(self, case: Case) -> Case:
        if not self.base.needs_config:
            return case
        offer = dataclasses.replace(case.offer, extra=case.offer.extra | ProtocolFeature.CONFIG)
        return dataclasses.replace(case, offer=offer)

    def redial(self, case: Case) -> Backend:
        """A new back-end connection to a QEMU that listens (after close_backend)."""
        self.steps.append({"op": "dial"})
        backend = FuzzBackend(
            self.socket, self._offered(case), (), connect=True, connect_timeout=TIMEOUT,
            num_queues=self.base.queues,
        )  # fmt: skip
        self.backend = backend.start()
        return backend

    def fd(self, kind: FdKind, size: int = 0, fill: bytes = b"") -> OpenFd:
        """An fd of ``kind`` (testbed.fuzz.fdspec): a memfd, one reopened read-only, an
        O_PATH fd, ...; ``fill`` written at its start."""
        made = open_fd(FdSpec(kind, size), self.workdir)
        self._fds.append(made)
        if fill:
            os.pwrite(made.handle if made.handle is not None else made.sent, fill, 0)
        name = f"f{len(self._fds) - 1}"
        self._memfd_names[made.sent] = name
        self.steps.append({"op": "fd", "name": name, "kind": str(kind), "size": size,
                           "fill": fill.hex()})  # fmt: skip
        return made

    def file_op(self, fd: OpenFd, op: Op) -> None:
        """The back-end acts on its file (truncate, extend, ...; testbed.fuzz.fdspec)."""
        self.steps.append({"op": "file", "name": self._memfd_names[fd.sent], "do": op.format()})
        fd.apply(op)

    def qtest_read(self, addr: int, length: int) -> bytes:
        with self.recording_qtest() as client:
            return client.read(addr, length)

    def count_fds(self, name: str) -> int:
        """QEMU's open fds now (/proc/PID/fd), kept as ``name`` for check_fds_grew."""
        self.steps.append({"op": "count_fds", "name": name})
        pid = self._m().pid
        count = len(os.listdir(f"/proc/{pid}/fd")) if pid is not None else -1
        self._counts[name] = count
        return count

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int | None:
        self.steps.append({"op": "wait_exit", "timeout": timeout})
        return self._m().wait_exited(timeout)

    # -- checks: a silent bug is what a check saw ------------------------------------------

    def check_bar4(self, size: int, say: str) -> None:
        bar = pci_bar(self._m().pci_device(), 4)
        self.steps.append({"op": "check_bar4", "slot": GUESTLESS_SLOT, "size": size, "say": say})
        if bar is not None and bar["size"] == size:
            self.observed.append(say)

    def check_device(self, say: str) -> None:
        """Observed when the device is there (query-pci): it realized."""
        self.steps.append({"op": "check_device", "slot": GUESTLESS_SLOT, "say": say})
        try:
            self._m().pci_device()
        except TestbedError:
            return
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

    def check_file_size(self, fd: OpenFd, size: int, say: str) -> None:
        """Observed when the file's size is no longer ``size``."""
        name = self._memfd_names[fd.sent]
        self.steps.append({"op": "check_file_size", "name": name, "size": size, "say": say})
        image = fd.image()
        if image is not None and image.size != size:
            self.observed.append(say)

    def check_fds_grew(self, since: str, say: str) -> None:
        """Observed when QEMU holds more fds than counted as ``since``."""
        self.steps.append({"op": "check_fds_grew", "since": since, "say": say})
        before = self._counts[since]
        pid = self._m().pid
        # A close in flight may take a moment: what stays above the count is growth.
        try:
            wait_until(
                lambda: len(os.listdir(f"/proc/{pid}/fd")) <= before,
                0.3,
                "QEMU's fds settling",
                interval=0.02,
            )
        except WaitTimeout:
            self.observed.append(say)

    def check_qmp_silent(self, timeout: float, say: str) -> None:
        """Observed when QEMU does not answer QMP within ``timeout`` (its main loop hangs)."""
        self.steps.append({"op": "check_qmp_silent", "timeout": timeout, "say": say})
        try:
            self._m().qmp("query-status", timeout=timeout)
        except (WaitTimeout, TestbedError):
            if self._m().wait_exited(0.0) is None:
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
        # A SIGSEGV prints nothing: the exit itself is the message, and its site.
        exited = [] if code is None else [exited_line(exit_of(code))]
        site = crash_site("", machine.silent_site()) if machine is not None else ""
        exited += [f"crash site: {site}"] if site else []
        return Evidence.gather([stderr, *exited], code)

    def script(self) -> dict[str, Any]:
        """The stand-alone script (see testbed.bugs.standalone): pure data, JSON-ready."""
        exchanges: list[list[Any]] = []
        for direction, header, body, nfds in self._raw:
            if direction == FROM_QEMU:
                # No answer recorded (yet): the back-end stayed silent, on purpose.
                exchanges.append([header.request, {"silent": True}])
                continue
            if not exchanges:
                continue
            reply: dict[str, Any] = {"flags": header.flags, "size": header.size,
                                     "body": body.hex()}  # fmt: skip
            if header.request != exchanges[-1][0]:
                reply["request"] = header.request
            if nfds:
                reply["fds"] = nfds
            answered = exchanges[-1][1]
            if answered.get("silent"):
                exchanges[-1][1] = reply
            else:  # a further message after the answer (an unsolicited extra REPLY_ACK)
                answered.setdefault("then", []).append(reply)
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
            "device": self.base.type,
            "qtest": self.qtest,
            "backend": {
                "socket": self.socket.name,
                "exchanges": exchanges,
                "disconnect_at": self.disconnect_at,
                "listen": not self.dials,
                "hang_up_on_channel_close": self.hang_up_on_channel_close,
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
            for made in self._fds:
                made.close()


Recipe = Callable[[Run], None]
"""One registry bug's reproducer: the steps it takes on a Run."""
