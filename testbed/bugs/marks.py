"""The pytest side of the bug registry: ``@known_bug(id)`` and the verdict it leads to.

Loaded by the scenarios' plugin (testbed.pytest_plugin) and by tests/conftest.py. A test
marked ``known_bug("id")``, on a QEMU version the registry lists for that bug and an arch
it lists:
- fails with the bug's signature (QEMU's stderr and exit, or the scenario naming the bug
  by raising KnownBugSeen): an expected failure, reported with the signature seen;
- fails otherwise: a failure, with the signature it saw and the one it wanted;
- passes: a failure, "known bug <id> did not show on QEMU <version>: fixed? update the
  registry".
On other versions or arches the mark does not apply. A failure of an unmarked test that
has a registry bug's signature says so in its report.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

from testbed.bugs import Evidence, lookup, registry
from testbed.host.qemu import resolve_qemu
from testbed.machine.profiles import ARCHES


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "known_bug(id): shows the registry's known QEMU bug id")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        judge_known_bug(item, call, report)
    return report


def known_bug(bug_id: str) -> pytest.MarkDecorator:
    """Mark a scenario that shows the registry's bug ``bug_id`` (testbed/bugs/registry.toml).

    On a QEMU version the registry lists for it, the scenario is an expected failure only
    when the bug's signature shows; a failure without it fails, with what it saw; a pass
    fails too ("known bug ... did not show"). On other versions the mark does not apply."""
    lookup(bug_id)  # an unknown id fails at collection, not at the end of a long run
    return pytest.mark.known_bug(bug_id)


def _qemu_version(item: pytest.Item) -> str:
    """The QEMU version a test ran with: recorded by `boot`, else resolved for its arch."""
    for name, value in item.user_properties:
        if name == "qemu-version":
            return str(value)
    params = getattr(item, "callspec", None)
    arch = params.params.get("arch", ARCHES[0]) if params is not None else ARCHES[0]
    try:
        return resolve_qemu(arch).version_str
    except Exception:  # no QEMU at all: the test itself said so already
        return "unknown"


def _arch_of(item: pytest.Item) -> str:
    params = getattr(item, "callspec", None)
    return str(params.params.get("arch", ARCHES[0])) if params is not None else ARCHES[0]


def judge_known_bug(
    item: pytest.Item, call: pytest.CallInfo[None], report: pytest.TestReport
) -> None:
    """Turn the call's outcome into the verdict the registry asks for (see known_bug)."""
    marker = item.get_closest_marker("known_bug")
    if marker is None:
        if call.excinfo is not None and report.failed:
            evidence = Evidence.of(call.excinfo.value)
            hits = [b.id for b in registry().values() if b.matches(evidence)]
            if hits:
                report.sections.append(
                    ("testbed known bugs", f"this failure has the signature of {', '.join(hits)}")
                )
        return
    if report.skipped:
        return  # a missing host capability: the skip and its reason stand
    bug = lookup(str(marker.args[0]))
    version = _qemu_version(item)
    arch = _arch_of(item)
    item.user_properties.append(("known-bug", bug.id))
    if not bug.applies(version) or arch not in bug.arches:
        item.user_properties.append(("known-bug-applies", f"no (QEMU {version}, {arch})"))
        return
    if call.excinfo is None:
        report.outcome = "failed"
        report.longrepr = (
            f"known bug {bug.id} did not show on QEMU {version} ({arch}): fixed? update the "
            f"registry (testbed/bugs/registry.toml). Signature: {bug.signature()}"
        )
        return
    evidence = Evidence.of(call.excinfo.value)
    if bug.matches(evidence):
        report.outcome = "skipped"
        seen = bug.seen(evidence)
        report.wasxfail = f"known bug {bug.id} on QEMU {version}: {seen}"
        item.user_properties.append(("known-bug-signature", seen))
        return
    report.outcome = "failed"
    report.sections.append(
        (
            "testbed known bugs",
            f"failed without the signature of known bug {bug.id} ({bug.signature()}); "
            f"it saw: {evidence.headline()}",
        )
    )
