"""Running one known bug's reproducer and judging it: the guest-less recipe
(testbed.bugs.recipes, recorded as a stand-alone script), the fuzzer's minimised corpus case
for a bug the fuzzer found, or the scenario rerun for a bug that needs a guest. The outcome
is what `testbed bugs check` reports and `testbed bugs export` writes from.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.bugs import Bug, lookup
from testbed.bugs.recipes import RECIPES
from testbed.bugs.recipes_fuzz import RECIPE_ARCHES, RECIPE_ATTEMPTS
from testbed.bugs.recording import Recipe, RecipeFailed, Run
from testbed.bugs.rerun import rerun_scenario
from testbed.bugs.signature import RUNNING, Evidence
from testbed.errors import PeerClosed, QemuExited, QmpCommandFailed, WaitTimeout
from testbed.fuzz import corpus
from testbed.fuzz.run import replay
from testbed.fuzz.triage import evidence as finding_evidence
from testbed.paths import PROJECT_ROOT, make_private_dir, remove_tree

log = logging.getLogger(__name__)

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
DOES_NOT_APPLY = "does not apply"
ERROR = "error"


@dataclass(frozen=True)
class Outcome:
    """One recipe run: reproduced / not reproduced / does not apply / error."""

    bug: str
    arch: str
    status: str
    evidence: Evidence | None
    seconds: float
    detail: str = ""

    @property
    def reproduced(self) -> bool:
        return self.status == REPRODUCED

    def to_json(self) -> dict[str, Any]:
        return {
            "bug": self.bug,
            "arch": self.arch,
            "status": self.status,
            "signature_seen": self.evidence.headline() if self.evidence else None,
            "exit": self.evidence.exit if self.evidence else None,
            "seconds": round(self.seconds, 2),
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Recorded:
    outcome: Outcome
    script: dict[str, Any] | None
    """The stand-alone script; None for a scenario rerun."""


def run_recipe(
    bug_id: str,
    arch: str,
    qemu: Path,
    *,
    trace_path: Path | None = None,
    device_type: str | None = None,
) -> Recorded:
    """Run ``bug_id``'s reproducer on ``arch`` against ``qemu`` (with ``device_type``: on
    that device instead of the test device); nothing is left running."""
    bug = lookup(bug_id)
    started = time.monotonic()
    if arch not in bug.arches:
        return Recorded(Outcome(bug.id, arch, DOES_NOT_APPLY, None, 0.0), None)
    recipe = RECIPES.get(bug.id)
    if arch not in RECIPE_ARCHES.get(bug.id, (arch,)):
        recipe = None
    if recipe is None and any(CORPUS_TEST in scenario for scenario in bug.scenarios):
        return Recorded(_replay_corpus(bug, arch, qemu, started), None)
    if recipe is None:
        return Recorded(_rerun(bug, arch, started), None)
    attempts = RECIPE_ATTEMPTS.get(bug.id, 1)
    recorded = _attempt(bug, recipe, arch, qemu, trace_path, device_type, started)
    for _ in range(attempts - 1):
        if recorded.outcome.reproduced:
            break
        recorded = _attempt(bug, recipe, arch, qemu, trace_path, device_type, started)
    if recorded.script is not None:
        recorded.script["attempts"] = attempts  # repro.py tries as often
    return recorded


def _attempt(
    bug: Bug,
    recipe: Recipe,
    arch: str,
    qemu: Path,
    trace_path: Path | None,
    device_type: str | None,
    started: float,
) -> Recorded:
    """One run of ``recipe`` with a fresh QEMU and back-end."""
    workdir = make_private_dir("bug")
    run = Run(bug, arch, qemu, workdir, trace_path, device_type=device_type)
    detail = ""
    try:
        with run:
            try:
                recipe(run)
            except (QemuExited, PeerClosed) as exc:
                # The crash (or refusal) we came for; its logs went with the run dir.
                detail = str(exc).splitlines()[0].split(" (logs in ")[0]
            except QmpCommandFailed as exc:
                detail = f"QMP {exc.command} failed: {exc.desc}"
            except (WaitTimeout, RecipeFailed) as exc:
                detail = str(exc)
            evidence = run.evidence()
        script = run.script()
    finally:
        remove_tree(workdir)
    status = REPRODUCED if bug.matches(evidence) else NOT_REPRODUCED
    outcome = Outcome(bug.id, arch, status, evidence, time.monotonic() - started, detail)
    return Recorded(outcome, script)


CORPUS_TEST = "tests/test_fuzz_corpus.py::test_corpus_case["
CORPUS_DIR = PROJECT_ROOT / "tests" / "data" / "fuzz-corpus"


def _replay_corpus(bug: Bug, arch: str, qemu: Path, started: float) -> Outcome:
    """A bug the fuzzer found: replay its minimised corpus case (this arch's, else the
    first one, moved to this arch) through the fuzzer's player."""
    names = [s.removeprefix(CORPUS_TEST).rstrip("]") for s in bug.scenarios if CORPUS_TEST in s]
    name = next((n for n in names if n.startswith(f"{arch}-")), names[0])
    case, _recorded = corpus.load(CORPUS_DIR / f"{name}.json")
    if case.arch != arch:
        case = dataclasses.replace(case, arch=arch)
    evidence = finding_evidence(replay(case, qemu), bug)
    status = REPRODUCED if bug.matches(evidence) else NOT_REPRODUCED
    return Outcome(bug.id, arch, status, evidence, time.monotonic() - started, f"corpus {name}")


def _rerun(bug: Bug, arch: str, started: float) -> Outcome:
    """A bug that needs a guest: rerun its first scenario for ``arch``."""
    nodeid = f"{bug.scenarios[0]}[{arch}]"
    result = rerun_scenario(nodeid, ["--arch", arch])
    # The scenario's known-bug mark already matched the signature when it says xfailed;
    # its message is "known bug <id> on QEMU <v>: <headline>".
    headline = result.message.partition(": ")[2] or result.message
    evidence = Evidence.gather([headline], bug.exit if result.outcome == "xfailed" else RUNNING)
    status = REPRODUCED if result.outcome == "xfailed" and bug.matches(evidence) else NOT_REPRODUCED
    log.info("rerun %s: %s", nodeid, result.summary())
    return Outcome(bug.id, arch, status, evidence, time.monotonic() - started, nodeid)
