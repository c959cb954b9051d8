"""The fuzz corpus (tests/data/fuzz-corpus/*.json): cases `testbed fuzz` found interesting,
each with the signatures it showed. Replayed against QEMU 11.1.3 without a guest, a case
must show exactly its recorded signatures again (none: it must run clean). A QEMU where a
bug is fixed fails its case here: re-record the case (or drop it) with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.errors import TestbedError
from testbed.fuzz.grammar import Case
from testbed.fuzz.run import replay
from testbed.host.qemu import resolve_qemu

pytestmark = pytest.mark.qemu

CORPUS = Path(__file__).parent / "data" / "fuzz-corpus"
ENTRIES = sorted(CORPUS.glob("*.json"))


def _qemu(arch: str) -> Path:
    try:
        return resolve_qemu(arch).path
    except TestbedError as exc:
        pytest.skip(f"no QEMU 11.1 for {arch}: {exc}")


def test_corpus_is_not_empty() -> None:
    assert ENTRIES, f"no corpus cases in {CORPUS}"


@pytest.mark.parametrize("path", ENTRIES, ids=[p.stem for p in ENTRIES])
def test_corpus_case(path: Path) -> None:
    entry = json.loads(path.read_text())
    case = Case.from_json(entry["case"])
    found = replay(case, _qemu(case.arch))
    shown = sorted({f.signature for f in found})
    assert shown == sorted(entry["signatures"]), (
        f"{path.name}: QEMU showed {shown}, the corpus recorded {entry['signatures']}"
    )
    known = entry.get("known", {})
    for f in found:
        if f.signature in known:
            assert f.known == known[f.signature], f"{f.signature}: matched {f.known}"
