"""Faults(hang_up_on_channel_close): the back-end closes its main connection when QEMU
closes the back-end channel (what the relay did before 9d0b7d2, and what makes QEMU 11.1.3
segfault on hot-unplug: scenarios/test_hotplug.py). A scripted front-end, no QEMU."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.device import ShmemLayout
from testbed.errors import PeerClosed
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user.backend import Backend, DisconnectKind
from testbed.vhost_user.backend.offer import BASE_PROTOCOL_FEATURES
from testbed.vhost_user.codes import ProtocolFeature, Request
from testbed.vhost_user.connection import Connection, connect
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import U64, Header

TIMEOUT = 10.0
OFFER = int(BASE_PROTOCOL_FEATURES | ProtocolFeature.SHMEM)
HANG_UP = Faults(hang_up_on_channel_close=True)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = make_private_dir("test-fault-channel")
    yield path
    remove_tree(path)


def _give_channel(fe: Connection) -> socket.socket:
    """Negotiate and hand the back-end its channel; returns the front-end's end."""
    fe.send(Header.make(Request.SET_PROTOCOL_FEATURES, 8), U64(OFFER).pack())
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        fe.send(Header.make(Request.SET_BACKEND_REQ_FD, 0, need_reply=True), b"", [theirs.fileno()])
    with fe.recv() as ack:
        assert U64.unpack(ack.body).value == 0
    return ours


def _features(fe: Connection) -> int:
    fe.send(Header.make(Request.GET_FEATURES, 0))
    with fe.recv() as reply:
        return U64.unpack(reply.body).value


def test_the_channel_closing_hangs_up_the_main_connection(sockdir: Path) -> None:
    with (
        Backend(sockdir / "vu.sock", ShmemLayout({0: 4096}), faults=HANG_UP) as backend,
        connect(sockdir / "vu.sock", TIMEOUT) as fe,
    ):
        fe.settimeout(TIMEOUT)
        ours = _give_channel(fe)
        assert _features(fe), "the session works while the channel is open"
        ours.close()  # QEMU's unrealize: the channel first
        assert backend.wait_disconnected(TIMEOUT) is DisconnectKind.LOCAL
        with pytest.raises(PeerClosed):
            fe.recv()


def test_data_on_the_channel_is_not_a_hang_up(sockdir: Path) -> None:
    """A reply on its way to map() keeps the channel readable: not an end of it (and the
    back-end polls it, it does not spin)."""
    with Backend(sockdir / "vu.sock", ShmemLayout({0: 4096}), faults=HANG_UP) as backend:
        with connect(sockdir / "vu.sock", TIMEOUT) as fe:
            fe.settimeout(TIMEOUT)
            ours = _give_channel(fe)
            with ours:
                ours.sendall(Header.make(Request.GET_FEATURES, 8, reply=True).pack() + bytes(8))
                assert _features(fe) and _features(fe), "the session goes on"
        assert backend.wait_disconnected(TIMEOUT) is DisconnectKind.CLEAN, "not the fault's"


def test_without_the_fault_the_channel_ends_alone(sockdir: Path) -> None:
    with Backend(sockdir / "vu.sock", ShmemLayout({0: 4096})) as backend:
        with connect(sockdir / "vu.sock", TIMEOUT) as fe:
            fe.settimeout(TIMEOUT)
            _give_channel(fe).close()
            assert _features(fe), "the main connection goes on"
        assert backend.wait_disconnected(TIMEOUT) is DisconnectKind.CLEAN


def test_the_fault_is_off_by_default() -> None:
    assert not Faults().hang_up_on_channel_close
    assert HANG_UP.active
