"""Plays one case against a guest-less QEMU: our back-end with the case's offer, config and
reply mutations; QEMU under qtest (we are the guest's PCI core and virtio driver) walked
along the case's path; the back-end channel requests sent in their states.

What it returns is raw (pure data): how QEMU ended, where it was, what each request got, and
the oracles' observations. testbed.fuzz.triage turns that into signatures.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.device import ShmemLayout, VhostUserDevice
from testbed.errors import PeerClosed, ProtocolError, QemuExited, TestbedError, WaitTimeout
from testbed.fuzz.grammar import (
    REALIZE,
    U64_MASK,
    Action,
    Case,
    ReplyKind,
    ReplyMutation,
    ShmemConfig,
    State,
    fd_size,
    frontend_name,
)
from testbed.fuzz.grammar import encode as encode_action
from testbed.fuzz.oracle import MapModel
from testbed.host.kernel_log import segfault_site
from testbed.limits import MAX_SHMEM_REGIONS, PAGE_SIZE
from testbed.machine import QtestConfig, QtestMachine
from testbed.machine.cmdline import behind_root_port_options, root_port_id
from testbed.machine.probe import pci_bar
from testbed.machine.qtest import PciFunctionDriver, acpi_eject, open_root_port
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user.backend import Backend, offer
from testbed.vhost_user.backend.dispatch import Dispatcher
from testbed.vhost_user.backend.handlers import DeviceHandler, Reply
from testbed.vhost_user.backend.session import Session
from testbed.vhost_user.connection import Connection, Message
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    SHMEM_CONFIG_SIZE,
    VERSION,
    BackendRequest,
    Header,
    Request,
)
from testbed.vhost_user.trace import Trace, TraceEntry
from testbed.virtio import DEVICE_STATUS

log = logging.getLogger(__name__)

STEP_TIMEOUT = 3.0
"""Deadline of every wait inside a case: a channel reply, QMP, a state transition."""
START_TIMEOUT = 10.0
DRIVER_OK_TIMEOUT = 1.0
FD_SETTLE = 0.3


@dataclass
class Sent:
    """One back-end request as sent and answered."""

    state: str
    request: str
    verdict: int | None = None
    """QEMU's u64 (None: no reply asked, or none came)."""
    reply: str = ""
    """"ok", "none" (not asked), "timeout", "closed", "malformed"."""


@dataclass
class Observation:
    """A silent misbehaviour an oracle saw (QEMU kept running)."""

    kind: str  # "accepted", "refused", "bar4", "readonly", "leak", "violation", "no-reply"
    text: str
    state: str = REALIZE
    request: str = ""


@dataclass
class PlayResult:
    case: Case
    seconds: float = 0.0
    returncode: int | None = None
    stderr: str = ""
    died_in: str = ""
    """Where QEMU was when it died or hung: "<REQUEST>@<state>" or "realize:<REQUEST>"."""
    hung: str = ""
    segfault: dict[str, str] = field(default_factory=dict)
    """From the kernel log: binary, offset (in the binary's mapping), ip, addr."""
    sent: list[Sent] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    reached: list[str] = field(default_factory=list)
    """States reached, in order."""
    pairs: list[tuple[str, str]] = field(default_factory=list)
    """(state, request) pairs exercised (reply mutations as ("realize", "reply:..."))."""
    error: str = ""
    """A failure of ours (not QEMU's), if any."""
    fds_before: int = -1
    """QEMU's open fds (/proc/PID/fd) once the device is realized, before the case's path."""
    fds_after: int = -1
    """QEMU's open fds at the end of the case, the device stopped again (-1: QEMU died,
    hung, or the device could not be brought back to stopped)."""

    @property
    def fd_growth(self) -> int | None:
        if self.fds_before < 0 or self.fds_after < 0:
            return None
        return self.fds_after - self.fds_before


# -- the back-end, bent per case ------------------------------------------------------------


