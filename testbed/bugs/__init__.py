"""The registry of known QEMU bugs (registry.toml) and how a failure is matched to one.

Pure: no QEMU, no I/O beyond reading the data file. A scenario names the bug it shows by
id; the pytest plugin turns its failure into an expected failure only when the bug's
signature is in the evidence (QEMU's stderr, its exit, the error text), and only on a QEMU
version the registry lists. The evidence and its words (exits, crash sites) are
testbed.bugs.signature's: Evidence, KnownBugSeen and exit_of are re-exported here.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from testbed.bugs.signature import Evidence, KnownBugSeen, exit_of
from testbed.errors import ConfigError

__all__ = [
    "Bug",
    "Evidence",
    "KnownBugSeen",
    "exit_of",
    "lookup",
    "registry",
    "select",
]

REGISTRY = Path(__file__).with_name("registry.toml")
_EXITS = re.compile(r"^(any|status:\d+|signal:SIG[A-Z0-9]+)$")


@dataclass(frozen=True)
class Bug:
    """One known QEMU bug (see registry.toml for the meaning of each field)."""

    id: str
    title: str
    component: str
    function: str
    versions: tuple[str, ...]
    arches: tuple[str, ...]
    scenarios: tuple[str, ...]
    root_cause: str
    report: str
    needs_guest: bool
    exit: str = "any"
    stderr: str = ""
    observable: str = ""
    source: tuple[str, ...] = field(default_factory=tuple)
    fuzz_where: tuple[str, ...] = ()
    """Where in a fuzz case ("<REQUEST>@<state>") this bug's trigger is: for a signature
    others share (a segfault prints nothing), the fuzzer's finding elsewhere is not it."""
    spec: str = ""
    """The vhost-user spec's words QEMU breaks (the report quotes them)."""
    evidence: str = ""
    """What the bug showed when it was recorded (stderr lines, a check's words): the
    registry's own test matches every entry's signature against every other's."""
    evidence_exit: str = "running"
    """How QEMU ended then ("running" when it did not)."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", self.id):
            raise ConfigError(f"bug id {self.id!r}: use a lower-case slug")
        if not self.stderr and not self.observable and not self.exit.startswith("signal:"):
            raise ConfigError(
                f"bug {self.id}: give a stderr pattern, an observable, or (for a crash that "
                "prints nothing, such as a segfault) a signal as the exit"
            )
        if not _EXITS.match(self.exit):
            raise ConfigError(f"bug {self.id}: exit {self.exit!r}: any, status:N or signal:SIGX")
        if self.evidence_exit != "running" and not _EXITS.match(self.evidence_exit):
            raise ConfigError(f"bug {self.id}: evidence_exit {self.evidence_exit!r}")

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.stderr or self.observable)

    def applies(self, version: str) -> bool:
        """The registry says this QEMU version has the bug."""
        return version in self.versions

    def matches(self, evidence: Evidence) -> bool:
        """The evidence shows this bug: its pattern and, if one is given, its exit (and, for
        a fuzz finding, its place when ``fuzz_where`` names some). A silent misbehaviour has
        no message of QEMU's to match: the scenario must name the bug."""
        if self.observable and evidence.bug != self.id:
            return False
        if evidence.bug is not None and evidence.bug != self.id:
            return False
        placed = self.fuzz_where and evidence.where is not None
        if placed and evidence.where not in self.fuzz_where:
            return False
        if not self.pattern.search(evidence.text):
            return False
        return self.exit == "any" or evidence.exit == self.exit

    def seen(self, evidence: Evidence) -> str:
        """The evidence's line that shows this bug (for reports), with the exit."""
        lines = [ln.strip() for ln in evidence.text.splitlines() if ln.strip()]
        hit = next((ln for ln in lines if self.pattern.search(ln)), None)
        return f"{hit} [{evidence.exit}]" if hit and self.pattern.pattern else evidence.headline()

    def signature(self) -> str:
        what = self.stderr or (f"observable: {self.observable}" if self.observable else "")
        return f"{what} [{self.exit}]".strip()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _load(path: Path) -> dict[str, Bug]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"bug registry {path}: {exc}") from exc
    bugs: dict[str, Bug] = {}
    for raw in data.get("bug", []):
        entry: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        try:
            bug = Bug(**entry)
        except TypeError as exc:
            raise ConfigError(f"bug registry {path}: entry {raw.get('id')!r}: {exc}") from exc
        if bug.id in bugs:
            raise ConfigError(f"bug registry {path}: id {bug.id} given twice")
        bugs[bug.id] = bug
    return bugs


@cache
def registry() -> dict[str, Bug]:
    """The registry, by id (read once)."""
    return _load(REGISTRY)


def lookup(bug_id: str) -> Bug:
    try:
        return registry()[bug_id]
    except KeyError:
        known = ", ".join(sorted(registry()))
        raise ConfigError(f"unknown bug id {bug_id!r}; the registry has: {known}") from None


def select(ids: Iterable[str]) -> list[Bug]:
    """The named bugs (all of them when ``ids`` is empty), in registry order."""
    wanted = list(ids)
    return [lookup(i) for i in wanted] if wanted else list(registry().values())
