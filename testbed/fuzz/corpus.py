"""The corpus: interesting cases with the signatures they showed (pure apart from files).

An entry is ``{"case": {...}, "signatures": [...], "known": {signature: registry id}}``.
Replaying an entry must show the same signatures again; a silent crash's site (the
faulting offset, from the kernel's log or a debugger) is compared loosely.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from testbed.fuzz.grammar import Case
from testbed.fuzz.triage import Finding

_SILENT_SITE = re.compile(
    r"^signal:(SIGSEGV|SIGBUS|SIGILL|SIGFPE) (?:in \S+|\S+\+0x[0-9a-f]+(?: from \S+)?)"
)


def normalise(signature: str) -> str:
    """A silent crash's signature with its site left out: a replay without a debugger
    gets the site from the kernel's log, which may have none (rate-limited, unreadable,
    or a SIGBUS, which the kernel does not log)."""
    return _SILENT_SITE.sub(r"signal:\1 *", signature)


def entry(case: Case, found: Iterable[Finding]) -> dict[str, Any]:
    found = list(found)
    return {
        "case": case.to_json(),
        "signatures": sorted({f.signature for f in found}),
        "known": {f.signature: f.known for f in found if f.known},
    }


def save(path: Path, case: Case, found: Iterable[Finding]) -> None:
    path.write_text(json.dumps(entry(case, found), indent=1, sort_keys=True) + "\n")


def load(path: Path) -> tuple[Case, dict[str, Any]]:
    data = json.loads(path.read_text())
    return Case.from_json(data["case"]), data


def differences(recorded: dict[str, Any], found: Iterable[Finding]) -> list[str]:
    """What a replay showed differently from the entry; [] = it reproduced."""
    found = list(found)
    want = sorted({normalise(s) for s in recorded.get("signatures", [])})
    got = sorted({normalise(f.signature) for f in found})
    out = []
    if want != got:
        out.append(f"signatures: recorded {want}, replay showed {got}")
    known = {normalise(k): v for k, v in recorded.get("known", {}).items()}
    for f in found:
        expected = known.get(normalise(f.signature))
        if expected is not None and f.known != expected:
            out.append(f"{f.signature}: recorded as {expected}, matched {f.known}")
    return out
