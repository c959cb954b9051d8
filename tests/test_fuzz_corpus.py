"""The fuzz corpus (tests/data/fuzz-corpus/*.json): cases `testbed fuzz` found interesting,
each with the signatures it showed. Replayed against QEMU 11.1.3 without a guest, a case
must show exactly its recorded signatures again (none: it must run clean). A QEMU where a
bug is fixed fails its case here: re-record the case (or drop it) with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.bugs.signature import SILENT_EXITS
from testbed.errors import TestbedError
from testbed.fuzz import corpus
from testbed.fuzz.run import replay
from testbed.host import debugger
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
    case, recorded = corpus.load(path)
    # A crash that prints nothing is known by its site: replayed under gdb for it (the
    # kernel's log may have no line: rate-limited, unreadable, or a SIGBUS).
    silent = any(s.startswith(SILENT_EXITS) for s in recorded.get("signatures", []))
    found = replay(case, _qemu(case.arch), debug=silent and debugger.available())
    assert corpus.differences(recorded, found) == [], path.name
