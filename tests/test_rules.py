"""The vhost-user spec's rules (testbed.vhost_user.rules, pure): the checks the relay runs on
a back-end we did not write, and the SHMEM_MAP/UNMAP range rules the relay and the fuzzer's
oracle share. (check_request, the front-end side, is tested in tests/test_dispatch.py.)"""

from __future__ import annotations

import pytest

from testbed.vhost_user.codes import BackendRequest, ProtocolFeature, Request
from testbed.vhost_user.protocol import FLAG_REPLY, U64, VERSION, Header, MMap, ShMemConfig
from testbed.vhost_user.rules import (
    OLD_SHMEM_DETAIL,
    SHMEM,
    SPEC,
    MapRule,
    check_channel_reply,
    check_channel_request,
    check_offer,
    check_reply,
    expects_reply,
    header_violations,
    shmem_map_fds,
    shmem_map_problems,
)

MAP = BackendRequest.SHMEM_MAP
UNMAP = BackendRequest.SHMEM_UNMAP
PAGE = 4096
U64_MAX = (1 << 64) - 1
REGIONS = {0: 8 * PAGE, 3: 4 * PAGE}


# --- the relay's checks -------------------------------------------------------------------


def test_bit_21_is_reported_by_name() -> None:
    (v,) = check_offer(1 << 21)
    assert v.detail == OLD_SHMEM_DETAIL
    assert check_offer(SHMEM) == []
    assert check_offer((1 << 21) | SHMEM) == []


def test_reply_checks() -> None:
    req = Header.make(Request.GET_FEATURES, 0)
    good = Header.make(Request.GET_FEATURES, 8, reply=True)
    assert check_reply(req, good, U64(1).pack(), 0) == []
    rules = {v.rule for v in check_reply(req, Header(1, 1, 4), b"\0" * 4, 1)}
    assert rules == {"reply-flag", "reply-size", "fds"}
    assert check_reply(None, good, U64(1).pack(), 0)[0].rule == "unsolicited"
    other = Header.make(Request.GET_QUEUE_NUM, 8, reply=True)
    assert check_reply(req, other, U64(1).pack(), 0)[0].rule == "reply-order"
    bad_config = ShMemConfig(2, ShMemConfig.from_regions({0: 4096}).sizes).pack()
    shm_req = Header.make(Request.GET_SHMEM_CONFIG, 0)
    shm_reply = Header.make(Request.GET_SHMEM_CONFIG, len(bad_config), reply=True)
    assert [v.rule for v in check_reply(shm_req, shm_reply, bad_config, 0)] == ["shmem-config"]


def test_expects_reply() -> None:
    assert expects_reply(Header.make(Request.GET_FEATURES, 0), 0)
    set_owner = Header.make(Request.SET_OWNER, 0, need_reply=True)
    assert not expects_reply(set_owner, 0)
    assert expects_reply(set_owner, int(ProtocolFeature.REPLY_ACK))
    assert not expects_reply(Header(999, VERSION, 0), int(ProtocolFeature.REPLY_ACK))


def test_shmem_map_checks() -> None:
    acked = SHMEM | int(ProtocolFeature.REPLY_ACK)
    body = MMap(0, 0, 0, 4096, 1).pack()
    head = Header.make(BackendRequest.SHMEM_MAP, len(body), need_reply=True)
    assert check_channel_request(head, body, 1, acked, {0: 8192}) == []
    found = check_channel_request(head, body, 0, int(ProtocolFeature.REPLY_ACK), {1: 8192})
    assert {v.rule for v in found} == {"feature", "fds", "shmem-map"}
    beyond = MMap(0, 0, 4096, 8192, 1).pack()
    (v,) = check_channel_request(head, beyond, 1, acked, {0: 8192})
    assert v.rule == "shmem-map" and "beyond" in v.detail
    unmap = Header.make(BackendRequest.SHMEM_UNMAP, len(body), need_reply=True)
    assert [v.rule for v in check_channel_request(unmap, body, 1, acked, {0: 8192})] == ["fds"]


