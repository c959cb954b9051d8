"""Guest-less reproducers: one recipe per registry entry, run with our own stack.

A recipe builds the back-end (`Backend` with the bug's `Faults`), a guest-less QEMU
(`QtestMachine`: qtest accel, or tcg -S) and drives the steps the bug needs through a
`Run`, which both acts (our back-end, QMP, qtest via `PciFunctionDriver`) and records what
it did as a stand-alone script (testbed.bugs.standalone): the QEMU argv, what our back-end
answered to each front-end request, the back-end channel requests with their fds, every
QMP command and qtest line, and the checks that show a silent bug. `testbed bugs check`
uses the outcome; `testbed bugs export` the script.

The one bug that needs a guest (device_del on q35 waits for the guest's ACPI eject) is
rerun through its scenario (testbed.bugs.rerun).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.bugs import Bug, lookup
from testbed.bugs.signature import RUNNING, Evidence, exit_of, exited_line
from testbed.device import ShmemLayout, VhostUserDevice
from testbed.errors import PeerClosed, QemuExited, QmpCommandFailed, TestbedError, WaitTimeout
from testbed.machine import QtestConfig, QtestMachine
from testbed.machine.cmdline import (
    GUESTLESS_SLOT,
    behind_root_port_options,
    build_qtest_command,
    root_port_id,
)
from testbed.machine.probe import pci_bar
from testbed.machine.qtest import PciFunctionDriver, QtestClient, acpi_eject, open_root_port
from testbed.paths import PROJECT_ROOT, make_private_dir, remove_tree
from testbed.resource import Closeable
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import U64, BackendRequest, Header, MMap, Request
from testbed.vhost_user.shmem import Memfd
from testbed.vhost_user.trace import CHANNEL_FROM_QEMU, CHANNEL_TO_QEMU, FROM_QEMU, TO_QEMU

log = logging.getLogger(__name__)

M = 1 << 20
TIMEOUT = 10.0
EXIT_TIMEOUT = 5.0
"""How long a crash may take to land once its trigger was answered."""

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
DOES_NOT_APPLY = "does not apply"
ERROR = "error"


@dataclass(frozen=True)
class Outcome:
    """One recipe run: reproduced / not reproduced / does not apply / error."""

    bug: str
    arch: str
    status: str
    evidence: Evidence | None
    seconds: float
    detail: str = ""

    @property
    def reproduced(self) -> bool:
        return self.status == REPRODUCED

    def to_json(self) -> dict[str, Any]:
        return {
            "bug": self.bug,
            "arch": self.arch,
            "status": self.status,
            "signature_seen": self.evidence.headline() if self.evidence else None,
            "exit": self.evidence.exit if self.evidence else None,
            "seconds": round(self.seconds, 2),
            "detail": self.detail,
        }


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
        fds: Sequence[Memfd] = (),
        *,
        unguarded: bool = False,
    ) -> str:
        """Send a back-end channel request; returns the name of its recorded result, whose
        value (QEMU's u64) is in self.results. ``unguarded``: straight onto the channel,
        without Backend's refusal before DRIVER_OK (a bug needs exactly that)."""
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
        backend = self._b()
        if not unguarded:
            value = backend.channel_request(request, body, [m.fileno() for m in fds])
        else:
            value = self._send_unguarded(backend, request, body, [m.fileno() for m in fds])
        self.results[name] = value
        return name

    @staticmethod
    def _send_unguarded(
        backend: Backend, request: BackendRequest, body: bytes, fds: list[int]
    ) -> int:
        session = backend.session
        if session is None or session.channel is None:
            raise RecipeFailed("no back-end channel (SET_BACKEND_REQ_FD never came)")
        header = Header.make(request, len(body), need_reply=True)
        backend.trace.record(CHANNEL_TO_QEMU, header, body, len(fds))
        try:
            session.channel.settimeout(TIMEOUT)
            session.channel.send(header, body, fds)
            with session.channel.recv() as reply:
                backend.trace.record(CHANNEL_FROM_QEMU, reply.header, reply.body, len(reply.fds))
                return U64.unpack(reply.body).value
        except OSError as exc:
            raise PeerClosed(f"back-end channel broke during {request.name}: {exc}") from exc

    def qtest_write(self, addr: int, data: bytes) -> None:
        with self.recording_qtest() as client:
            client.write(addr, data)

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


Recipe = Callable[[Run], None]


# -- the recipes, one per registry entry ---------------------------------------------------


def _device(run: Run, layout: ShmemLayout, **kwargs: Any) -> VhostUserDevice:
    return VhostUserDevice("vu0", run.socket, layout, **kwargs)


def _realize_with(run: Run, layout: ShmemLayout, faults: Faults, **device: Any) -> None:
    """Cold-plug one device served with ``faults``: the crash comes in realize."""
    run.start_backend(ShmemLayout() if faults.shmem_raw_sizes else layout, faults)
    run.start_qemu([_device(run, layout, **device)], qtest=False)
    run.wait_request(Request.GET_SHMEM_CONFIG)


def vub_get_features_abort(run: Run) -> None:
    _realize_with(run, ShmemLayout({0: 4 * M}), Faults(shmem_reply_flags=0xD))


def bar_not_power_of_two_abort(run: Run) -> None:
    _realize_with(run, ShmemLayout(), Faults(shmem_raw_sizes={0: 4 * M, 1: 16 * M}))


def shmem_caps_overflow_abort(run: Run) -> None:
    four = ShmemLayout({0: 2 * M, 1: 2 * M, 2: 2 * M, 3: 2 * M})
    _realize_with(run, four, Faults(), allow_overfull=True)


def truncated_shmem_config_accepted(run: Run) -> None:
    _realize_with(run, ShmemLayout({0: 2 * M, 1: 2 * M}), Faults(shmem_truncate=100))
    run.check_bar4(
        4 * M, "QEMU accepted a truncated GET_SHMEM_CONFIG reply (100 of 2056 bytes): BAR 4 "
        "built from it"
    )  # fmt: skip


def nregions_mismatch_accepted(run: Run) -> None:
    _realize_with(run, ShmemLayout({0: 4 * M}), Faults(shmem_nregions=2))
    run.check_bar4(4 * M, "nregions 2 with one non-zero size accepted: BAR 4 of 4 MiB")


def _started(run: Run, layout: ShmemLayout) -> QtestMachine:
    """A device at DRIVER_OK (qtest plays the guest's driver)."""
    run.start_backend(layout)
    machine = run.start_qemu([_device(run, layout)])
    run.start_device()
    return machine


def readonly_map_writable(run: Run) -> None:
    layout = ShmemLayout({0: 2 * M})
    machine = _started(run, layout)
    pattern = bytes(range(256)) * 16
    mem = run.memfd(M, pattern)
    result = run.channel(BackendRequest.SHMEM_MAP, MMap(0, 0, 0, M, 0).pack(), [mem])
    if run.results[result] != 0:
        raise RecipeFailed(f"QEMU refused the read-only SHMEM_MAP (u64 {run.results[result]})")
    run.qtest_write(_bar4_address(machine), b"guest wrote through a read-only map")
    run.check_memfd(mem, 0, pattern[:64], "write through a read-only mapping reached the memfd")


def _bar4_address(machine: QtestMachine) -> int:
    bar = pci_bar(machine.pci_device(), 4)
    if bar is None:
        raise RecipeFailed("the device has no BAR 4")
    return int(bar["address"])


def _channel_accepts(run: Run, body: bytes, say: str) -> None:
    layout = ShmemLayout({0: 2 * M, 1: 2 * M})
    _started(run, layout)
    mem = run.memfd(M)
    result = run.channel(BackendRequest.SHMEM_MAP, body, [mem])
    run.check_result(result, 0, say)


def shmem_map_unknown_flags_accepted(run: Run) -> None:
    body = MMap(0, 0, 0, M, 0xF0).pack()
    _channel_accepts(run, body, "SHMEM_MAP ignores unknown flag bits (0xf0): QEMU answered 0")


def shmem_map_payload_size_accepted(run: Run) -> None:
    body = MMap(0, 0, 0, M, 1).pack()[:-8]
    _channel_accepts(run, body, f"SHMEM_MAP with a {len(body)}-byte payload is mapped")


def reconnect_realize_no_wait(run: Run) -> None:
    """Cold-plugged with reconnect-ms: the chardev connects in the background, realize
    does not wait for it (QEMU exits 1 with "Failed to set msg fds")."""
    layout = ShmemLayout({0: 4 * M})
    run.start_backend(layout)
    run.start_qemu([_device(run, layout, reconnect_ms=200)], qtest=False)


def backend_hangup_del_eventfd_abort(run: Run) -> None:
    """Closed right after realize (no driver: as in the guest scenario, where nothing binds
    to the device). Measured: once qtest has driven the device to DRIVER_OK, the hang-up
    is survived ("Unexpected end-of-file"); the abort is the realized-not-started path."""
    layout = ShmemLayout({0: 4 * M})
    run.start_backend(layout)
    run.start_qemu([_device(run, layout)], qtest=False)
    run.wait_request(Request.GET_SHMEM_CONFIG)
    run.close_backend()
    run.wait_exit()


def unplug_live_mapping_del_subregion_abort(run: Run) -> None:
    """Cold-plugged behind a pcie-root-port (q35 hot-unplugs through ACPI there), started
    and mapped; then device_del and the eject a guest's ACPI _EJ0 would write, over qtest."""
    layout = ShmemLayout({0: 4 * M})
    run.start_backend(layout)
    device = VhostUserDevice("vu0", run.socket, layout, bus=root_port_id(0), addr=0)
    run.start_qemu([], extra_args=behind_root_port_options(run.arch, device))
    with run.recording_qtest() as client:
        function = open_root_port(client, run.arch)
    run.start_device(function)
    mem = run.memfd(64 * 1024, bytes(range(256)) * 256)
    result = run.channel(BackendRequest.SHMEM_MAP, MMap(0, 0, M, 64 * 1024, 1).pack(), [mem])
    if run.results[result] != 0:
        raise RecipeFailed(f"QEMU refused the SHMEM_MAP (u64 {run.results[result]})")
    run.qmp("device_del", {"id": device.device_id})
    with run.recording_qtest() as client:
        acpi_eject(client)
    run.wait_exit()


def shmem_map_stopped_device_segfault(run: Run) -> None:
    """SHMEM_MAP on the channel of a realized device nobody started (no DRIVER_OK)."""
    layout = ShmemLayout({0: 2 * M, 1: 2 * M})
    run.start_backend(layout)
    run.start_qemu([_device(run, layout)], qtest=False)
    run.wait_request(Request.GET_SHMEM_CONFIG)
    mem = run.memfd(64 * 1024)
    body = MMap(1, 0, M, 64 * 1024, 1).pack()
    with contextlib.suppress(PeerClosed):  # QEMU dies instead of answering
        run.channel(BackendRequest.SHMEM_MAP, body, [mem], unguarded=True)
    run.wait_exit()


RECIPES: dict[str, Recipe] = {
    "vub-get-features-abort": vub_get_features_abort,
    "bar-not-power-of-two-abort": bar_not_power_of_two_abort,
    "shmem-caps-overflow-abort": shmem_caps_overflow_abort,
    "truncated-shmem-config-accepted": truncated_shmem_config_accepted,
    "nregions-mismatch-accepted": nregions_mismatch_accepted,
    "readonly-map-writable": readonly_map_writable,
    "reconnect-realize-no-wait": reconnect_realize_no_wait,
    "backend-hangup-del-eventfd-abort": backend_hangup_del_eventfd_abort,
    "shmem-map-unknown-flags-accepted": shmem_map_unknown_flags_accepted,
    "shmem-map-payload-size-accepted": shmem_map_payload_size_accepted,
    "unplug-live-mapping-del-subregion-abort": unplug_live_mapping_del_subregion_abort,
    "shmem-map-stopped-device-segfault": shmem_map_stopped_device_segfault,
}
"""Bugs without an entry here are rerun through their scenario (needs_guest ones)."""


# -- running one ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    outcome: Outcome
    script: dict[str, Any] | None
    """The stand-alone script; None for a scenario rerun."""


def run_recipe(bug_id: str, arch: str, qemu: Path, *, trace_path: Path | None = None) -> Recorded:
    """Run ``bug_id``'s reproducer on ``arch`` against ``qemu``; nothing is left running."""
    bug = lookup(bug_id)
    started = time.monotonic()
    if arch not in bug.arches:
        return Recorded(Outcome(bug.id, arch, DOES_NOT_APPLY, None, 0.0), None)
    recipe = RECIPES.get(bug.id)
    if recipe is None and any(CORPUS_TEST in scenario for scenario in bug.scenarios):
        return Recorded(_replay_corpus(bug, arch, qemu, started), None)
    if recipe is None:
        return Recorded(_rerun(bug, arch, started), None)
    workdir = make_private_dir("bug")
    run = Run(bug, arch, qemu, workdir, trace_path)
    detail = ""
    try:
        with run:
            try:
                recipe(run)
            except (QemuExited, PeerClosed) as exc:
                # The crash (or refusal) we came for; its logs went with the run dir.
                detail = str(exc).splitlines()[0].split(" (logs in ")[0]
            except QmpCommandFailed as exc:
                detail = f"QMP {exc.command} failed: {exc.desc}"
            except (WaitTimeout, RecipeFailed) as exc:
                detail = str(exc)
            evidence = run.evidence()
        script = run.script()
    finally:
        remove_tree(workdir)
    status = REPRODUCED if bug.matches(evidence) else NOT_REPRODUCED
    outcome = Outcome(bug.id, arch, status, evidence, time.monotonic() - started, detail)
    return Recorded(outcome, script)


CORPUS_TEST = "tests/test_fuzz_corpus.py::test_corpus_case["
CORPUS_DIR = PROJECT_ROOT / "tests" / "data" / "fuzz-corpus"


def _replay_corpus(bug: Bug, arch: str, qemu: Path, started: float) -> Outcome:
    """A bug the fuzzer found: replay its minimised corpus case (this arch's, else the
    first one, moved to this arch) through the fuzzer's player."""
    import dataclasses

    from testbed.fuzz.corpus import load
    from testbed.fuzz.run import replay
    from testbed.fuzz.triage import evidence as finding_evidence

    names = [s.removeprefix(CORPUS_TEST).rstrip("]") for s in bug.scenarios if CORPUS_TEST in s]
    name = next((n for n in names if n.startswith(f"{arch}-")), names[0])
    case, _recorded = load(CORPUS_DIR / f"{name}.json")
    if case.arch != arch:
        case = dataclasses.replace(case, arch=arch)
    evidence = finding_evidence(replay(case, qemu), bug)
    status = REPRODUCED if bug.matches(evidence) else NOT_REPRODUCED
    return Outcome(bug.id, arch, status, evidence, time.monotonic() - started, f"corpus {name}")


def _rerun(bug: Bug, arch: str, started: float) -> Outcome:
    """A bug that needs a guest: rerun its first scenario for ``arch``."""
    from testbed.bugs.rerun import rerun_scenario

    nodeid = f"{bug.scenarios[0]}[{arch}]"
    result = rerun_scenario(nodeid, ["--arch", arch])
    # The scenario's known-bug mark already matched the signature when it says xfailed;
    # its message is "known bug <id> on QEMU <v>: <headline>".
    headline = result.message.partition(": ")[2] or result.message
    evidence = Evidence.gather([headline], bug.exit if result.outcome == "xfailed" else RUNNING)
    status = REPRODUCED if result.outcome == "xfailed" and bug.matches(evidence) else NOT_REPRODUCED
    log.info("rerun %s: %s", nodeid, result.summary())
    return Outcome(bug.id, arch, status, evidence, time.monotonic() - started, nodeid)
