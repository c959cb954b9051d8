"""The back-end's fds and files over one case (testbed.fuzz.player delegates here): the
fds a request carries, made for real (testbed.fuzz.files); what the guest sees at the
request's range before it is answered; and, after the reply, what the back-end does to its
file and what the guest does through BAR 4 while the mapping is live (Action.after), each
followed by the oracles on the file and on QEMU (testbed.fuzz.oracle):

- QEMU never changes the back-end's file (size or bytes) but by a guest write through a
  writable mapping -- checked after the reply, after every op and at the end of the case;
- a guest write through a read-only mapping stays out of the file, one through a writable
  mapping lands in it; a guest read of a live mapping shows the file's bytes;
- a refused request changes nothing the guest sees at its range.

QEMU dying meanwhile (a SIGBUS on a truncated file) is the state driver's Died, with the
op as the place ("read:SHMEM_MAP@after-driver-ok").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from testbed.device import base_device
from testbed.errors import PeerClosed, QemuExited, TestbedError, WaitTimeout
from testbed.fuzz.fdspec import FileOp, Op
from testbed.fuzz.files import PATTERN, OpenFd, open_fds
from testbed.fuzz.grammar import Action
from testbed.fuzz.oracle import FileImage, Judged, MapModel, file_change, guest_view_change
from testbed.fuzz.states import Hung, StateDriver
from testbed.vhost_user.protocol import BackendRequest
from testbed.vhost_user.rules import SPEC

Observe = Callable[[str, Judged, Action], None]
WIDTH = len(PATTERN)


@dataclass
class Tracked:
    """One file QEMU was handed, and what the oracle expects it to hold."""

    fd: OpenFd
    expected: FileImage


class FilePlay:
    def __init__(self, states: StateDriver, model: MapModel, observe: Observe) -> None:
        self.states = states
        self.model = model
        self.observe = observe
        self.kept: list[tuple[Tracked, Action]] = []
        """Files of accepted maps, checked again at the end of the case."""

    def open(self, action: Action) -> list[OpenFd]:
        return open_fds(action.fds, self.states.workdir)

    def view(self, action: Action) -> bytes | None:
        """What the guest sees at the start of a SHMEM_MAP/UNMAP's range now (None: the
        device is not started, or the range is not inside a region)."""
        if action.request not in (BackendRequest.SHMEM_MAP, BackendRequest.SHMEM_UNMAP):
            return None
        return self._guest(action, Op(FileOp.READ), "view")

    def after_reply(
        self,
        action: Action,
        verdict: int | None,
        opened: list[OpenFd],
        expected: FileImage | None,
        before: bytes | None,
    ) -> None:
        """The oracles once QEMU answered, then the case's ops on the file and through the
        mapping. Files of an accepted map are kept (``kept``), the others closed by the
        caller."""
        tracked = None
        if opened and expected is not None:
            tracked = Tracked(opened[0], expected)
            self._check(tracked, action)
        if verdict and before is not None:
            after = self.view(action)
            if after is not None:
                changed = guest_view_change(before, after, action, verdict)
                if changed is not None:
                    self.observe("refused-view", changed, action)
        accepted = verdict == 0 and action.request == BackendRequest.SHMEM_MAP
        if accepted and tracked is not None:
            self.kept.append((tracked, action))  # live from now on: the guest may reach it
            opened.remove(tracked.fd)
        ops = [Op.parse(text) for text in action.after]
        if action.touch:
            ops.append(Op(FileOp.GUEST_WRITE))
        for op in ops:
            if op.by_guest:
                self._guest_op(action, op)
            elif opened or tracked is not None:
                self._host_op(tracked.fd if tracked is not None else opened[0], op, tracked)
            for other, mapped in self.kept:
                self._check(other, mapped)
            if tracked is not None and not accepted:
                self._check(tracked, action)

    def finish(self) -> None:
        """The end of the case: the files of accepted maps, checked once more."""
        for tracked, action in self.kept:
            self._check(tracked, action)

    def close(self) -> None:
        for tracked, _ in self.kept:
            tracked.fd.close()
        self.kept.clear()

    # -- the ops ---------------------------------------------------------------------------

    def _host_op(self, fd: OpenFd, op: Op, tracked: Tracked | None) -> None:
        """The back-end's own act on its file: what it leaves is what the oracle expects."""
        fd.apply(op)
        if tracked is not None:
            image = fd.image()
            if image is not None:
                tracked.expected = image

    def _live(self) -> list[tuple[int, Tracked, Action]]:
        """The kept files still mapped (the model's live mappings), each with where its
        range starts in BAR 4."""
        out = []
        for tracked, action in self.kept:
            f = action.fields
            span = (f.get("shm_offset", 0), f.get("length", 0))
            start = self.model.guest_address(action, 0, 0)
            if start is not None and span in self.model.mapped.get(f.get("shmid", 0), []):
                out.append((start, tracked, action))
        return out

    def _guest_op(self, action: Action, op: Op) -> None:
        """A guest access at ``op.arg(0)`` into the action's range, judged against every
        live mapping it lands in (a write through another request's range lands in that
        mapping's file). Skipped where the oracle cannot say what it should do: the mappings
        are not known (a request without a reply), or the 8 bytes straddle a mapping's
        edge (an unaligned map: shmem-map-unaligned-accepted)."""
        at = self.model.guest_address(action, op.arg(0), WIDTH)
        if at is None or self.model.uncertain:
            return
        live = self._live()
        hits = [(s, t, a) for s, t, a in live if s <= at and at + WIDTH <= s + _length(a)]
        edges = [1 for s, _, a in live if s < at + WIDTH and at < s + _length(a)]
        if len(edges) != len(hits) or len(hits) > 1:
            return
        got = self._guest(action, op, str(op.op))
        if got is None or not hits:
            return
        start, tracked, mapped = hits[0]
        file_at = mapped.fields.get("fd_offset", 0) + at - start
        if file_at + WIDTH > tracked.expected.size:
            return  # past the file's end: nothing there to compare (QEMU lived)
        now = tracked.fd.read(file_at, WIDTH)
        writable = bool(mapped.fields.get("flags", 0) & 1)
        if op.op is FileOp.READ:
            if got != now:
                text = (
                    f"the guest reads other bytes than the file holds through a live {mapped.name}"
                )
                self.observe("view", Judged(text), mapped)
        elif not writable and now == PATTERN:
            text = "write through a read-only mapping reached the memfd"
            self.observe("readonly", Judged(text, SPEC["flags"]), mapped)
            image = tracked.fd.image()
            tracked.expected = image if image is not None else tracked.expected
        elif writable and now != PATTERN:
            text = "write through a read-write mapping did not reach the memfd"
            self.observe("lost-write", Judged(text, SPEC["flags"]), mapped)
        elif writable:
            tracked.expected = tracked.expected.written(file_at, PATTERN)

    def _guest(self, action: Action, op: Op, doing: str) -> bytes | None:
        """A guest access over qtest at ``op.arg(0)`` into the action's range (a read
        returns the bytes, a write PATTERN's bytes); None when there is nothing to access."""
        states = self.states
        m, pci = states.machine, states.pci
        if m is None or m.qtest is None or pci is None or 4 not in pci.bars:
            return None
        model = self.model
        if not model.started or not base_device(model.device).shmem_bar:
            return None  # stopped, or a device whose regions the guest cannot reach
        if not (model.sound and model.negotiated and model.trusted):
            # No BAR 4 of known regions: an address outside any is no guest's access (qtest
            # itself asserts on a read it cannot make: not QEMU's device model at fault).
            return None
        offset = self.model.guest_address(action, op.arg(0), WIDTH)
        if offset is None:
            return None
        where, states.where = states.where, f"{doing}:{action.name}@{action.state}"
        try:
            if op.op is FileOp.GUEST_WRITE:
                m.qtest.write(pci.bars[4] + offset, PATTERN)
                got = PATTERN
            else:
                got = m.qtest.read(pci.bars[4] + offset, WIDTH)
        except (QemuExited, PeerClosed):
            raise states.dead() from None
        except (WaitTimeout, TestbedError):
            raise states.died_or(Hung(f"qtest {doing} through BAR 4 got no answer"), 0.5) from None
        states.where = where
        return got

    def _check(self, tracked: Tracked, action: Action) -> None:
        image = tracked.fd.image()
        if image is None:
            return
        changed = file_change(tracked.expected, image, tracked.fd.spec)
        if changed is not None:
            self.observe("file", changed, action)
            tracked.expected = image  # reported once


def _length(action: Action) -> int:
    return action.fields.get("length", 0)
