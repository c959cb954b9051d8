"""The host layer: QEMU resolution, the accelerator decision, provisioning pieces, doctor."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.errors import ConfigError, HostCapabilityError
from testbed.host import accel, debian, doctor, sysroot
from testbed.host import qemu as hq
from testbed.host.accel import AccelChoice, HostFacts, decide_accel
from testbed.host.qemu import (
    SOURCE_EXPLICIT,
    SOURCE_PATH,
    SOURCE_PROVISIONED,
    Candidate,
    QemuFacts,
    candidates_for,
    choose_qemu,
)
from testbed.machine import probe as machine_probe
from testbed.machine.probe import ProbeVerdict

# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1)\nCopyright", (11, 1, 3)),
        ("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)", (7, 2, 19)),
        ("QEMU emulator version 11.0.50 (v11.0.0-1234-gabcdef)", (11, 0, 50)),
        ("QEMU emulator version 11.1", (11, 1, 0)),
        ("11.2.0", (11, 2, 0)),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int, int]) -> None:
    assert hq.parse_version(text) == expected


def test_parse_version_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="no QEMU version"):
        hq.parse_version("qemu: could not load PC BIOS")


def test_version_from_qmp() -> None:
    reply = {"qemu": {"major": 11, "minor": 1, "micro": 3}, "package": "Debian"}
    assert hq.version_from_qmp(reply) == (11, 1, 3)
    with pytest.raises(ValueError, match="malformed"):
        hq.version_from_qmp({"qemu": {"major": 11}})


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ((11, 1, 0), True),
        ((11, 1, 3), True),
        ((12, 0, 0), True),
        ((11, 0, 0), False),
        ((11, 0, 50), True),  # git tree after 11.0 = 11.1 in the making
        ((11, 0, 90), True),  # 11.1 release candidate
        ((10, 2, 50), False),  # on the way to 11.0
        ((7, 2, 19), False),
    ],
)
def test_meets_minimum(version: tuple[int, int, int], ok: bool) -> None:
    assert hq.meets_minimum(version) is ok


# --------------------------------------------------------------------------- resolution

GOOD = (11, 1, 3)


def good(path: Path) -> QemuFacts:
    return QemuFacts(path, version=GOOD, has_device=True)


def fake_probe(
    facts: dict[str, QemuFacts],
) -> tuple[Callable[[Path], QemuFacts], list[Path]]:
    """A probe that knows some paths; any other path does not exist."""
    calls: list[Path] = []

    def probe(path: Path) -> QemuFacts:
        calls.append(path)
        return facts.get(
            str(path), QemuFacts(path, problem="it does not exist", exists=False, executable=False)
        )

    return probe, calls


PROV = Path("/cache/qemu/bin/qemu-system-x86_64")


def test_candidates_explicit_beats_env_and_is_alone() -> None:
    env = {"TESTBED_QEMU_X86_64": "/env/qemu", "PATH": "/usr/bin"}
    cands = candidates_for("x86_64", "/opt/qemu", env, PROV)
    assert cands == [Candidate(Path("/opt/qemu"), SOURCE_EXPLICIT, "--qemu-x86_64")]
    cands = candidates_for("x86_64", None, env, PROV)
    assert cands == [Candidate(Path("/env/qemu"), SOURCE_EXPLICIT, "$TESTBED_QEMU_X86_64")]


def test_candidates_path_order_then_provisioned(tmp_path: Path) -> None:
    env = {"PATH": "/a:/b::/a:/cache/qemu/bin"}
    cands = candidates_for("aarch64", None, env, Path("/cache/qemu/bin/qemu-system-aarch64"))
    assert [(str(c.path), c.source) for c in cands] == [
        ("/a/qemu-system-aarch64", SOURCE_PATH),
        ("/b/qemu-system-aarch64", SOURCE_PATH),
        ("/cache/qemu/bin/qemu-system-aarch64", SOURCE_PROVISIONED),
    ]


def test_choose_skips_unsuitable_path_entries_and_takes_the_first_good() -> None:
    cands = candidates_for("x86_64", None, {"PATH": "/old:/missing:/new"}, PROV)
    probe, calls = fake_probe(
        {
            "/old/qemu-system-x86_64": QemuFacts(Path("/old"), version=(7, 2, 19)),
            "/new/qemu-system-x86_64": good(Path("/new/qemu-system-x86_64")),
            str(PROV): good(PROV),
        }
    )
    chosen = choose_qemu("x86_64", cands, probe)
    assert chosen == hq.QemuBinary("x86_64", Path("/new/qemu-system-x86_64"), GOOD, SOURCE_PATH)
    assert PROV not in calls  # lazy: the provisioned one is not even probed


def test_choose_falls_back_to_provisioned() -> None:
    cands = candidates_for("x86_64", None, {"PATH": "/usr/bin"}, PROV)
    probe, _ = fake_probe(
        {
            "/usr/bin/qemu-system-x86_64": QemuFacts(
                Path("/usr/bin/qemu-system-x86_64"), version=(11, 1, 0), has_device=False
            ),
            str(PROV): good(PROV),
        }
    )
    assert choose_qemu("x86_64", cands, probe).source == SOURCE_PROVISIONED


def test_choose_nothing_suitable_lists_what_was_tried() -> None:
    cands = candidates_for("x86_64", None, {"PATH": "/usr/bin"}, PROV)
    probe, _ = fake_probe(
        {"/usr/bin/qemu-system-x86_64": QemuFacts(Path("/usr/bin/x"), version=(7, 2, 19))}
    )
    with pytest.raises(HostCapabilityError) as err:
        choose_qemu("x86_64", cands, probe)
    text = str(err.value)
    assert "/usr/bin/qemu-system-x86_64 (PATH): it is QEMU 7.2.19" in text
    assert f"{PROV} (provisioned): it does not exist" in text
    assert "testbed qemu provision" in text


def test_explicit_missing_is_config_error_naming_path() -> None:
    cands = candidates_for("x86_64", "/nope/qemu", {}, PROV)
    probe, calls = fake_probe({str(PROV): good(PROV)})
    with pytest.raises(ConfigError, match=r"--qemu-x86_64 /nope/qemu: it does not exist"):
        choose_qemu("x86_64", cands, probe)
    assert calls == [Path("/nope/qemu")]  # never falls back past what the user asked for


def test_explicit_too_old_from_env_says_unset() -> None:
    cands = candidates_for("x86_64", None, {"TESTBED_QEMU_X86_64": "/q"}, PROV)
    probe, _ = fake_probe({"/q": QemuFacts(Path("/q"), version=(10, 0, 7))})
    with pytest.raises(HostCapabilityError) as err:
        choose_qemu("x86_64", cands, probe)
    text = str(err.value)
    assert "$TESTBED_QEMU_X86_64 /q" in text and "QEMU 10.0.7" in text
    assert "unset TESTBED_QEMU_X86_64" in text and "QEMU >= 11.1.0" in text


def test_explicit_without_device() -> None:
    cands = candidates_for("aarch64", "/q", {}, PROV)
    probe, _ = fake_probe({"/q": QemuFacts(Path("/q"), version=GOOD, has_device=False)})
    with pytest.raises(HostCapabilityError, match="no vhost-user-test-device-pci"):
        choose_qemu("aarch64", cands, probe)


def test_probe_qemu_real_files(tmp_path: Path) -> None:
    """Missing and non-executable files are judged without running anything."""
    missing = hq.probe_qemu(tmp_path / "none")
    assert not missing.exists and "does not exist" in missing.problem
    plain = tmp_path / "plain"
    plain.write_text("not a program")
    assert not hq.probe_qemu(plain).executable
    with pytest.raises(ConfigError, match="not an executable file"):
        hq.resolve_qemu("x86_64", str(plain))


def test_probe_qemu_script_without_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    script = tmp_path / "qemu-system-x86_64"
    script.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.19'\n")
    script.chmod(0o755)
    facts = hq.probe_qemu(script)
    assert facts.version == (7, 2, 19) and "needs QEMU >= 11.1.0" in (facts.unsuitability() or "")
    # The settled verdict is cached by path+mtime+size+inode.
    cache = json.loads((tmp_path / "cache" / "host" / "qemu-facts.json").read_text())
    assert [v["version"] for v in cache.values()] == [[7, 2, 19]]


def test_unknown_arch() -> None:
    with pytest.raises(ConfigError, match="unknown guest architecture 'riscv64'"):
        hq.resolve_qemu("riscv64")


# --------------------------------------------------------------------------- accelerator

PVM = HostFacts("x86_64", True, True, kvm_modules=("kvm", "kvm_pvm"))
WORKING = HostFacts(
    "x86_64", True, True, kvm_modules=("kvm", "kvm_intel"), probe=ProbeVerdict(True, "ran")
)


def test_kvm_pvm_means_tcg_with_reason() -> None:
    choice = decide_accel("auto", "x86_64", PVM)
    assert choice == AccelChoice(
        "tcg", "TCG: /dev/kvm is kvm_pvm (paravirtual KVM), which cannot run stock kernels"
    )


def test_working_kvm_is_chosen() -> None:
    assert decide_accel("auto", "x86_64", WORKING).name == "kvm"
    assert decide_accel("kvm", "x86_64", WORKING).name == "kvm"


def test_no_dev_kvm() -> None:
    facts = HostFacts("x86_64", False, False)
    choice = decide_accel("auto", "x86_64", facts)
    assert choice.name == "tcg" and "/dev/kvm does not exist" in choice.reason


def test_dev_kvm_not_openable() -> None:
    facts = HostFacts("x86_64", True, False, kvm_device_error="Permission denied")
    choice = decide_accel("auto", "x86_64", facts)
    assert "cannot be opened read-write (Permission denied)" in choice.reason


def test_foreign_arch_is_tcg() -> None:
    choice = decide_accel("auto", "aarch64", WORKING)
    assert choice.name == "tcg"
    assert choice.reason == "TCG: guest aarch64 differs from host x86_64, KVM needs the same arch"


def test_failed_or_missing_probe_is_tcg() -> None:
    failed = HostFacts("x86_64", True, True, probe=ProbeVerdict(False, "did not run in 5 s"))
    assert decide_accel("auto", "x86_64", failed).reason == (
        "TCG: the KVM probe failed: did not run in 5 s"
    )
    unprobed = HostFacts("x86_64", True, True)
    assert decide_accel("auto", "x86_64", unprobed).name == "tcg"


@pytest.mark.parametrize(
    "facts",
    [PVM, HostFacts("x86_64", False, False), HostFacts("aarch64", True, True)],
)
def test_explicit_kvm_refused_with_reason(facts: HostFacts) -> None:
    reason = accel.kvm_obstacle("x86_64", facts)
    assert reason
    with pytest.raises(HostCapabilityError) as err:
        decide_accel("kvm", "x86_64", facts)
    assert reason in str(err.value) and "--accel tcg" in str(err.value)


def test_tcg_requested_and_bad_name() -> None:
    assert decide_accel("tcg", "x86_64", WORKING) == AccelChoice("tcg", "TCG: requested")
    with pytest.raises(ConfigError, match="unknown accelerator 'hvf'"):
        decide_accel("hvf", "x86_64", WORKING)


def test_probe_payloads() -> None:
    bios = machine_probe.x86_probe_bios()
    assert len(bios) == 0x10000
    # mov al, 0x21; out 0xf4, al at the reset vector
    assert bios[0xFFF0:0xFFF4] == bytes([0xB0, 0x21, 0xE6, 0xF4])
    assert len(machine_probe.aarch64_probe_bios()) == 16
    cmd, expected = machine_probe.kvm_probe_command("x86_64", Path("/q"), Path("/p"), "kvm")
    assert expected == 67 and cmd[:3] == ["/q", "-M", "pc"] and "kvm" in cmd


# --------------------------------------------------------------------------- provisioning


def test_mmdebstrap_command() -> None:
    cmd = sysroot.mmdebstrap_command("/t/sysroot")
    assert cmd == [
        "mmdebstrap",
        "--variant=extract",
        "--include=qemu-system-x86,qemu-system-arm,qemu-utils",
        "--components=main",
        '--aptopt=Acquire::Check-Valid-Until "false"',
        '--aptopt=Acquire::Check-Date "false"',
        "sid",
        "/t/sysroot",
    ]


def test_wrapper_script_and_bundle_link() -> None:
    text = sysroot.wrapper_script("qemu-system-aarch64", "x86_64")
    assert text.startswith("#!/bin/sh\n")
    assert (
        'exec "$R/usr/lib64/ld-linux-x86-64.so.2" --library-path '
        '"$R/usr/lib/x86_64-linux-gnu" "$R/usr/bin/qemu-system-aarch64" "$@"' in text
    )
    assert sysroot.bundle_symlink("x86_64") == ("usr/lib/x86_64-linux-gnu/qemu-bundle", "../../..")
    with pytest.raises(ValueError, match="riscv64"):
        sysroot.host_layout("riscv64")


def test_changelog_version_and_stamp_round_trip() -> None:
    line = "qemu (1:11.1.3+ds-1) unstable; urgency=medium\n"
    assert sysroot.version_from_changelog(line) == "1:11.1.3+ds-1"
    assert sysroot.version_from_changelog("garbage") is None
    stamp = sysroot.Stamp("2026-01-01T00:00:00+00:00", "x86_64", packages={"qemu-utils": "1"})
    assert sysroot.Stamp.from_json(stamp.to_json()) == stamp
    with pytest.raises(ValueError, match="not a testbed QEMU stamp"):
        sysroot.Stamp.from_json("{}")


def test_provision_is_a_noop_on_a_complete_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stamped tree with wrappers and binaries: provision logs and returns, runs nothing."""
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path))
    monkeypatch.setattr(hq, "host_arch", lambda: "x86_64")
    root = tmp_path / "qemu"
    (root / "sysroot" / "usr" / "bin").mkdir(parents=True)
    for name, binary in sysroot.WRAPPED.items():
        (root / "sysroot" / "usr" / "bin" / binary).write_text("")
        (root / "bin").mkdir(exist_ok=True)
        (root / "bin" / name).write_text(sysroot.wrapper_script(binary, "x86_64"))
        (root / "bin" / name).chmod(0o755)
    (root / "stamp.json").write_text(sysroot.Stamp("t", "x86_64").to_json())
    lines: list[str] = []
    paths = hq.provision(log=lines.append)
    assert paths["aarch64"] == root / "bin" / "qemu-system-aarch64"
    assert len(lines) == 1 and lines[0].startswith("QEMU already provisioned")