class FuzzDispatcher(Dispatcher):
    """The back-end's dispatcher with the case's reply mutations and its own
    GET_SHMEM_CONFIG reply (any nregions, sizes, padding, truncation, extra bytes, flags)."""

    def __init__(
        self,
        device: DeviceHandler,
        trace: Trace,
        lock: threading.Condition,
        notify: Callable[[TraceEntry], None],
        *,
        case: Case,
        mutations: tuple[ReplyMutation, ...],
    ) -> None:
        super().__init__(device, trace, lock, notify)
        self.case = case
        self.mutations = {(m.request, m.nth): m for m in mutations}
        self.counts: dict[int, int] = {}
        self.fired: list[ReplyMutation] = []
        self._active: ReplyMutation | None = None

    def dispatch(self, s: Session, msg: Message, request: Request) -> None:
        n = self.counts[int(request)] = self.counts.get(int(request), 0) + 1
        mutation = self.mutations.get((int(request), n))
        self._active = mutation
        if mutation is not None:
            self.fired.append(mutation)
            if mutation.kind == ReplyKind.HANGUP:
                raise ProtocolError(f"fuzz: hang-up at {request.name}")
            if mutation.kind == ReplyKind.DELAY:
                time.sleep(min(mutation.value, 1000) / 1000)
        try:
            if request is Request.GET_SHMEM_CONFIG:
                config = self.case.config
                self._reply(s, request, Reply(shmem_reply_body(config), config.flags))
            else:
                super().dispatch(s, msg, request)
            if mutation is not None and mutation.kind == ReplyKind.ACK:
                body = (mutation.value & ((1 << 64) - 1)).to_bytes(8, "little")
                self.send(s, Header(int(request), VERSION | FLAG_REPLY, 8), body)
        finally:
            self._active = None

    def _reply(self, s: Session, request: Request, reply: Reply) -> None:
        m = self._active
        flags = VERSION | FLAG_REPLY if reply.flags is None else reply.flags
        body = reply.body
        code = int(request)
        size_lie = 0
        fds: list[int] = []
        if m is not None:
            if m.kind == ReplyKind.FLAGS:
                flags = m.value
            elif m.kind == ReplyKind.SIZE:
                body = body[: max(0, len(body) + m.value)] + bytes(max(0, m.value))
            elif m.kind == ReplyKind.LIE:
                size_lie = m.value
            elif m.kind == ReplyKind.VALUE and len(body) == 8:
                body = (m.value & ((1 << 64) - 1)).to_bytes(8, "little")
            elif m.kind == ReplyKind.BYTES:
                body = bytes(b ^ (m.value & 0xFF) for b in body)
            elif m.kind == ReplyKind.REQUEST:
                code = m.value
        header = Header(code, flags & 0xFFFFFFFF, max(0, len(body) + size_lie))
        try:
            if m is not None and m.kind == ReplyKind.FDS:
                fds = [_memfd(PAGE_SIZE) for _ in range(max(1, min(m.value, 8)))]
            self.send(s, header, body, fds, allow_size_mismatch=True)
        finally:
            for fd in fds:
                os.close(fd)


def shmem_reply_body(config: ShmemConfig) -> bytes:
    """The case's GET_SHMEM_CONFIG reply body: its sizes (any, not a layout: shmids and
    sizes cut to the wire's widths) encoded as our back-end encodes raw sizes, then bent
    as the case says (nregions, padding, truncation, extra bytes)."""
    sizes = {shmid % MAX_SHMEM_REGIONS: size & U64_MASK for shmid, size in config.sizes.items()}
    body = offer.shmem_config_body(ShmemLayout(), Faults(shmem_raw_sizes=sizes))
    return offer.bend_shmem_config(
        body,
        nregions=config.count if config.nregions is None else config.nregions,
        padding=config.padding,
        truncate=config.truncate,
        extra=config.extra,
    )


