"""The back-end's conformance rules (pure) and how the dispatcher flags a violation without
changing its answer (a scripted front-end over a real socket)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.device import ShmemLayout
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.backend.offer import BASE_PROTOCOL_FEATURES, DEVICE_FEATURES
from testbed.vhost_user.codes import ProtocolFeature, Request
from testbed.vhost_user.connection import connect
from testbed.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    U64,
    Header,
    MemoryRegion,
    MemoryTable,
    Payload,
    ShMemConfig,
    VringFile,
    VringState,
)
from testbed.vhost_user.rules import NEEDS, Negotiation, Violation, check_request

R = Request
P = ProtocolFeature
OFFER = int(BASE_PROTOCOL_FEATURES | P.SHMEM)
# What QEMU 11.1.3 acks of our default offer: all of it.
AGREED = Negotiation(int(DEVICE_FEATURES), int(DEVICE_FEATURES), OFFER, OFFER)
NOTHING_ACKED = Negotiation(int(DEVICE_FEATURES), 0, OFFER, 0)


def rules_broken(
    request: Request,
    n: Negotiation = AGREED,
    *,
    nfds: int = 0,
    payload: Payload | None = None,
    need_reply: bool = False,
    is_reply: bool = False,
) -> list[str]:
    found = check_request(
        request, need_reply=need_reply, is_reply=is_reply, nfds=nfds, payload=payload, n=n
    )
    assert all(v.request == request.name for v in found)
    return [v.rule for v in found]


def test_qemu_realize_handshake_breaks_no_rule() -> None:
    """The sequence QEMU 11.1.3 sends at realize (trace-confirmed), flags and fds as sent."""
    before = Negotiation(int(DEVICE_FEATURES), 0, OFFER, 0)
    assert rules_broken(R.GET_FEATURES, before) == []
    assert rules_broken(R.GET_PROTOCOL_FEATURES, before) == []
    assert rules_broken(R.SET_PROTOCOL_FEATURES, before, payload=U64(OFFER)) == []
    assert rules_broken(R.GET_QUEUE_NUM) == []
    assert rules_broken(R.SET_BACKEND_REQ_FD, nfds=1, need_reply=True) == []
    assert rules_broken(R.SET_OWNER) == []
    call = VringFile(0, nofd=False)
    assert rules_broken(R.SET_VRING_CALL, nfds=1, payload=call, need_reply=True) == []
    assert rules_broken(R.GET_SHMEM_CONFIG) == []
    assert rules_broken(R.SET_FEATURES, payload=U64(int(DEVICE_FEATURES))) == []
    assert rules_broken(R.SET_STATUS, payload=U64(0xB), need_reply=True) == []


WITHOUT = Negotiation(int(DEVICE_FEATURES), int(DEVICE_FEATURES), OFFER, int(P.REPLY_ACK))


@pytest.mark.parametrize(
    ("request_", "needs"),
    [
        (R.GET_SHMEM_CONFIG, P.SHMEM),
        (R.GET_CONFIG, P.CONFIG),
        (R.SET_CONFIG, P.CONFIG),
        (R.SET_BACKEND_REQ_FD, P.BACKEND_REQ),
        (R.ADD_MEM_REG, P.CONFIGURE_MEM_SLOTS),
        (R.REM_MEM_REG, P.CONFIGURE_MEM_SLOTS),
        (R.GET_MAX_MEM_SLOTS, P.CONFIGURE_MEM_SLOTS),
        (R.RESET_DEVICE, P.RESET_DEVICE),
        (R.SET_STATUS, P.STATUS),
        (R.GET_STATUS, P.STATUS),
        (R.GET_INFLIGHT_FD, P.INFLIGHT_SHMFD),
        (R.SET_INFLIGHT_FD, P.INFLIGHT_SHMFD),
    ],
)
def test_a_request_needs_its_feature_negotiated(request_: Request, needs: P) -> None:
    assert NEEDS[request_].feature is needs and not NEEDS[request_].offered
    assert "feature" in rules_broken(request_, WITHOUT)
    agreed = Negotiation(0, 0, int(needs), int(needs))
    assert "feature" not in rules_broken(request_, agreed)
    # Acked but never offered is not negotiated.
    assert "feature" in rules_broken(request_, Negotiation(0, 0, 0, int(needs)))


def test_protocol_feature_requests_need_the_device_bit_offered() -> None:
    no_bit = Negotiation(offered_features=int(DEVICE_FEATURES) & ~(1 << 30))
    for request in (R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES):
        assert rules_broken(request, no_bit) == ["feature"]
        # Offered is enough: QEMU asks before SET_FEATURES acks anything.
        assert rules_broken(request, NOTHING_ACKED) == []
    assert rules_broken(R.GET_QUEUE_NUM, Negotiation(offered_protocol=int(P.MQ))) == []
    assert rules_broken(R.GET_QUEUE_NUM, Negotiation(acked_protocol=int(P.MQ))) == ["feature"]


def test_acking_what_was_not_offered() -> None:
    broken = rules_broken(R.SET_PROTOCOL_FEATURES, NOTHING_ACKED, payload=U64(OFFER | 1 << 9))
    assert broken == ["ack"]
    assert rules_broken(R.SET_FEATURES, payload=U64(1 << 26 | 1 << 32)) == ["ack"]


def test_need_reply_only_with_reply_ack() -> None:
    assert rules_broken(R.SET_OWNER, WITHOUT, need_reply=True) == []
    assert rules_broken(R.SET_OWNER, NOTHING_ACKED, need_reply=True) == ["need-reply"]
    # A request with a reply of its own may always carry NEED_REPLY.
    assert rules_broken(R.GET_FEATURES, NOTHING_ACKED, need_reply=True) == []
    assert rules_broken(R.SET_OWNER, is_reply=True) == ["reply-flag"]


def test_fd_counts() -> None:
    region = MemoryRegion(0, 4096, 0, 0)
    table = MemoryTable((region, region))
    assert rules_broken(R.SET_MEM_TABLE, nfds=2, payload=table) == []
    assert rules_broken(R.SET_MEM_TABLE, nfds=1, payload=table) == ["fds"]
    assert rules_broken(R.SET_VRING_KICK, nfds=1, payload=VringFile(0, nofd=True)) == ["fds"]
    assert rules_broken(R.SET_VRING_KICK, nfds=0, payload=VringFile(0, nofd=False)) == ["fds"]
    assert rules_broken(R.SET_BACKEND_REQ_FD, nfds=0) == ["fds"]
    assert rules_broken(R.GET_FEATURES, nfds=1) == ["fds"]
    # Undecodable payload: no count to hold it to (the dispatcher drops it anyway).
    assert rules_broken(R.SET_MEM_TABLE, nfds=3, payload=None) == []
    assert rules_broken(R.SET_LOG_BASE, nfds=0) == []
    logging = Negotiation(0, 0, int(P.LOG_SHMFD), int(P.LOG_SHMFD))
    assert rules_broken(R.SET_LOG_BASE, logging, nfds=1) == []


def test_rings_beyond_the_queue_count_we_announced() -> None:
    """Once the back-end answered GET_QUEUE_NUM with N, a request for ring N or above uses
    a queue it said it does not have; before the question (or without MQ) nothing is
    known, so nothing is flagged."""
    two = dataclasses.replace(AGREED, queues=2)
    assert rules_broken(R.SET_VRING_CALL, two, nfds=1, payload=VringFile(1, nofd=False)) == []
    assert rules_broken(R.SET_VRING_NUM, two, payload=VringState(1, 64)) == []
    assert rules_broken(R.SET_VRING_ENABLE, two, payload=VringState(2, 1)) == ["queue-count"]
    assert rules_broken(R.SET_VRING_ERR, two, nfds=1, payload=VringFile(2, nofd=False)) == [
        "queue-count"
    ]
    assert rules_broken(R.GET_VRING_BASE, two, payload=VringState(5, 0)) == ["queue-count"]
    assert rules_broken(R.SET_VRING_ENABLE, AGREED, payload=VringState(9, 1)) == []


def test_violation_json() -> None:
    v = Violation("GET_SHMEM_CONFIG", "feature", "sent without PROTOCOL_F_SHMEM negotiated")
    assert v.to_json() == {"request": v.request, "rule": "feature", "detail": v.detail}


# --- flagged, and answered as before -----------------------------------------------------


@pytest.fixture
def private_dir() -> Iterator[Path]:
    path = make_private_dir("test-dispatch")
    yield path
    remove_tree(path)


def test_a_violation_is_flagged_and_still_answered(private_dir: Path) -> None:
    path = private_dir / "vu.sock"
    trace = private_dir / "trace.jsonl"
    with Backend(path, ShmemLayout({1: 4096 * 4}), trace_path=trace) as backend:
        with connect(path, 5.0) as fe:
            # Asked before SET_PROTOCOL_FEATURES acked SHMEM: flagged, answered all the same.
            fe.send(Header.make(R.GET_SHMEM_CONFIG, 0), b"")
            reply = fe.recv()
            assert reply.header.flags == 0x5
            assert ShMemConfig.unpack(reply.body).regions == {1: 16384}
            fe.send(Header.make(R.SET_PROTOCOL_FEATURES, 8), U64(OFFER).pack())
            # NEED_REPLY with REPLY_ACK negotiated: no violation, the ack as always.
            fe.send(Header.make(R.SET_OWNER, 0, need_reply=True), b"")
            assert U64.unpack(fe.recv().body) == U64(0)
            raw = Header(R.SET_OWNER, 0x1 | FLAG_REPLY | FLAG_NEED_REPLY, 0)
            fe.send(raw, b"")
            assert U64.unpack(fe.recv().body) == U64(0)
        backend.wait_disconnected(5.0)
        assert backend.violations == [
            Violation("GET_SHMEM_CONFIG", "feature", "sent without PROTOCOL_F_SHMEM negotiated"),
            Violation("SET_OWNER", "reply-flag", "a request with the REPLY flag set"),
        ]
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    flagged = [
        (e["name"], [v["rule"] for v in e["violations"]]) for e in lines if "violations" in e
    ]
    assert flagged == [("GET_SHMEM_CONFIG", ["feature"]), ("SET_OWNER", ["reply-flag"])]
    entry = next(e for e in backend.trace.entries() if e.violations)
    assert "VIOLATION feature: sent without PROTOCOL_F_SHMEM" in entry.one_line()
