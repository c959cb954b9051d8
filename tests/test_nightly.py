"""The nightly job's glue (pure parts): the generated cases and the xunit annotation that
puts back the SKIP reasons and WARN messages avocado's xunit writer leaves out."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("avocado", reason="avocado-framework is a dependency of the nightly job")

from testbed.nightly import Case, annotate_xunit, write_cases

SKIP = "host capability missing: --accel kvm cannot work here: /dev/kvm is kvm_pvm"
WARN = "known bug vub-get-features-abort on QEMU 11.1.3: vub_get_features: ... [signal:SIGABRT]"


def test_write_cases(tmp_path: Path) -> None:
    cases = [
        Case("scenarios/a.py::t[x86_64]", "x86_64", "tcg", "6.1"),
        Case("scenarios/a.py::t[x86_64]", "x86_64", "kvm", "6.12", fresh_boot=True),
    ]
    uris = write_cases(tmp_path / "cases.json", cases)
    assert uris == [
        f"{tmp_path}/cases.py:Scenarios.test_0000",
        f"{tmp_path}/cases.py:Scenarios.test_0001",
    ]
    assert Case(**json.loads((tmp_path / "cases.json").read_text())["test_0001"]) == cases[1]
    assert cases[1].name == "scenarios/a.py::t[x86_64]@kvm@6.12@fresh-boot"
    assert cases[1].pytest_options() == [
        "--arch", "x86_64", "--accel", "kvm", "--kernel", "6.12", "--isolated-boots",
        "--fresh-boot",
    ]  # fmt: skip
    assert "--fresh-boot" not in cases[0].pytest_options()
    source = (tmp_path / "cases.py").read_text()
    compile(source, "cases.py", "exec")
    assert "class Scenarios(ScenarioTest):" in source and "def test_0001(self):" in source


def test_annotate_xunit(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"tests": [
        {"name": "scenarios/a.py::t[x86_64]@kvm", "status": "SKIP", "fail_reason": SKIP},
        {"name": "scenarios/b.py::u[x86_64]@tcg", "status": "WARN", "fail_reason": WARN},
        {"name": "scenarios/c.py::v[x86_64]@tcg", "status": "PASS", "fail_reason": None},
    ]}))  # fmt: skip
    (tmp_path / "results.xml").write_text(
        '<testsuite><testcase name="scenarios/a.py::t[x86_64]@kvm"><skipped /></testcase>'
        '<testcase name="scenarios/b.py::u[x86_64]@tcg" />'
        '<testcase name="scenarios/c.py::v[x86_64]@tcg" /></testsuite>'
    )
    assert annotate_xunit(tmp_path) == 2
    cases = {c.get("name"): c for c in ET.parse(tmp_path / "results.xml").getroot()}
    skipped = cases["scenarios/a.py::t[x86_64]@kvm"].find("skipped")
    assert skipped is not None and skipped.get("message") == SKIP
    warn = cases["scenarios/b.py::u[x86_64]@tcg"]
    props = {p.get("name"): p.get("value") for p in warn.iter("property")}
    assert props == {"status": "WARN", "known-bug": WARN}
    assert list(cases["scenarios/c.py::v[x86_64]@tcg"]) == []