class FuzzBackend(Backend):
    """Backend whose dispatcher plays a case's reply mutations."""

    def __init__(
        self, path: Path, case: Case, mutations: tuple[ReplyMutation, ...], **kwargs: Any
    ) -> None:
        offer = case.offer
        faults = Faults(
            no_shmem=offer.shmem_bit is None,
            shmem_bit=22 if offer.shmem_bit is None else offer.shmem_bit,
            extra_features=offer.extra,
            withhold_features=offer.withhold,
        )
        self.fuzz: FuzzDispatcher | None = None

        def wrap(base: Dispatcher) -> Dispatcher:
            self.fuzz = base.build_like(
                functools.partial(FuzzDispatcher, case=case, mutations=mutations)
            )
            return self.fuzz

        super().__init__(path, ShmemLayout(), faults=faults, wrap_dispatcher=wrap, **kwargs)


def _memfd(size: int) -> int:
    fd = os.memfd_create("testbed-fuzz", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def qemu_fds(pid: int | None) -> int:
    if pid is None:
        return -1
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def qemu_fd_links(pid: int | None) -> dict[str, str]:
    """QEMU's open fds: number -> what it is (/proc/PID/fd links)."""
    out: dict[str, str] = {}
    if pid is None:
        return out
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        with contextlib.suppress(OSError):
            out[name] = os.readlink(f"/proc/{pid}/fd/{name}")
    return out


def fd_kind(target: str) -> str:
    """What an fd is, without its numbers: "eventfd", "socket", "the back-end's memfd"."""
    if target.startswith("/memfd:testbed-fuzz"):
        return "the back-end's memfd"
    found = re.fullmatch(r"anon_inode:\[?([\w-]+)\]?", target)
    if found:
        return found[1]
    found = re.fullmatch(r"(\w+):\[\d+\]", target)  # socket:[123], pipe:[456]
    if found:
        return found[1]
    return re.sub(r"\d+", "N", target.removesuffix(" (deleted)"))


# -- playing ---------------------------------------------------------------------------------


class _Died(Exception):
    pass


class _Hung(Exception):
    pass


class _Unreached(Exception):
    pass


class Player:
    """One case against one QEMU. Use play(); nothing is left running on any path."""

    def __init__(self, case: Case, qemu: Path, workdir: Path) -> None:
        self.case = case
        self.qemu_path = qemu
        self.workdir = workdir
        self.result = PlayResult(case)
        self.backend: FuzzBackend | None = None
        self.old_backends: list[FuzzBackend] = []
        self.machine: QtestMachine | None = None
        self.pci: PciFunctionDriver | None = None
        bent = {m.request for m in case.replies} & {
            Request.GET_FEATURES,
            Request.GET_PROTOCOL_FEATURES,
            Request.SET_PROTOCOL_FEATURES,
            Request.GET_SHMEM_CONFIG,
        }
        self.model = MapModel(
            case.config,
            case.behind_root_port,
            negotiated=case.offer.shmem_negotiable,
            trusted=not bent,
        )
        self.where = f"{REALIZE}:start"
        self.mems: dict[int, int] = {}
        self.channel_broken = False
        self.kept_channel: Connection | None = None
        self.links_before: dict[str, str] = {}
        """The first connection's back-end channel, kept over a reconnect."""

    @property
    def socket(self) -> Path:
        return self.workdir / "vu.sock"

    def close(self) -> None:
        try:
            if self.machine is not None:
                self.machine.close()
        finally:
            for b in [*self.old_backends, self.backend]:
                if b is not None:
                    b.close()
            if self.kept_channel is not None:
                self.kept_channel.close()

    # -- the steps --------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._realize()
            self._check_config()
            self.links_before = qemu_fd_links(self.machine.pid if self.machine else None)
            self.result.fds_before = len(self.links_before) if self.links_before else -1
            for state in self.case.path:
                self._enter(state)
                self.result.reached.append(state.value)
                for action in self.case.actions:
                    if action.state == state.value:
                        self._send(action)
                self._leave(state)
            self._ping("the end of the case")
            self._count_fds()
            self._collect_violations()
        except _Died:
            pass
        except _Hung as exc:
            self.result.hung = str(exc)
        except _Unreached as exc:
            log.debug("case %d: %s", self.case.index, exc)
            with contextlib.suppress(_Died, _Hung):
                self._ping(f"after {exc}")
        finally:
            m = self.machine
            if m is not None and self.result.returncode is None:
                code = m.wait_exited(0.0) if m.returncode is None else m.returncode
                if code is not None:
                    self._record_death(code)
            if m is not None:
                self.result.stderr = m.stderr_text()[-4000:]

    def _count_fds(self) -> None:
        """QEMU's fds at the end of the case, the device stopped as it was when counted
        before (a started device is reset first, as a guest would): what the case left
        behind. The count may lag a close by a moment: polled down to the count before,
        within a deadline; what stays above it is growth."""
        m = self.machine
        assert m is not None and m.qtest is not None
        started = self.result.reached and self.result.reached[-1] in (
            State.AFTER_DRIVER_OK,
            State.AFTER_RECONNECT,
        )
        if self.case.behind_root_port:
            return  # ejected: the device (and its chardev's fds) are gone, nothing to compare
        if started and self.pci is not None:
            self.where = "settle:device-reset"
            try:
                m.qtest.write_int(self.pci.bars[2] + DEVICE_STATUS, 8, 0)
            except QemuExited:
                raise self._dead() from None
            self._ping("after the settling device reset")
            self.where = "settled"
        before = self.result.fds_before
        deadline = time.monotonic() + FD_SETTLE
        while True:
            after = qemu_fds(m.pid)
            if after <= before or time.monotonic() >= deadline:
                break
            time.sleep(0.02)  # bounded poll for a close in flight
        self.result.fds_after = after
        if before >= 0 and after > before:
            links = qemu_fd_links(m.pid)
            grown = [t for n, t in links.items() if self.links_before.get(n) != t]
            kinds = ", ".join(sorted({fd_kind(t) for t in grown})) or "?"
            self._observe(
                "leak",
                f"QEMU holds {after - before} more fd(s) after the case than before it, "
                f"the device stopped both times: {kinds} ({self._leak_context()})",
                self.case.last_state,
                self.result.sent[-1].request if self.result.sent else "",
            )

    def _leak_context(self) -> str:
        """What the case did that can leave fds behind, for the leak's signature: the
        front-end requests whose replies were bent, else the back-end requests sent."""
        fired = self.backend.fuzz.fired if self.backend and self.backend.fuzz else []
        for b in self.old_backends:
            fired = [*(b.fuzz.fired if b.fuzz else []), *fired]
        if fired:
            names = sorted({frontend_name(m.request) for m in fired})
            return "replies bent: " + ", ".join(names)
        sent = sorted({s.request for s in self.result.sent})
        return "sent: " + (", ".join(sent) if sent else "nothing")

    def _record_death(self, code: int) -> None:
        self.result.returncode = code
        self.result.died_in = self.result.died_in or self.where
        if code == -11 and self.machine is not None:
            self.result.segfault = segfault_site(self.machine.pid)

    def _dead(self) -> _Died:
        m = self.machine
        assert m is not None
        code = m.wait_exited(2.0)
        if code is None:
            return _Died()  # caller decides; not dead
        self._record_death(code)
        return _Died()

    def _alive_or_raise(self, doing: str) -> None:
        """QEMU still answers QMP within the deadline, else _Died / _Hung."""
        m = self.machine
        assert m is not None
        if m.returncode is not None or m.wait_exited(0.0) is not None:
            raise self._dead()
        self._ping(doing)

    def _ping(self, doing: str) -> None:
        m = self.machine
        assert m is not None
        try:
            m.qmp("query-status", timeout=STEP_TIMEOUT)
        except QemuExited:
            raise self._dead() from None
        except (WaitTimeout, TestbedError):
            if m.wait_exited(0.5) is not None:
                raise self._dead() from None
            raise _Hung(f"QMP silent for {STEP_TIMEOUT:.0f}s {doing} ({self.where})") from None

    def _new_backend(self, mutations: tuple[ReplyMutation, ...]) -> FuzzBackend:
        backend = FuzzBackend(
            self.socket,
            self.case,
            mutations,
            connect=self.case.reconnects,
            connect_timeout=START_TIMEOUT,
        )
        self.backend = backend
        backend.start()
        return backend

    def _realize(self) -> None:
        case = self.case
        self._new_backend(case.replies)
        for m in case.replies:
            self.result.pairs.append((REALIZE, f"reply:{frontend_name(m.request)}:{m.kind}"))
        device = VhostUserDevice(
            "vu0",
            self.socket,
            bus=root_port_id(0) if case.behind_root_port else None,
            addr=0 if case.behind_root_port else None,
            allow_overfull=True,
        )
        devices: tuple[VhostUserDevice, ...] = (device,)
        extra: tuple[str, ...] = ()
        if case.behind_root_port:
            extra = tuple(behind_root_port_options(case.arch, device))
            devices = ()
        config = QtestConfig(
            case.arch, self.qemu_path, devices, qtest=True, listen=case.reconnects,
            extra_args=extra,
        )  # fmt: skip
        self.machine = QtestMachine(config, logdir=self.workdir / "qemu", qmp_timeout=STEP_TIMEOUT)
        try:
            self.machine.start(timeout=START_TIMEOUT)
        except QemuExited as exc:
            self.where = f"{REALIZE}:{self._last_request()}"
            if exc.returncode is not None:
                self._record_death(exc.returncode)
            raise _Died() from None
        except (WaitTimeout, TestbedError) as exc:
            self.where = f"{REALIZE}:{self._last_request()}"
            qm = self.machine
            if qm.pid is not None and qm.wait_exited(0.5) is None and qm.returncode is None:
                raise _Hung(f"realize did not finish within {START_TIMEOUT:.0f}s: {exc}") from None
            raise _Died() from None
        self.where = "realized"

    def _last_request(self) -> str:
        seen = self.backend.requests_seen if self.backend else []
        return seen[-1].name if seen else "connect"

    def _check_config(self) -> None:
        """Oracle: BAR 4 as query-pci shows it, against the config we served."""
        case = self.case
        if case.behind_root_port:
            return
        assert self.machine is not None
        bar = pci_bar(self.machine.pci_device(), 4)
        size = None if bar is None else int(bar["size"])
        bent = {m.request for m in case.replies} & {
            Request.GET_FEATURES,
            Request.GET_PROTOCOL_FEATURES,
            Request.SET_PROTOCOL_FEATURES,
        }
        if bent:
            return
        if not case.offer.shmem_negotiable:
            if size is not None:
                self._observe("bar4", f"BAR 4 ({size} bytes) without SHMEM negotiated at bit 22")
            return
        problems = case.config.problems(False)
        full = SHMEM_CONFIG_SIZE
        for m in case.replies:
            if m.request != Request.GET_SHMEM_CONFIG or m.nth != 1:
                continue
            if m.kind == ReplyKind.BYTES:
                return  # the sizes are garbled: no layout to compare with
            if m.kind == ReplyKind.REQUEST and m.value != Request.GET_SHMEM_CONFIG:
                problems.insert(0, f"a reply carrying request {m.value} taken as request 44's")
            elif m.kind == ReplyKind.FLAGS and m.value != 0x5:
                problems.insert(0, f"reply flags 0x{m.value:x}")
            elif m.kind == ReplyKind.SIZE and m.value < 0:
                problems.insert(0, f"truncated GET_SHMEM_CONFIG reply ({full + m.value} bytes)")
            elif m.kind == ReplyKind.SIZE and m.value > 0:
                problems.insert(0, f"oversized GET_SHMEM_CONFIG reply ({full + m.value} bytes)")
        if problems and size is not None:
            self._observe("accepted", f"GET_SHMEM_CONFIG accepted: {problems[0]} (BAR 4 {size})")
        elif not problems:
            total = sum(v for v in case.config.sizes.values() if v)
            want = total or None
            if size != want:
                self._observe(
                    "bar4", f"device realized with BAR 4 size {size}, the config says {want}"
                )

    def _observe(self, kind: str, text: str, state: str = REALIZE, request: str = "") -> None:
        self.result.observations.append(Observation(kind, text, state, request))

    def _driver(self) -> PciFunctionDriver:
        m = self.machine
        assert m is not None and m.qtest is not None
        if not self.case.behind_root_port:
            return PciFunctionDriver(m.qtest, self.case.arch)
        return open_root_port(m.qtest, self.case.arch)

    def _enter(self, state: State) -> None:
        m = self.machine
        b = self.backend
        assert m is not None and m.qtest is not None and b is not None
        self.where = f"enter:{state.value}"
        try:
            if state is State.AFTER_DRIVER_OK:
                self.pci = self._driver()
                self.pci.start_device()
                # QEMU starts the vhost device inside the qtest write of DRIVER_OK: what
                # is left to arrive comes at once, or never (a start that failed).
                self._wait_backend(lambda t: b.wait_driver_ok(t), DRIVER_OK_TIMEOUT)
                self.model.started = True
            elif state is State.DEVICE_RESET:
                assert self.pci is not None
                m.qtest.write_int(self.pci.bars[2] + DEVICE_STATUS, 8, 0)
                self.model.reset()
            elif state is State.AFTER_SYSTEM_RESET:
                m.qmp("system_reset")
                m.wait_event("RESET", STEP_TIMEOUT)
                self.model.reset()
            elif state is State.DURING_DEVICE_DEL:
                m.qmp("device_del", {"id": "vu0-dev"})
            elif state is State.AFTER_RECONNECT:
                self._reconnect(b)
        except QemuExited:
            raise self._dead() from None
        except (WaitTimeout, TestbedError, OSError) as exc:
            if m.wait_exited(0.3) is not None:
                raise self._dead() from None
            raise _Unreached(f"{state.value} not reached: {exc}") from None
        self.where = state.value

    def _reconnect(self, b: FuzzBackend) -> None:
        """Hang up the front-end socket and connect a new back-end (Case.reconnect).

        "reset": hang up under the started device (QEMU 11.1.3 survives that), reset the
        device (status 0) while no back-end is connected, connect again; the device stays
        stopped. "restart": the same, then DRIVER_OK again over the new connection.
        "stopped": hang up before DRIVER_OK, connect, then DRIVER_OK. "live": connect
        again under the started device. The old back-end channel is kept open (only the
        front-end socket is hung up): requests in after-reconnect go over the new
        connection's channel, or over the old one when QEMU set none up."""
        m = self.machine
        assert m is not None and m.qtest is not None
        mode = self.case.reconnect
        self.where = "enter:after-reconnect"
        session = b.session
        if session is not None and session.channel is not None and not self.channel_broken:
            self.kept_channel, session.channel = session.channel, None
        self.old_backends.append(b)
        b.close()
        if mode in ("reset", "restart") and self.pci is not None:
            self.where = "enter:after-reconnect:reset"
            m.qtest.write_int(self.pci.bars[2] + DEVICE_STATUS, 8, 0)
            self.where = "enter:after-reconnect"
        nb = self._new_backend(())
        self._wait_backend(lambda t: nb.wait_connected(t), STEP_TIMEOUT)
        self.model.reset()
        self._ping("after the reconnect")
        if mode in ("reset", "live"):
            return
        self.where = "enter:after-reconnect:driver-ok"
        if self.pci is None:
            self.pci = self._driver()
        self.pci.start_device()
        self._wait_backend(lambda t: nb.wait_driver_ok(t), DRIVER_OK_TIMEOUT)
        self.model.started = True

    def _wait_backend(self, wait: Callable[[float], None], timeout: float) -> None:
        """``wait`` (a back-end wait taking a timeout) in short slices, so that QEMU dying
        meanwhile ends it at once: QemuExited, or WaitTimeout at the deadline."""
        m = self.machine
        assert m is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                wait(min(0.05, max(0.0, deadline - time.monotonic())))
                return
            except WaitTimeout:
                if m.wait_exited(0.0) is not None:
                    raise self._dead() from None
                if time.monotonic() >= deadline:
                    raise

    def _leave(self, state: State) -> None:
        m = self.machine
        assert m is not None and m.qtest is not None
        if state is not State.DURING_DEVICE_DEL:
            return
        self.where = "eject"
        try:
            acpi_eject(m.qtest)
            m.wait_event("DEVICE_DELETED", STEP_TIMEOUT)
        except QemuExited:
            raise self._dead() from None
        except (WaitTimeout, TestbedError, OSError) as exc:
            if m.wait_exited(0.3) is not None:
                raise self._dead() from None
            raise _Unreached(f"eject: {exc}") from None
        self.where = "ejected"

    def _fds(self, kinds: tuple[str, ...], keep: list[int]) -> list[int]:
        out = []
        for kind in kinds:
            if kind.startswith("memfd:"):
                fd = _memfd(max(1, fd_size(kind)))
                self.mems[fd] = fd_size(kind)
            elif kind.startswith("rofd:"):
                rw = _memfd(max(1, fd_size(kind)))
                fd = os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC)
                os.close(rw)
            elif kind == "socket":
                a, b = socket.socketpair()
                keep.append(b.detach())
                fd = a.detach()
            else:
                r, w = os.pipe()
                keep.append(r)
                fd = w
            keep.append(fd)
            out.append(fd)
        return out

    def _send(self, action: Action) -> None:
        b = self.backend
        m = self.machine
        assert b is not None and m is not None
        session = b.session
        channel = session.channel if session is not None else None
        if channel is None and action.state == State.AFTER_RECONNECT:
            channel = self.kept_channel
        if channel is None or self.channel_broken:
            return  # no (usable) back-end channel in this case: the pair is not exercised
        self.where = f"{action.name}@{action.state}"
        self.result.pairs.append((action.state, action.name))
        header, body = encode_action(action)
        sent = Sent(action.state, action.name)
        self.result.sent.append(sent)
        keep: list[int] = []
        try:
            fds = self._fds(action.fds, keep)
            before = qemu_fds(m.pid) if fds else -1
            try:
                channel.settimeout(STEP_TIMEOUT)
                channel.send(header, body, fds, allow_size_mismatch=True)
                if not header.flags & FLAG_NEED_REPLY:
                    sent.reply = "none"
                    self.model.uncertain = True  # QEMU may have mapped it: we cannot tell
                    self._alive_or_raise(f"after {action.name}")
                    return
                with channel.recv() as reply:
                    sent.reply = "ok"
                    if reply.header.request != header.request or len(reply.body) != 8:
                        sent.reply = "malformed"
                    else:
                        sent.verdict = int.from_bytes(reply.body, "little")
            except (TimeoutError, WaitTimeout):
                sent.reply = "timeout"
                self.channel_broken = True  # a late reply would answer the next request
                self._alive_or_raise(f"after {action.name} went unanswered")
                self._observe(
                    "no-reply",
                    f"{action.name} with NEED_REPLY not answered",
                    action.state,
                    action.name,
                )
                return
            except (OSError, PeerClosed, ProtocolError) as exc:
                sent.reply = "closed"
                self.channel_broken = True
                # A kept channel closed by QEMU at the hang-up is the expected end of it:
                # a short look for a death (the QMP ping below catches a later one).
                grace = 0.2 if channel is self.kept_channel else 1.0
                if m.wait_exited(grace) is not None:
                    raise self._dead() from None
                self._alive_or_raise(f"after {action.name} closed the channel ({exc})")
                return
            if m.wait_exited(0.0) is not None:
                raise self._dead()
            self._judge(action, sent, header, body, fds, before)
        finally:
            for fd in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.mems.clear()

    def _judge(
        self,
        action: Action,
        sent: Sent,
        header: Header,
        body: bytes,
        fds: list[int],
        before: int,
    ) -> None:
        """The oracles on one answered request."""
        m = self.machine
        assert m is not None
        if sent.verdict is None:
            return
        if sent.verdict != 0 and fds and before >= 0:
            after = qemu_fds(m.pid)
            if after > before:
                time.sleep(0.05)  # QEMU closes a refused message's fds in the same handler
                after = qemu_fds(m.pid)
            if after > before:
                self._observe(
                    "leak",
                    f"{action.name} refused (u64 {sent.verdict}) but QEMU kept "
                    f"{after - before} of its {len(fds)} fd(s)",
                    action.state,
                    action.name,
                )
        if action.request not in (BackendRequest.SHMEM_MAP, BackendRequest.SHMEM_UNMAP):
            return
        if State(action.state) is not State.AFTER_DRIVER_OK:
            return
        problems = self.model.problems(action, header, body)
        if sent.verdict == 0 and problems:
            self._observe("accepted", problems[0], action.state, action.name)
        elif sent.verdict != 0 and not problems and self.model.judgeable(action):
            self._observe(
                "refused",
                f"valid {action.name} refused (u64 {sent.verdict})",
                action.state,
                action.name,
            )
        if sent.verdict == 0:
            self.model.apply(action)
            if action.touch and action.request == BackendRequest.SHMEM_MAP:
                self._touch(action, fds)

    def _touch(self, action: Action, fds: list[int]) -> None:
        """Write through an accepted mapping over qtest; read-only must keep it out."""
        m = self.machine
        if m is None or m.qtest is None or self.pci is None or 4 not in self.pci.bars:
            return
        if not fds or fds[0] not in self.mems or self.model.offset_of(action) is None:
            return
        f = action.fields
        length = f.get("length", 0)
        fd_offset = f.get("fd_offset", 0)
        if length < 8 or fd_offset + 8 > self.mems[fds[0]]:
            return
        offset = self.model.offset_of(action)
        assert offset is not None
        addr = self.pci.bars[4] + offset + f.get("shm_offset", 0)
        pattern = b"FUZZ\xa5\x5a\xc3\x3c"
        self.where = f"touch:{action.name}@{action.state}"
        try:
            m.qtest.write(addr, pattern)
        except (QemuExited, PeerClosed):
            raise self._dead() from None
        except (WaitTimeout, TestbedError):
            if m.wait_exited(0.5) is not None:
                raise self._dead() from None
            raise _Hung("qtest write through a mapping got no answer") from None
        data = os.pread(fds[0], 8, fd_offset)
        writable = bool(f.get("flags", 0) & 1)
        if not writable and data == pattern:
            self._observe(
                "readonly",
                "write through a read-only mapping reached the memfd",
                action.state,
                action.name,
            )
        elif writable and data != pattern:
            self._observe(
                "lost-write",
                "write through a read-write mapping did not reach the memfd",
                action.state,
                action.name,
            )

    def _collect_violations(self) -> None:
        bent = {m.request for m in self.case.replies}
        if bent & {Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES}:
            return  # QEMU acts on the values we bent: not a rule it broke
        for b in [*self.old_backends, self.backend]:
            if b is None:
                continue
            for v in b.violations:
                self._observe("violation", f"QEMU sent {v.request}: {v.rule}", REALIZE, v.request)


def play(case: Case, qemu: Path) -> PlayResult:
    """Play ``case`` against the QEMU binary ``qemu``; nothing is left running."""
    started = time.monotonic()
    workdir = make_private_dir("fuzz")
    player = Player(case, qemu, workdir)
    try:
        try:
            player.run()
        except (TestbedError, OSError) as exc:  # ours, not QEMU's: keep the campaign going
            m = player.machine
            code = m.wait_exited(0.5) if m is not None else None
            if code is not None:
                player._record_death(code)
                player.result.stderr = m.stderr_text()[-4000:] if m is not None else ""
            else:
                player.result.error = f"{type(exc).__name__}: {exc}"
        finally:
            player.close()
    finally:
        remove_tree(workdir)
    player.result.seconds = time.monotonic() - started
    return player.result