def test_channel_request_payload_and_header_rules() -> None:
    acked = SHMEM | int(ProtocolFeature.REPLY_ACK)
    head = Header.make(MAP, 8, need_reply=True)
    (v,) = check_channel_request(head, b"\0" * 8, 1, acked, {0: 8192})
    assert v.rule == "payload"
    body = MMap(0, 0, 0, 4096, 1).pack()
    as_reply = Header(MAP, VERSION | FLAG_REPLY, len(body))
    assert [v.rule for v in check_channel_request(as_reply, body, 1, acked, {0: 8192})] == [
        "reply-flag"
    ]
    no_ack = Header.make(BackendRequest.CONFIG_CHANGE_MSG, 0, need_reply=True)
    assert [v.rule for v in check_channel_request(no_ack, b"", 0, 0, None)] == ["need-reply"]


def test_header_violations() -> None:
    assert header_violations(Header.make(Request.GET_FEATURES, 0), backend_channel=False) == []
    (unknown,) = header_violations(Header(999, VERSION, 0), backend_channel=False)
    assert (unknown.request, unknown.rule) == ("UNKNOWN_999", "unknown-request")
    (version,) = header_violations(Header(Request.GET_FEATURES, 2, 0), backend_channel=False)
    assert version.rule == "header" and "version 2" in version.detail
    (reserved,) = header_violations(Header(MAP, VERSION | 0x100, 0), backend_channel=True)
    assert (reserved.request, reserved.rule) == ("SHMEM_MAP", "header")


def test_channel_reply_checks() -> None:
    request = Header.make(MAP, 40, need_reply=True)
    good = Header(MAP, VERSION | FLAG_REPLY, 8)
    assert check_channel_reply(request, good, U64(0).pack(), 0) == []
    assert [v.rule for v in check_channel_reply(None, good, U64(0).pack(), 0)] == ["unsolicited"]
    wrong = Header(UNMAP, VERSION | FLAG_REPLY, 4)
    rules = [v.rule for v in check_channel_reply(request, wrong, b"\0" * 4, 1)]
    assert rules == ["reply-order", "reply-size", "fds"]


# --- SHMEM_MAP / SHMEM_UNMAP against the served config ---------------------------------


def rules_of(request: int = MAP, **fields: int) -> list[MapRule]:
    mapped = fields.pop("mapped", None)
    args = {"shmid": 0, "shm_offset": 0, "length": PAGE, "fd_offset": 0, **fields}
    live = {0: [(2 * PAGE, 2 * PAGE)]} if mapped else None
    return [
        p.rule
        for p in shmem_map_problems(
            request, args["shmid"], args["shm_offset"], args["length"], args["fd_offset"],
            REGIONS, live,
        )
    ]  # fmt: skip


def test_a_sound_map_and_unmap_break_no_range_rule() -> None:
    assert rules_of() == []
    assert rules_of(UNMAP) == []
    assert rules_of(shmid=3, shm_offset=3 * PAGE, length=PAGE) == []
    assert rules_of(shm_offset=0, length=8 * PAGE) == []  # the whole region


@pytest.mark.parametrize("request_", [MAP, UNMAP], ids=["map", "unmap"])
def test_shmid_not_served(request_: int) -> None:
    (problem,) = shmem_map_problems(request_, 7, 0, 0, U64_MAX, REGIONS, {})
    assert problem.rule is MapRule.SHMID  # nothing else is judged without a region
    assert "shmid 7 is not in the served config" in problem.detail


@pytest.mark.parametrize("request_", [MAP, UNMAP], ids=["map", "unmap"])
def test_length_zero(request_: int) -> None:
    assert rules_of(request_, length=0) == [MapRule.LENGTH]


