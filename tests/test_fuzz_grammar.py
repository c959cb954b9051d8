"""The fuzzer's pure parts: generation (deterministic per seed), the case format, the wire
encoding, the oracles, triage (signatures, the registry), delta debugging, draft entries."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from testbed.bugs import Bug
from testbed.bugs.signature import crash_site
from testbed.fuzz.generator import generate
from testbed.fuzz.grammar import (
    PATHS,
    Action,
    BodyKind,
    Case,
    ReplyKind,
    ShmemConfig,
    State,
    encode,
    states_for,
)
from testbed.fuzz.oracle import MapModel
from testbed.fuzz.player import fd_kind
from testbed.fuzz.result import Observation, PlayResult
from testbed.fuzz.triage import ddmin, draft_entry, evidence, findings, slug
from testbed.vhost_user.codes import BackendRequest
from testbed.waiting import Deadline

M = 1 << 20
MAP, UNMAP = int(BackendRequest.SHMEM_MAP), int(BackendRequest.SHMEM_UNMAP)


def test_generation_is_deterministic_per_seed() -> None:
    a = [generate("x86_64", 7, i) for i in range(50)]
    b = [generate("x86_64", 7, i) for i in range(50)]
    assert a == b
    assert a != [generate("x86_64", 8, i) for i in range(50)]


def test_generated_cases_cover_the_grammar() -> None:
    cases = [generate("x86_64", 1, i) for i in range(400)]
    assert {c.last_state for c in cases} == {s.value for s in State}
    assert {a.request for c in cases for a in c.actions} >= {MAP, UNMAP, 2, 3, 6, 7, 8}
    assert {m.kind for c in cases for m in c.replies} >= {k.value for k in ReplyKind} - {"lie"}
    assert {c.offer.shmem_bit for c in cases} >= {20, 21, 22, None}
    for case in cases:
        order = [s.value for s in case.path]
        assert [order.index(a.state) for a in case.actions] == sorted(
            order.index(a.state) for a in case.actions
        )


def test_aarch64_has_no_device_del_state() -> None:
    assert State.DURING_DEVICE_DEL not in states_for("aarch64")
    cases = [generate("aarch64", 3, i) for i in range(200)]
    assert all(c.last_state != State.DURING_DEVICE_DEL for c in cases)


def test_paths_start_before_driver_ok() -> None:
    for state, path in PATHS.items():
        assert path[0] is State.BEFORE_DRIVER_OK and path[-1] is state


def test_case_json_round_trip() -> None:
    for i in range(100):
        case = generate("x86_64", 5, i)
        assert Case.from_json(case.to_json()) == case


def test_encode_keeps_the_header_and_the_bytes_in_step() -> None:
    fields = {"shmid": 1, "fd_offset": 0, "shm_offset": 4096, "length": M, "flags": 1}
    header, body = encode(Action("after-driver-ok", MAP, BodyKind.MMAP, fields))
    assert (header.request, header.flags, header.size, len(body)) == (MAP, 0x9, 40, 40)
    assert body[0] == 1 and body[8:16] == bytes(8)
    header, body = encode(Action("after-driver-ok", MAP, BodyKind.MMAP, fields, size_delta=-8))
    assert header.size == len(body) == 32
    header, body = encode(Action("after-driver-ok", MAP, BodyKind.MMAP, fields, size_delta=8))
    assert header.size == len(body) == 48 and body[40:] == bytes(8)
    header, body = encode(Action("after-driver-ok", 2, BodyKind.EMPTY))
    assert header.size == 0 and body == b""


def test_config_problems() -> None:
    assert ShmemConfig({0: 2 * M, 1: 2 * M}).problems(False) == []
    assert ShmemConfig({}).problems(False) == []
    assert (
        "truncated GET_SHMEM_CONFIG reply" in ShmemConfig({0: M}, truncate=100).problems(False)[0]
    )
    assert ShmemConfig({0: M}, nregions=2).problems(False) == ["nregions 2 with 1 non-zero size"]
    assert ShmemConfig({0: 4 * M, 1: 16 * M}).problems(False)[0].startswith("total")
    assert ShmemConfig({0: M, 1: M}).problems(True) == ["2 regions, 1 capabilities fit"]


def _map(**fields: int) -> Action:
    base = {"shmid": 0, "fd_offset": 0, "shm_offset": 0, "length": M, "flags": 1}
    return Action("after-driver-ok", MAP, BodyKind.MMAP, {**base, **fields}, fds=(f"memfd:{M}",))


def _problems(model: MapModel, action: Action) -> list[str]:
    header, body = encode(action)
    judged = model.problems(action, header, body)
    assert all(j.spec for j in judged), "every oracle quotes the spec"
    return [j.text for j in judged]


def test_map_oracle() -> None:
    model = MapModel(ShmemConfig({0: 2 * M, 1: 2 * M}), started=True)
    good = _map()
    assert _problems(model, good) == []
    assert model.judgeable(good)
    assert _problems(model, _map(flags=0xF0)) == ["SHMEM_MAP ignores unknown flag bits (0xf0)"]
    short = Action(good.state, MAP, BodyKind.MMAP, good.fields, size_delta=-8, fds=good.fds)
    assert _problems(model, short) == ["SHMEM_MAP with a 32-byte payload is mapped"]
    assert "not in the config" in _problems(model, _map(shmid=7))[0]
    assert "past the end" in _problems(model, _map(shm_offset=2 * M))[0]
    model.apply(good)
    assert _problems(model, _map(shm_offset=4096)) == [
        "SHMEM_MAP overlapping a live mapping accepted"
    ]
    unmap = Action(good.state, UNMAP, BodyKind.MMAP, {**good.fields, "flags": 0})
    assert _problems(model, unmap) == [] and model.judgeable(unmap)
    model.apply(unmap)
    assert model.mapped == {0: []}
    # A config QEMU should have refused: verdicts are not judged.
    assert _problems(MapModel(ShmemConfig({0: M}, nregions=3)), _map(flags=0xF0)) == []


def test_crash_site_prefers_the_assertion_then_the_kernel_log() -> None:
    stderr = (
        "qemu-system-x86_64: ../hw/pci/pci.c:1: pci_add_capability: Assertion `offset' failed.\n"
    )
    assert crash_site(stderr, {}) == "pci_add_capability: Assertion `offset' failed"
    assert crash_site("", {"binary": "qemu-system-x86_64", "offset": "87e9a3"}) == (
        "qemu-system-x86_64+0x87e9a3"
    )


def _result(**kwargs: Any) -> PlayResult:
    return PlayResult(generate("x86_64", 1, 0), **kwargs)


def test_triage_matches_the_registry() -> None:
    segv = _result(
        returncode=-11,
        died_in="SHMEM_MAP@before-driver-ok",
        segfault={"binary": "qemu-system-x86_64", "offset": "87e9a3"},
    )
    [f] = findings(segv)
    assert f.signature == "signal:SIGSEGV qemu-system-x86_64+0x87e9a3 (SHMEM_MAP)"
    assert f.known == "shmem-map-stopped-device-segfault"
    # A silent segfault without a site is no registered bug; elsewhere, with that site, it is.
    siteless = _result(returncode=-11, died_in="SHMEM_MAP@after-driver-ok", segfault={})
    assert findings(siteless)[0].known is None
    late = _result(
        returncode=-11,
        died_in="IOTLB_MSG@device-reset",
        segfault={"binary": "qemu-system-x86_64", "offset": "87e9a3"},
    )
    assert findings(late)[0].known == "shmem-map-stopped-device-segfault"
    abort = _result(
        returncode=-6,
        died_in="realize:GET_SHMEM_CONFIG",
        stderr="Failed to set msg fds\nvub_get_features: assertion failed: (backend_features)\n",
    )
    assert findings(abort)[0].known == "vub-get-features-abort"
    # A clean refusal at realize is not a finding.
    assert findings(_result(returncode=1, died_in="realize:GET_SHMEM_CONFIG")) == []
    silent = _result(
        observations=[
            Observation("accepted", "SHMEM_MAP ignores unknown flag bits (0xf0)", "x", "SHMEM_MAP")
        ]
    )
    [f] = findings(silent)
    assert f.known == "shmem-map-unknown-flags-accepted"
    assert f.signature == "accepted: SHMEM_MAP ignores unknown flag bits (N)"


def test_ddmin_finds_the_one_culprit() -> None:
    budget = [100]
    assert ddmin(list(range(10)), lambda xs: 7 in xs, budget) == [7]
    budget = [100]
    assert ddmin(list(range(10)), lambda xs: 2 in xs and 5 in xs, budget) == [2, 5]
    budget = [100]
    assert ddmin([1, 2], lambda xs: True, budget) == []


@pytest.mark.parametrize("kind", ["crash", "silent"])
def test_draft_entry_is_a_valid_registry_entry(kind: str) -> None:
    from testbed.fuzz.triage import Finding

    if kind == "crash":
        f = Finding(
            "crash",
            "signal:SIGABRT vhost_dev_start: Assertion `hdev->vhost_ops' failed",
            "enter:after-reconnect",
            "vhost_dev_start: Assertion `hdev->vhost_ops' failed\nQEMU exited",
            "signal:SIGABRT",
        )
    else:
        f = Finding("silent", "bar4: x", "@realize", "device realized with BAR 4 size None")
    text = draft_entry(f, generate("x86_64", 1, 3), "11.1.3", slug(f.signature))
    [raw] = tomllib.loads(text)["bug"]
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    bug = Bug(**fields)
    assert bug.matches(evidence([f], bug))


def test_map_oracle_without_shmem_negotiated() -> None:
    model = MapModel(ShmemConfig({0: 2 * M}), started=True, negotiated=False)
    assert not model.judgeable(_map())  # a refusal is right
    assert _problems(model, _map()) == ["SHMEM_MAP accepted without SHMEM negotiated"]
    untrusted = MapModel(ShmemConfig({0: 2 * M}), started=True, negotiated=False, trusted=False)
    assert _problems(untrusted, _map()) == []


def test_after_reconnect_is_entered_every_way_and_round_trips() -> None:
    from testbed.fuzz.grammar import RECONNECT_MODES, RECONNECT_PATHS

    cases = [generate("aarch64", 5, i) for i in range(600)]
    reconnects = [c for c in cases if c.reconnects]
    assert {c.reconnect for c in reconnects} == set(RECONNECT_MODES)
    assert any(a.state == State.AFTER_RECONNECT for c in reconnects for a in c.actions)
    for c in reconnects:
        assert c.path == RECONNECT_PATHS[c.reconnect]
        assert Case.from_json(json.loads(c.dumps())) == c
    # A case written before the modes existed hung up under the started device.
    old = reconnects[0].to_json()
    del old["reconnect"]
    assert Case.from_json(old).reconnect == "live"


def test_fd_growth_is_a_leak_finding_and_summed(tmp_path: Path) -> None:
    from testbed.fuzz.run import Campaign, table

    campaign = Campaign("x86_64", Path("/q"), "11.1.3", 1, 60.0, tmp_path, minimise=False)
    clean = generate("x86_64", 1, 0)
    no_time = Deadline(0.0)
    campaign._account(clean, PlayResult(clean, fds_before=20, fds_after=20), no_time)
    grown = generate("x86_64", 1, 1)
    text = "QEMU holds 2 more fd(s) after the case than before it (replies bent: X)"
    result = PlayResult(grown, fds_before=20, fds_after=22)
    result.observations.append(Observation("leak", text, "after-driver-ok", "X"))
    campaign._account(grown, result, no_time)
    summary = campaign.summary()
    assert summary["fds"] == {
        "cases_counted": 2,
        "before_total": 40,
        "after_total": 42,
        "growth_total": 2,
        "cases_grown": 1,
        "max_growth": 2,
    }
    [sig] = summary["signatures"]
    assert sig["kind"] == "leak" and "N more fd(s)" in sig["signature"]
    assert json.loads((Path(sig["directory"]) / "finding.json").read_text())["fds_after"] == 22
    assert "growth +2 in 1 case(s)" in table(summary)


def test_fd_kinds_name_what_grew_without_numbers() -> None:
    assert fd_kind("/memfd:testbed-fuzz (deleted)") == "the back-end's memfd"
    assert fd_kind("anon_inode:[eventfd]") == "eventfd"
    assert fd_kind("socket:[1234]") == "socket"
    assert fd_kind("/memfd:pc.ram (deleted)") == "/memfd:pc.ram"
