"""The state driver: walks one guest-less QEMU and our (bent) back-end through the
front-end's life -- realize, DRIVER_OK, a device reset, system_reset, device_del and the
eject, a hang-up and a new connection -- and keeps track of where the case is, so that a
death or a hang is recorded with its place. testbed.fuzz.player sends the case's requests
in each state and judges the answers.

Each step ends one of three ways besides success: ``Died`` (QEMU exited; the exit, the
place and, for a segfault, the kernel's crash site are in the result), ``Hung`` (QEMU
stopped answering) or ``Unreached`` (a state could not be entered and QEMU lives on).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from testbed.bugs.signature import SILENT_EXITS, exit_of
from testbed.device import VhostUserDevice
from testbed.errors import QemuExited, TestbedError, WaitTimeout
from testbed.fuzz.backend import FuzzBackend
from testbed.fuzz.grammar import (
    REALIZE,
    Case,
    ReplyMutation,
    State,
    coverage_key,
    frontend_name,
)
from testbed.fuzz.result import PlayResult
from testbed.machine import QtestConfig, QtestMachine
from testbed.machine.cmdline import behind_root_port_options, root_port_id
from testbed.machine.qtest import PciFunctionDriver, QtestClient, acpi_eject, open_root_port
from testbed.vhost_user.connection import Connection
from testbed.virtio import DEVICE_STATUS
from testbed.waiting import wait_steps

STEP_TIMEOUT = 3.0
"""Deadline of every wait inside a case: a channel reply, QMP, a state transition."""
START_TIMEOUT = 10.0
DRIVER_OK_TIMEOUT = 1.0
BACKEND_SLICE = 0.05
"""A back-end wait is taken in slices this long, so that QEMU dying ends it at once."""
VHOST_USER_CHARDEV = "vu0"
"""The chardev of the device every case plugs (its id is vu0-dev)."""


class Died(Exception):
    """QEMU exited (recorded in the result)."""


class Hung(Exception):
    """QEMU stopped answering (QMP, qtest) within the deadline."""


class Unreached(Exception):
    """A state could not be entered; QEMU still runs."""


class StateDriver:
    """One guest-less QEMU and the back-ends that served it, for one case. ``close()``
    leaves nothing running."""

    def __init__(
        self, case: Case, qemu: Path, workdir: Path, result: PlayResult, *, debug: bool = False
    ) -> None:
        self.case = case
        self.debug = debug
        """Attach a debugger to QEMU once it is up: a silent crash gets its site from it
        (testbed.host.debugger) instead of the kernel's log."""
        self.qemu_path = qemu
        self.workdir = workdir
        self.result = result
        self.machine: QtestMachine | None = None
        self.backend: FuzzBackend | None = None
        self.old_backends: list[FuzzBackend] = []
        """The back-ends hung up by a reconnect (closed, kept for their records)."""
        self.pci: PciFunctionDriver | None = None
        self.kept_channel: Connection | None = None
        """The first connection's back-end channel, kept over a reconnect."""
        self.channel_broken = False
        """The back-end channel is no longer usable (closed, or a reply is overdue)."""
        self.where = f"{REALIZE}:start"
        """Where the case is: "<REQUEST>@<state>", "enter:<state>", "realize:<REQUEST>"..."""

    @property
    def socket(self) -> Path:
        return self.workdir / "vu.sock"

    @property
    def backends(self) -> list[FuzzBackend]:
        """Every back-end that served this case, the first one first."""
        return [*self.old_backends, *([self.backend] if self.backend is not None else [])]

    def qemu(self) -> QtestMachine:
        assert self.machine is not None
        return self.machine

    def qtest(self) -> QtestClient:
        qtest = self.qemu().qtest
        assert qtest is not None
        return qtest

    def channel(self, state: str) -> Connection | None:
        """The back-end channel to send on in ``state`` (None: none usable): the current
        connection's, else in after-reconnect the one kept from before the hang-up."""
        session = self.backend.session if self.backend is not None else None
        channel = session.channel if session is not None else None
        if channel is None and state == State.AFTER_RECONNECT:
            channel = self.kept_channel
        return None if self.channel_broken else channel

    def close(self) -> None:
        try:
            if self.machine is not None:
                self.machine.close()
        finally:
            for b in self.backends:
                b.close()
            if self.kept_channel is not None:
                self.kept_channel.close()

    # -- QEMU alive, dead or hung ------------------------------------------------------------

    def record_death(self, code: int) -> None:
        self.result.returncode = code
        self.result.died_in = self.result.died_in or self.where
        if exit_of(code) in SILENT_EXITS and self.machine is not None:
            self.result.segfault = self.machine.silent_site()

    def dead(self) -> Died:
        """Died, with QEMU's exit recorded once it comes (within 2 s): raise it."""
        m = self.qemu()
        code = m.wait_exited(2.0)
        if code is not None:
            self.record_death(code)
        return Died()  # without an exit: the caller decides, QEMU is not dead

    def alive_or_raise(self, doing: str) -> None:
        """QEMU still answers QMP within the deadline, else Died / Hung."""
        m = self.qemu()
        if m.returncode is not None or m.wait_exited(0.0) is not None:
            raise self.dead()
        self.ping(doing)

    def ping(self, doing: str) -> None:
        m = self.qemu()
        try:
            m.qmp("query-status", timeout=STEP_TIMEOUT)
        except QemuExited:
            raise self.dead() from None
        except (WaitTimeout, TestbedError):
            if m.wait_exited(0.5) is not None:
                raise self.dead() from None
            raise Hung(f"QMP silent for {STEP_TIMEOUT:.0f}s {doing} ({self.where})") from None

    def died_or(self, failure: Exception, grace: float) -> Exception:
        """What a failed step means: Died if QEMU exits within ``grace`` s, else
        ``failure``."""
        if self.qemu().wait_exited(grace) is not None:
            return self.dead()
        return failure

    # -- the steps --------------------------------------------------------------------------

    def new_backend(self, mutations: tuple[ReplyMutation, ...]) -> FuzzBackend:
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

    def realize(self) -> None:
        """Our back-end with the case's reply mutations, then QEMU with the device (cold-
        plugged, behind a root port for the device_del path): the handshake happens here."""
        case = self.case
        self.new_backend(case.replies)
        for m in case.replies:
            self.result.pairs.append(
                coverage_key(REALIZE, f"reply:{frontend_name(m.request)}:{m.kind}")
            )
        device = VhostUserDevice(
            VHOST_USER_CHARDEV,
            self.socket,
            bus=root_port_id(0) if case.behind_root_port else None,
            addr=0 if case.behind_root_port else None,
            allow_overfull=True,
            device_type=case.device,
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
        self.machine = QtestMachine(
            config, logdir=self.workdir / "qemu", qmp_timeout=STEP_TIMEOUT, crash_sites=self.debug
        )
        try:
            self.machine.start(timeout=START_TIMEOUT)
        except QemuExited as exc:
            self.where = f"{REALIZE}:{self._last_request()}"
            if exc.returncode is not None:
                self.record_death(exc.returncode)
            raise Died() from None
        except (WaitTimeout, TestbedError) as exc:
            self.where = f"{REALIZE}:{self._last_request()}"
            qm = self.machine
            if qm.pid is not None and qm.wait_exited(0.5) is None and qm.returncode is None:
                raise Hung(f"realize did not finish within {START_TIMEOUT:.0f}s: {exc}") from None
            raise Died() from None
        self.where = "realized"

    def _last_request(self) -> str:
        seen = self.backend.requests_seen if self.backend else []
        return seen[-1].name if seen else "connect"

    def enter(self, state: State) -> None:
        """Bring the device into ``state`` (the next on the case's path)."""
        m = self.qemu()
        b = self.backend
        assert b is not None
        self.where = f"enter:{state.value}"
        try:
            if state is State.AFTER_DRIVER_OK:
                self.start_device(b)
            elif state is State.DEVICE_RESET:
                self.reset_device()
            elif state is State.AFTER_SYSTEM_RESET:
                m.qmp("system_reset")
                m.wait_event("RESET", STEP_TIMEOUT)
            elif state is State.DURING_DEVICE_DEL:
                m.qmp("device_del", {"id": "vu0-dev"})
            elif state is State.AFTER_RECONNECT:
                self._reconnect(b)
        except QemuExited:
            raise self.dead() from None
        except (WaitTimeout, TestbedError, OSError) as exc:
            raise self.died_or(Unreached(f"{state.value} not reached: {exc}"), 0.3) from None
        self.where = state.value

    def leave(self, state: State) -> None:
        """What ends ``state`` before the next: during-device-del ends in the eject a
        q35 guest's ACPI would write, and DEVICE_DELETED."""
        m = self.qemu()
        if state is not State.DURING_DEVICE_DEL:
            return
        self.where = "eject"
        try:
            acpi_eject(self.qtest())
            m.wait_event("DEVICE_DELETED", STEP_TIMEOUT)
        except QemuExited:
            raise self.dead() from None
        except (WaitTimeout, TestbedError, OSError) as exc:
            raise self.died_or(Unreached(f"eject: {exc}"), 0.3) from None
        self.where = "ejected"

    def start_device(self, b: FuzzBackend, *, new_driver: bool = True) -> None:
        """DRIVER_OK over qtest (with a new PCI driver, or the one the device had), then
        the back-end sees the device start."""
        if new_driver or self.pci is None:
            self.pci = self._driver()
        self.pci.start_device()
        # QEMU starts the vhost device inside the qtest write of DRIVER_OK: what is left
        # to arrive comes at once, or never (a start that failed).
        self._wait_backend(lambda t: b.wait_driver_ok(t), DRIVER_OK_TIMEOUT, "DRIVER_OK")

    def reset_device(self) -> None:
        """device_status 0, as a guest's driver resets the device."""
        assert self.pci is not None
        self.qtest().write_int(self.pci.common_address(DEVICE_STATUS), 8, 0)

    def _driver(self) -> PciFunctionDriver:
        if not self.case.behind_root_port:
            return PciFunctionDriver(self.qtest(), self.case.arch)
        return open_root_port(self.qtest(), self.case.arch)

    def _reconnect(self, b: FuzzBackend) -> None:
        """Hang up the front-end socket and connect a new back-end (Case.reconnect).

        "reset": hang up under the started device (QEMU 11.1.3 survives that), reset the
        device (status 0) while no back-end is connected, connect again; the device stays
        stopped. "restart": the same, then DRIVER_OK again over the new connection.
        "stopped": hang up before DRIVER_OK, connect, then DRIVER_OK. "live": connect
        again under the started device. The old back-end channel is kept open (only the
        front-end socket is hung up): requests in after-reconnect go over the new
        connection's channel, or over the old one when QEMU set none up."""
        mode = self.case.reconnect
        self.where = "enter:after-reconnect"
        session = b.session
        if session is not None and session.channel is not None and not self.channel_broken:
            self.kept_channel, session.channel = session.channel, None
        self.old_backends.append(b)
        b.close()
        # QEMU takes the hang-up in from its main loop. A reset written before then stops
        # the device first, and the hang-up then meets a stopped device: QEMU aborts
        # (backend-hangup-del-eventfd-abort) by timing alone, which made a case's outcome
        # depend on the host's load. The reconnect modes' order is kept by waiting.
        self.qemu().wait_chardev(VHOST_USER_CHARDEV, connected=False, timeout=STEP_TIMEOUT)
        if mode in ("reset", "restart") and self.pci is not None:
            self.where = "enter:after-reconnect:reset"
            self.reset_device()
            self.where = "enter:after-reconnect"
        nb = self.new_backend(())
        self._wait_backend(lambda t: nb.wait_connected(t), STEP_TIMEOUT, "the new connection")
        self.ping("after the reconnect")
        if mode in ("reset", "live"):
            return
        self.where = "enter:after-reconnect:driver-ok"
        self.start_device(nb, new_driver=False)

    def _wait_backend(self, wait: Callable[[float], None], timeout: float, what: str) -> None:
        """``wait`` (a back-end wait taking a timeout) in short slices, so that QEMU dying
        meanwhile ends it at once: Died, or WaitTimeout (``what``) at the deadline."""
        m = self.qemu()

        def step(remaining: float) -> bool | None:
            try:
                wait(min(BACKEND_SLICE, remaining))
                return True
            except WaitTimeout:
                if m.wait_exited(0.0) is not None:
                    raise self.dead() from None
                return None

        wait_steps(step, timeout, f"{what} at the back-end", seen=self._last_request)
