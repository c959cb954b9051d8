"""`testbed bugs check`: every known bug's guest-less reproducer against the QEMU at hand.

A bug the registry lists for this QEMU version must reproduce: one that stops reproducing
is a failure (fixed? then the registry needs updating). On a version the registry does not
list, the outcome is reported but decides nothing. The table and the verdict are pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.bugs import lookup, select
from testbed.bugs.recipes import RECIPES
from testbed.bugs.recipes_fuzz import RECIPE_ARCHES
from testbed.bugs.runner import DOES_NOT_APPLY, REPRODUCED, Outcome, run_recipe
from testbed.device import DEVICE_TYPE


@dataclass(frozen=True)
class Row:
    """One (bug, arch) checked against one QEMU."""

    outcome: Outcome
    qemu_version: str
    listed: bool
    """The registry lists this QEMU version for the bug."""
    device: str = DEVICE_TYPE
    """The QEMU device the reproducer plugged: the registry's claims are the test
    device's; on another one an outcome is reported (does the bug reach it?), not judged."""

    @property
    def judged(self) -> bool:
        return self.listed and self.device == DEVICE_TYPE

    @property
    def verdict(self) -> str:
        status = self.outcome.status
        if status == DOES_NOT_APPLY:
            return "does not apply"
        if status == REPRODUCED:
            return "reproduces"
        if self.device != DEVICE_TYPE:
            return "not seen here"
        return "FIXED?" if self.listed else "not seen"

    @property
    def failing(self) -> bool:
        """Only a listed version that no longer shows the bug on the test device fails."""
        return self.judged and self.outcome.status not in (REPRODUCED, DOES_NOT_APPLY)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.outcome.to_json(),
            "verdict": self.verdict,
            "qemu_version": self.qemu_version,
            "version_listed": self.listed,
            "device": self.device,
            "failing": self.failing,
        }


def exit_code(rows: Iterable[Row]) -> int:
    """0 if and only if every applicable bug reproduced on every listed QEMU version."""
    return 1 if any(row.failing for row in rows) else 0


def format_table(rows: Sequence[Row]) -> str:
    if not rows:
        return "(no bugs selected)\n"
    width = max(len(r.outcome.bug) for r in rows)
    devices = {r.device for r in rows}
    lines = [f"device {', '.join(sorted(devices))}"] if devices != {DEVICE_TYPE} else []
    lines.append(
        f"{'id':<{width}}  {'arch':<7}  {'qemu':<8}  {'verdict':<14}  {'secs':>5}  signature"
    )
    for row in rows:
        o = row.outcome
        seen = o.evidence.headline() if o.evidence is not None else "-"
        version = row.qemu_version + ("" if row.listed or o.status == DOES_NOT_APPLY else "*")
        lines.append(
            f"{o.bug:<{width}}  {o.arch:<7}  {version:<8}  {row.verdict:<14}  "
            f"{o.seconds:>5.2f}  {seen}"
        )
        if row.failing and o.detail:
            lines.append(f"{'':<{width}}  {'':<7}  {'':<8}  {'':<14}  {'':>5}  ({o.detail})")
    if any(not r.listed and r.outcome.status != DOES_NOT_APPLY for r in rows):
        lines.append("* a QEMU version the registry does not list: reported, not judged")
    failing = sum(r.failing for r in rows)
    applicable = sum(r.outcome.status != DOES_NOT_APPLY for r in rows)
    total = sum(r.outcome.seconds for r in rows)
    lines.append(
        f"{applicable - failing}/{applicable} applicable checks as the registry says; "
        f"{total:.1f} s of reproducers"
    )
    return "\n".join(lines) + "\n"


def check(
    ids: Sequence[str],
    arches: Sequence[str],
    qemus: dict[str, tuple[Path, str]],
    device: str = DEVICE_TYPE,
) -> list[Row]:
    """Run the reproducers of ``ids`` (all when empty) on ``arches`` with ``device``;
    ``qemus`` maps an arch to (binary, version) -- the caller resolves them."""
    rows: list[Row] = []
    for bug in select(ids):
        for arch in arches:
            path, version = qemus[arch]
            guestless = bug.id in RECIPES and arch in RECIPE_ARCHES.get(bug.id, (arch,))
            if device != DEVICE_TYPE and not guestless:
                # Its scenario boots a guest with the test device: no other device there.
                outcome = Outcome(bug.id, arch, DOES_NOT_APPLY, None, 0.0, "needs a guest")
            else:
                outcome = run_recipe(bug.id, arch, path, device_type=device).outcome
            rows.append(Row(outcome, version, lookup(bug.id).applies(version), device))
    return rows
