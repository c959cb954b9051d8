"""The bug registry (pure): entries are complete, every mark names a registered bug, every
listed scenario exists, and a failure matches a bug only by its signature."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from testbed.bugs import Bug, Evidence, KnownBugSeen, exit_of, lookup, registry
from testbed.bugs.signature import crash_site, segfault_in_log
from testbed.errors import ConfigError, QemuExited

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"""known_bug\(\s*["']([a-z0-9-]+)["']""")
BUG_ARG = re.compile(r"""\bbug=["']([a-z0-9-]+)["']""")


def test_every_entry_is_complete() -> None:
    bugs = registry()
    assert len(bugs) >= 11
    for bug in bugs.values():
        assert bug.title and bug.component and bug.function, bug.id
        assert bug.versions and bug.arches and bug.scenarios, bug.id
        assert bug.root_cause.strip() and bug.report.strip(), bug.id
        re.compile(bug.stderr or bug.observable)
        assert bug.stderr or bug.observable or bug.exit.startswith("signal:"), bug.id


def _recorded(bug: Bug, judged_by: Bug) -> Evidence:
    """``bug``'s recorded evidence as ``judged_by`` would see it at its most permissive: in
    a fuzz case, an oracle's words are checked against every observable entry's pattern
    (testbed.fuzz.triage.evidence names the entry being tried)."""
    return Evidence.gather(
        [bug.evidence],
        bug.evidence_exit,
        names=judged_by.id if judged_by.observable else None,
    )


def test_every_signature_matches_its_own_evidence_and_no_other() -> None:
    bugs = list(registry().values())
    for bug in bugs:
        assert bug.evidence.strip(), f"{bug.id}: no recorded evidence"
        assert bug.matches(_recorded(bug, bug)), f"{bug.id}: its own evidence does not match"
    clashes = [
        f"{other.id}'s signature matches {bug.id}'s evidence"
        for bug in bugs
        for other in bugs
        if other is not bug and other.matches(_recorded(bug, other))
    ]
    assert clashes == []


def test_a_silent_segfault_elsewhere_is_not_the_stopped_device_one() -> None:
    stopped = lookup("shmem-map-stopped-device-segfault")
    unplug = lookup("unplug-channel-close-hangup-segfault")
    anywhere = Evidence.gather(["QEMU exited (signal:SIGSEGV)"], "signal:SIGSEGV")
    assert not stopped.matches(anywhere) and not unplug.matches(anywhere)
    site = "QEMU exited (signal:SIGSEGV)\ncrash site: qemu-system-aarch64+0x9ee390"
    assert stopped.matches(Evidence.gather([site], "signal:SIGSEGV"))


def test_every_listed_scenario_exists() -> None:
    for bug in registry().values():
        for scenario in bug.scenarios:
            path, _, name = scenario.partition("::")
            function = name.split("[")[0]
            text = (ROOT / path).read_text()
            assert f"def {function}(" in text, f"{bug.id}: {scenario} not found"


def test_every_mark_names_a_registered_bug_and_every_bug_is_marked() -> None:
    marked: set[str] = set()
    named: set[str] = set()
    for path in [*ROOT.glob("scenarios/**/*.py"), *ROOT.glob("tests/test_*.py")]:
        if path.name == "test_bugs.py":
            continue
        text = path.read_text()
        marked |= set(MARK.findall(text)) | set(BUG_ARG.findall(text))
        named |= {bug for bug in registry() if f'"{bug}"' in text}
    # A bug the fuzzer found is shown by its minimised case in the replayed corpus.
    corpus = ROOT / "tests" / "data" / "fuzz-corpus"
    for bug in registry().values():
        cases = [s.partition("[")[2].rstrip("]") for s in bug.scenarios if "test_corpus_case" in s]
        if any((corpus / f"{case}.json").is_file() for case in cases):
            named.add(bug.id)
    assert marked <= set(registry()), f"unregistered ids: {marked - set(registry())}"
    assert set(registry()) <= named, f"bugs no test shows: {set(registry()) - named}"


def test_lookup_names_the_known_ids() -> None:
    with pytest.raises(ConfigError, match="vub-get-features-abort"):
        lookup("no-such-bug")


def test_exit_of() -> None:
    assert exit_of(-6) == "signal:SIGABRT"
    assert exit_of(-11) == "signal:SIGSEGV"
    assert exit_of(1) == "status:1"
    assert exit_of(None) == "running"


def test_the_kernel_log_gives_a_segfault_site() -> None:
    log = (
        "[  1.0] other[77]: segfault at 0 ip 0000 sp 0 error 4 in other[1234,5000+1000]\n"
        "[  2.0] qemu-system-x86_64[4242]: segfault at 0 ip 00005555 sp 00007ffc error 4 in "
        "qemu-system-x86_64[9cadd4,555555400000+a00000] likely on CPU 1\n"
    )
    site = segfault_in_log(log, 4242)
    assert site == {
        "binary": "qemu-system-x86_64", "offset": "9cadd4", "ip": "00005555", "addr": "0"
    }  # fmt: skip
    assert segfault_in_log(log, 4243) == {}
    assert crash_site("", site) == "qemu-system-x86_64+0x9cadd4"
    assert crash_site("vub_get_features: assertion failed: (backend_features)\n", site) == (
        "vub_get_features: assertion failed: (backend_features)"
    )
    assert crash_site("", {}) == ""


def test_evidence_is_gathered_one_way() -> None:
    gathered = Evidence.gather(["stderr line", "QEMU exited (signal:SIGSEGV)"], -11)
    assert gathered == Evidence("stderr line\nQEMU exited (signal:SIGSEGV)", "signal:SIGSEGV")
    assert Evidence.gather(["x"]).exit == "running"
    assert Evidence.gather(["x"], "status:1", names="a-bug", where="SHMEM_MAP@device-reset") == (
        Evidence("x", "status:1", "a-bug", "SHMEM_MAP@device-reset")
    )


def test_fuzz_where_places_a_shared_signature() -> None:
    """An entry with fuzz_where matches a fuzz finding only at those places; outside the
    fuzzer no place is known and the signature alone decides."""
    bug = Bug(
        "some-bug", "t", "c", "f", ("11.1.3",), ("x86_64",), ("s",), "r", "r", False,
        exit="signal:SIGSEGV", fuzz_where=("SHMEM_MAP@before-driver-ok",),
    )  # fmt: skip
    seen = Evidence.gather(["QEMU exited (signal:SIGSEGV)"], -11)
    assert bug.matches(seen)
    there = Evidence.gather([seen.text], -11, where="SHMEM_MAP@before-driver-ok")
    elsewhere = Evidence.gather([seen.text], -11, where="SHMEM_MAP@after-driver-ok")
    assert bug.matches(there)
    assert not bug.matches(elsewhere)


def test_a_crash_matches_by_stderr_and_exit() -> None:
    bug = lookup("bar-not-power-of-two-abort")
    stderr = "qemu: hw/pci/pci.c:1515: pci_register_bar: Assertion `is_power_of_2(size)' failed."
    crash = QemuExited("QEMU exited while starting", returncode=-6, stderr_tail=stderr)
    assert bug.matches(Evidence.of(crash))
    refused = QemuExited("QEMU exited while starting", returncode=1, stderr_tail=stderr)
    assert not bug.matches(Evidence.of(refused)), "the exit is part of the signature"
    wrapped = AssertionError("outer")
    wrapped.__cause__ = crash
    assert bug.matches(Evidence.of(wrapped)), "the evidence follows the exception chain"
    assert "Assertion" in Evidence.of(crash).headline()
    assert bug.seen(Evidence.of(wrapped)) == f"{stderr} [signal:SIGABRT]"


def test_a_silent_bug_matches_only_when_the_scenario_names_it() -> None:
    bug = lookup("readonly-map-writable")
    seen = "a guest write through a read-only mapping reached the memfd"
    assert bug.matches(Evidence.of(KnownBugSeen(bug.id, seen)))
    assert not bug.matches(Evidence.of(AssertionError(seen)))
    assert not bug.matches(Evidence.of(KnownBugSeen("nregions-mismatch-accepted", seen)))


def test_bad_entries_are_refused() -> None:
    base = dict(
        id="x-y", title="t", component="c", function="f", versions=("1",), arches=("x86_64",),
        scenarios=("s",), root_cause="r", report="r", needs_guest=False, stderr="boom",
    )  # fmt: skip
    Bug(**base)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="slug"):
        Bug(**{**base, "id": "Bad Id"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="exit"):
        Bug(**{**base, "exit": "crashed"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="stderr pattern, an observable"):
        Bug(**{**base, "stderr": ""})  # type: ignore[arg-type]
    # A segfault prints nothing: the signal alone is the signature.
    silent = Bug(**{**base, "stderr": "", "exit": "signal:SIGSEGV"})  # type: ignore[arg-type]
    assert silent.matches(Evidence("QEMU exited", "signal:SIGSEGV"))
    assert not silent.matches(Evidence("QEMU exited", "signal:SIGABRT"))
