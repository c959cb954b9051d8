"""What playing one case gives (pure data): how QEMU ended, where it was, what each back-end
request got, the states reached and the oracles' observations. testbed.fuzz.player fills
it in; testbed.fuzz.triage turns it into signatures."""

from __future__ import annotations

from dataclasses import dataclass, field

from testbed.fuzz.grammar import REALIZE, Case


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

    kind: str
    """"accepted", "refused", "bar4", "readonly", "lost-write", "view", "file",
    "refused-view", "channel-closed", "leak", "violation", "no-reply"."""
    text: str
    state: str = REALIZE
    request: str = ""
    spec: str = ""
    """The spec's words the oracle rests on (not part of the signature)."""


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
    pairs: list[tuple[str, str, str]] = field(default_factory=list)
    """(state, request, fd kind) exercised (reply mutations as ("realize", "reply:...",
    "-")): testbed.fuzz.grammar.coverage_key."""
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