@pytest.mark.parametrize("request_", [MAP, UNMAP], ids=["map", "unmap"])
def test_range_past_the_region(request_: int) -> None:
    assert rules_of(request_, shm_offset=7 * PAGE, length=2 * PAGE) == [MapRule.RANGE]
    assert rules_of(request_, shm_offset=U64_MAX - PAGE + 1, length=PAGE) == [MapRule.RANGE]
    (problem,) = shmem_map_problems(request_, 3, PAGE, 4 * PAGE, 0, REGIONS)
    assert problem.detail == "range 0x1000+0x4000 beyond region 3 of 0x4000 bytes"


def test_fd_range_overflow_is_a_map_rule() -> None:
    # The end of the fd range reaching 2**64 wraps around in QEMU's u64 sum.
    assert rules_of(fd_offset=U64_MAX - PAGE + 1) == [MapRule.FD_RANGE]
    assert rules_of(fd_offset=U64_MAX - 2 * PAGE + 1) == []
    assert rules_of(UNMAP, fd_offset=U64_MAX) == []  # an UNMAP has no file


def test_overlap_with_a_live_mapping() -> None:
    assert rules_of(shm_offset=3 * PAGE, length=PAGE, mapped=True) == [MapRule.OVERLAP]
    assert rules_of(shm_offset=PAGE, length=2 * PAGE, mapped=True) == [MapRule.OVERLAP]
    assert rules_of(shm_offset=0, length=2 * PAGE, mapped=True) == []  # touching, not over
    assert rules_of(shm_offset=4 * PAGE, length=PAGE, mapped=True) == []
    assert rules_of(shm_offset=3 * PAGE, length=PAGE) == []  # mappings not tracked
    assert rules_of(UNMAP, shm_offset=2 * PAGE, length=2 * PAGE, mapped=True) == []


@pytest.mark.parametrize(
    "field, value", [("shm_offset", 1), ("length", PAGE + 0x800), ("fd_offset", PAGE - 1)]
)
def test_a_map_is_page_aligned(field: str, value: int) -> None:
    # SPEC[ALIGN]: the front-end mmap(2)s the fd; mmap's offset and address are page multiples.
    f = {"shm_offset": 0, "length": PAGE, "fd_offset": 0, field: value}
    (problem,) = shmem_map_problems(MAP, 0, f["shm_offset"], f["length"], f["fd_offset"], REGIONS)
    assert problem.rule is MapRule.ALIGN and problem.detail.startswith(field)
    assert "mmap(2)" in SPEC[MapRule.ALIGN]


def test_an_unmap_names_a_whole_live_mapping() -> None:
    # SPEC[WHOLE]: "the given range shall correspond to the entirety of a valid mapped region"
    assert rules_of(UNMAP, shm_offset=2 * PAGE, length=PAGE, mapped=True) == [MapRule.WHOLE]
    assert rules_of(UNMAP, shm_offset=0, length=4 * PAGE, mapped=True) == [MapRule.WHOLE]
    assert rules_of(UNMAP, shm_offset=2 * PAGE, length=PAGE) == []  # mappings not tracked
    assert "entirety" in SPEC[MapRule.WHOLE]


def test_overlap_is_judged_only_for_a_range_inside_the_region() -> None:
    assert rules_of(shm_offset=3 * PAGE, length=0, mapped=True) == [MapRule.LENGTH]
    assert rules_of(shm_offset=3 * PAGE, length=8 * PAGE, mapped=True) == [MapRule.RANGE]


def test_rules_come_in_order() -> None:
    found = rules_of(shm_offset=7 * PAGE, length=2 * PAGE, fd_offset=U64_MAX)
    assert found == [MapRule.RANGE, MapRule.FD_RANGE, MapRule.ALIGN]


def test_shmem_map_fds() -> None:
    assert shmem_map_fds(MAP) == 1
    assert shmem_map_fds(UNMAP) == 0