def test_provision_without_mmdebstrap_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(hq, "host_arch", lambda: "x86_64")
    with pytest.raises(HostCapabilityError, match=r"mmdebstrap is not installed.*apt-get"):
        hq.provision(log=lambda _: None)
    assert not list(tmp_path.glob(".qemu-build-*"))  # nothing left behind


# --------------------------------------------------------------------------- debian


def test_package_list_parsing() -> None:
    text = "# header\n\nmmdebstrap     # builds the sysroot\nuidmap\n"
    pkgs = debian.parse_package_list(text)
    assert pkgs == [
        debian.HostPackage("mmdebstrap", "builds the sysroot"),
        debian.HostPackage("uidmap", ""),
    ]
    assert "mmdebstrap" in [p.name for p in debian.required_packages()]


def test_dpkg_query_parsing_and_install_commands() -> None:
    out = "mmdebstrap ii \nuidmap un \nlibc6:amd64 ii \n"
    assert debian.parse_dpkg_query(out) == {"mmdebstrap", "libc6"}
    assert debian.install_commands(["a"], have_lists=False)[0] == ["apt-get", "update", "-q"]
    assert debian.install_commands(["a", "b"], have_lists=True) == [
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "a", "b"]
    ]


def test_install_as_non_root_prints_the_command() -> None:
    with pytest.raises(HostCapabilityError, match="as root run: apt-get update && apt-get"):
        debian.install(["mmdebstrap"], is_root=False)


