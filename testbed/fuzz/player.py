"""Plays one case against a guest-less QEMU: our back-end with the case's offer, config and
reply mutations (testbed.fuzz.backend); QEMU under qtest (we are the guest's PCI core and
virtio driver) walked along the case's path by the state driver (testbed.fuzz.states); the
back-end channel requests sent in their states, and the oracles on what QEMU did.

What it returns is raw (pure data, testbed.fuzz.result): how QEMU ended, where it was, what
each request got, and the oracles' observations. testbed.fuzz.triage turns that into
signatures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path

from testbed.device import base_device
from testbed.errors import PeerClosed, ProtocolError, QemuExited, WaitTimeout
from testbed.fuzz.fileplay import FilePlay
from testbed.fuzz.files import MEMFD_NAME, OpenFd
from testbed.fuzz.grammar import (
    REALIZE,
    Action,
    BodyKind,
    Case,
    ReplyKind,
    State,
    coverage_key,
    frontend_name,
)
from testbed.fuzz.grammar import encode as encode_action
from testbed.fuzz.oracle import Judged, MapModel, refusal
from testbed.fuzz.result import Observation, PlayResult, Sent
from testbed.fuzz.states import STEP_TIMEOUT, Died, Hung, StateDriver, Unreached
from testbed.machine.probe import pci_bar
from testbed.paths import TMP_PREFIX, make_private_dir, remove_tree
from testbed.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    SHMEM_CONFIG_SIZE,
    BackendRequest,
    Header,
    Request,
)
from testbed.vhost_user.rules import SPEC
from testbed.waiting import wait_until

log = logging.getLogger(__name__)

FD_SETTLE = 0.3
"""How long QEMU's fd count may take to come down after the case (a close in flight)."""
FD_SETTLE_POLL = 0.02
REFUSED_FDS_CLOSE = 0.05
"""QEMU closes a refused message's fds in the same handler: at most this late."""


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
    if target.startswith(f"/memfd:{MEMFD_NAME}"):
        return "the back-end's memfd"
    if re.fullmatch(rf".*/{TMP_PREFIX}fuzz-[^/]+/file[^/]*", target.removesuffix(" (deleted)")):
        return "the back-end's file"  # testbed.fuzz.files puts them in the case's dir
    found = re.fullmatch(r"anon_inode:\[?([\w-]+)\]?", target)
    if found:
        return found[1]
    found = re.fullmatch(r"(\w+):\[\d+\]", target)  # socket:[123], pipe:[456]
    if found:
        return found[1]
    return re.sub(r"\d+", "N", target.removesuffix(" (deleted)"))


class Player:
    """One case against one QEMU. Use play(); nothing is left running on any path."""

    def __init__(self, case: Case, qemu: Path, workdir: Path, *, debug: bool = False) -> None:
        self.case = case
        self.result = PlayResult(case)
        self.states = StateDriver(case, qemu, workdir, self.result, debug=debug)
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
            device=case.device,
        )
        self.links_before: dict[str, str] = {}
        self.dirty: set[int] = set()
        """Channels (by id) that were sent a malformed request or lost at a hang-up."""
        self.files = FilePlay(self.states, self.model, self._observed)

    def close(self) -> None:
        try:
            self.states.close()
        finally:
            self.files.close()

    # -- the steps --------------------------------------------------------------------------

    def run(self) -> None:
        states = self.states
        try:
            states.realize()
            self._check_config()
            self.links_before = qemu_fd_links(states.qemu().pid)
            self.result.fds_before = len(self.links_before) if self.links_before else -1
            for state in self.case.path:
                states.enter(state)
                self._entered(state)
                self.result.reached.append(state.value)
                for action in self.case.actions:
                    if action.state == state.value:
                        self._send(action)
                states.leave(state)
            states.ping("the end of the case")
            self.files.finish()
            self._count_fds()
            self._collect_violations()
        except Died:
            pass
        except Hung as exc:
            self.result.hung = str(exc)
        except Unreached as exc:
            log.debug("case %d: %s", self.case.index, exc)
            with contextlib.suppress(Died, Hung):
                states.ping(f"after {exc}")
        finally:
            self.record_end()

    def record_end(self) -> None:
        """How QEMU ended, if it did, and its stderr's tail."""
        m = self.states.machine
        if m is not None and self.result.returncode is None:
            code = m.wait_exited(0.0) if m.returncode is None else m.returncode
            if code is not None:
                self.states.record_death(code)
        if m is not None:
            self.result.stderr = m.stderr_text()[-4000:]

    def _entered(self, state: State) -> None:
        """What entering ``state`` did to the mappings (the oracle's model)."""
        if state is State.AFTER_DRIVER_OK:
            self.model.started = True
        elif state in (State.DEVICE_RESET, State.AFTER_SYSTEM_RESET):
            self.model.reset()
        elif state is State.AFTER_RECONNECT:
            self.model.reset()  # a new connection: nothing mapped that the model knows of
            self.model.started = self.case.reconnect in ("restart", "stopped")

    def _count_fds(self) -> None:
        """QEMU's fds at the end of the case, the device stopped as it was when counted
        before (a started device is reset first, as a guest would): what the case left
        behind. The count may lag a close by a moment: polled down to the count before,
        within a deadline; what stays above it is growth."""
        states = self.states
        m = states.qemu()
        started = self.result.reached and self.result.reached[-1] in (
            State.AFTER_DRIVER_OK,
            State.AFTER_RECONNECT,
        )
        if self.case.behind_root_port:
            return  # ejected: the device (and its chardev's fds) are gone, nothing to compare
        # A mapping QEMU took while the device was stopped (after a start that failed, QEMU
        # 11.1.3 takes them) is live and holds its fd: a reset drops it, as it drops those
        # of a started device, before the count.
        live = self.model.uncertain or any(self.model.mapped.values())
        if (started or live) and states.pci is not None:
            states.where = "settle:device-reset"
            try:
                if self.result.reached[-1:] == [State.AFTER_SYSTEM_RESET.value]:
                    states.pci.reprogram()  # the system reset cleared the BARs
                states.reset_device()
            except QemuExited:
                raise states.dead() from None
            states.ping("after the settling device reset")
            states.where = "settled"
        before = self.result.fds_before
        counted = [qemu_fds(m.pid)]

        def settled() -> bool:
            counted.append(qemu_fds(m.pid))
            return counted[-1] <= before

        if counted[0] > before:
            with contextlib.suppress(WaitTimeout):  # what stays above is the growth
                wait_until(settled, FD_SETTLE, "QEMU's fds settling", interval=FD_SETTLE_POLL)
        after = counted[-1]
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
        fired = [m for b in self.states.backends if b.fuzz for m in b.fuzz.fired]
        if fired:
            names = sorted({frontend_name(m.request) for m in fired})
            return "replies bent: " + ", ".join(names)
        sent = sorted({s.request for s in self.result.sent})
        return "sent: " + (", ".join(sent) if sent else "nothing")

    def _check_config(self) -> None:
        """Oracle: BAR 4 as query-pci shows it, against the config we served."""
        case = self.case
        if case.behind_root_port or not base_device(case.device).shmem_bar:
            return  # no BAR 4 of regions to compare (behind a port: not in query-pci's bus 0)
        bar = pci_bar(self.states.qemu().pci_device(), 4)
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
        # The mutations that bent a reply, not the ones the case lists: one that never fired
        # (a second mutation of the same reply, which the back-end keeps only one of) bent
        # nothing QEMU could have refused.
        fired = [m for b in self.states.backends if b.fuzz for m in b.fuzz.fired]
        for m in fired:
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

    def _observe(
        self, kind: str, text: str, state: str = REALIZE, request: str = "", spec: str = ""
    ) -> None:
        self.result.observations.append(Observation(kind, text, state, request, spec))

    def _observed(self, kind: str, judged: Judged, action: Action) -> None:
        self._observe(kind, judged.text, action.state, action.name, judged.spec)

    def _send(self, action: Action) -> None:
        states = self.states
        m = states.qemu()
        channel = states.channel(action.state)
        if channel is None:
            return  # no (usable) back-end channel in this case: the pair is not exercised
        states.where = f"{action.name}@{action.state}"
        self.result.pairs.append(coverage_key(action.state, action.name, action.fds))
        header, body = encode_action(action)
        sent = Sent(action.state, action.name)
        self.result.sent.append(sent)
        if not self._well_formed(action) or channel is states.kept_channel:
            # QEMU may close a channel on a malformed message (or at a hang-up), unseen
            # when no reply is asked: a later close on it is not this request's doing.
            self.dirty.add(id(channel))
        opened: list[OpenFd] = []
        try:
            opened = self.files.open(action)
            fds = [o.sent for o in opened]
            expected = opened[0].image() if opened else None
            view = self.files.view(action)
            states.where = f"{action.name}@{action.state}"
            before = qemu_fds(m.pid) if fds else -1
            try:
                channel.settimeout(STEP_TIMEOUT)
                channel.send(header, body, fds, allow_size_mismatch=True)
                if not header.flags & FLAG_NEED_REPLY:
                    sent.reply = "none"
                    self.model.uncertain = True  # QEMU may have mapped it: we cannot tell
                    states.alive_or_raise(f"after {action.name}")
                    return
                with channel.recv() as reply:
                    sent.reply = "ok"
                    if reply.header.request != header.request or len(reply.body) != 8:
                        sent.reply = "malformed"
                    else:
                        sent.verdict = int.from_bytes(reply.body, "little")
            except (TimeoutError, WaitTimeout):
                sent.reply = "timeout"
                states.channel_broken = True  # a late reply would answer the next request
                states.alive_or_raise(f"after {action.name} went unanswered")
                self._observe(
                    "no-reply",
                    f"{action.name} with NEED_REPLY not answered",
                    action.state,
                    action.name,
                    SPEC["reply"],
                )
                return
            except (OSError, PeerClosed, ProtocolError) as exc:
                sent.reply = "closed"
                states.channel_broken = True
                # A kept channel closed by QEMU at the hang-up is the expected end of it:
                # a short look for a death (the QMP ping below catches a later one).
                grace = 0.2 if channel is states.kept_channel else 1.0
                if m.wait_exited(grace) is not None:
                    raise states.dead() from None
                states.alive_or_raise(f"after {action.name} closed the channel ({exc})")
                if self._well_formed(action) and id(channel) not in self.dirty:
                    # A request the spec says is answered (zero or not) lost QEMU's
                    # channel for good: every later request of the back-end fails.
                    self._observe(
                        "channel-closed",
                        f"QEMU closed the back-end channel on {action.name} with "
                        f"{', '.join(sorted({o.spec.describe() for o in opened})) or 'no fd'}",
                        action.state,
                        action.name,
                        SPEC["reply"],
                    )
                return
            if m.wait_exited(0.0) is not None:
                raise states.dead()
            self._judge(action, sent, header, body, fds, before)
            self.files.after_reply(action, sent.verdict, opened, expected, view)
        finally:
            for o in opened:
                o.close()

    @staticmethod
    def _well_formed(action: Action) -> bool:
        """A SHMEM_MAP/UNMAP sent after DRIVER_OK whose header and payload are right, with
        NEED_REPLY: QEMU owes it an answer, whatever its fields and fds."""
        return (
            action.state == State.AFTER_DRIVER_OK
            and action.request in (BackendRequest.SHMEM_MAP, BackendRequest.SHMEM_UNMAP)
            and action.body == BodyKind.MMAP
            and action.flags == 0x9
            and not action.size_delta
        )

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
        pid = self.states.qemu().pid
        if sent.verdict is None:
            return
        if sent.verdict != 0 and fds and before >= 0:
            counted = [qemu_fds(pid)]

            def closed() -> bool:
                counted.append(qemu_fds(pid))
                return counted[-1] <= before

            if counted[0] > before:
                with contextlib.suppress(WaitTimeout):  # kept: the leak below
                    wait_until(closed, REFUSED_FDS_CLOSE, "QEMU closing a refused message's fds")
            after = counted[-1]
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
        # Judged after DRIVER_OK only; tracked wherever QEMU took it (the file oracles
        # must know what the guest reaches, during device_del or after a reconnect too).
        if State(action.state) is State.AFTER_DRIVER_OK:
            problems = self.model.problems(action, header, body)
            if sent.verdict == 0 and problems:
                self._observed("accepted", problems[0], action)
            elif sent.verdict != 0 and not problems and self.model.judgeable(action):
                self._observed("refused", refusal(action, sent.verdict), action)
        if sent.verdict == 0:
            self.model.apply(action)

    def _collect_violations(self) -> None:
        bent = {m.request for m in self.case.replies}
        if bent & {Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES}:
            return  # QEMU acts on the values we bent: not a rule it broke
        for b in self.states.backends:
            for v in b.violations:
                self._observe("violation", f"QEMU sent {v.request}: {v.rule}", REALIZE, v.request)


def play(case: Case, qemu: Path, *, debug: bool = False) -> PlayResult:
    """Play ``case`` against the QEMU binary ``qemu``; nothing is left running. ``debug``:
    under a debugger, so that a crash that prints nothing gets its site from it
    (testbed.host.debugger) rather than from the kernel's log."""
    started = time.monotonic()
    workdir = make_private_dir("fuzz")
    player = Player(case, qemu, workdir, debug=debug)
    try:
        try:
            player.run()
        # Ours, not QEMU's (a failure of the test bed, or a bug in it): recorded as the case's
        # error, counted in the campaign's summary, and the campaign goes on -- an hour's
        # run must not end on one case (an OverflowError from a generated size once did).
        except Exception as exc:
            m = player.states.machine
            code = m.wait_exited(0.5) if m is not None else None
            if code is not None:
                player.states.record_death(code)
                player.result.stderr = m.stderr_text()[-4000:] if m is not None else ""
            else:
                player.result.error = f"{type(exc).__name__}: {exc}"
        finally:
            player.close()
    finally:
        remove_tree(workdir)
    player.result.seconds = time.monotonic() - started
    return player.result