# --------------------------------------------------------------------------- doctor


def test_render_table_lists_fixes_and_verdict() -> None:
    report = doctor.Report(
        checks=[
            doctor.Check("python", doctor.OK, "3.11.7"),
            doctor.Check("qemu x86_64", doctor.FAIL, "none found", "run `testbed qemu provision`"),
        ]
    )
    text = doctor.render_table(report)
    assert "FAIL  qemu x86_64  none found" in text
    assert "  - qemu x86_64: run `testbed qemu provision`" in text
    assert "this host cannot run the suite" in text and not report.ok


def test_human_size() -> None:
    assert doctor.human_size(512) == "512 B"
    assert doctor.human_size(3 * 1024 * 1024) == "3.0 MiB"


# --------------------------------------------------------------------------- real QEMU


def _provisioned_or_skip(arch: str) -> Path:
    path = hq.provisioned_path(arch)
    if not os.access(path, os.X_OK):
        pytest.skip(f"no provisioned QEMU at {path}; run `testbed qemu provision`")
    return path


@pytest.mark.qemu
@pytest.mark.parametrize("guest_arch", hq.ARCHES)
def test_resolve_real_provisioned_qemu(guest_arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    arch = guest_arch
    path = _provisioned_or_skip(arch)
    monkeypatch.delenv(hq.env_var(arch), raising=False)
    # Uncached: really runs -version and the QMP query-version + qom-list-types session.
    facts = hq.probe_qemu(path, use_cache=False)
    assert facts.unsuitability() is None, facts
    assert facts.has_device and facts.version and facts.version >= (11, 1, 0)
    chosen = hq.resolve_qemu(arch, str(path))
    assert chosen.path == path and chosen.source == SOURCE_EXPLICIT
    assert chosen.version == facts.version


@pytest.mark.qemu
@pytest.mark.parametrize("guest_arch", hq.ARCHES)
def test_probe_payload_runs_under_tcg(guest_arch: str) -> None:
    """The KVM probe's payload is real guest code: under TCG it must make QEMU exit as planned."""
    arch = guest_arch
    path = _provisioned_or_skip(arch)
    verdict = machine_probe.run_kvm_probe(arch, path, "tcg", accel.PROBE_TIMEOUT)
    assert verdict.works, verdict.detail


@pytest.mark.qemu
def test_doctor_json_shape() -> None:
    _provisioned_or_skip("x86_64")
    data = doctor.collect(shmem_probe=False).to_json()
    assert data["qemu"]["x86_64"]["version"]
    assert "path" in data["qemu"]["aarch64"]
    assert isinstance(data["accel"]["kvm"]["usable"], bool) and data["accel"]["kvm"]["reason"]
    assert data["cache_dir"]
