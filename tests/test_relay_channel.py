"""The relay and the back-end channel's end (testbed/vhost_user/relay.py), without QEMU.

QEMU closes its end of the back-end channel (SET_BACKEND_REQ_FD) on unrealize before it is
done with the main socket. A back-end connected directly sees only its channel end hang up;
the relay must do the same and keep the main connection, or QEMU 11.1.3 segfaults on
hot-unplug behind the relay (scenarios/test_foreign.py's hot-plug scenarios caught it).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.errors import PeerClosed
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user import connection as conn_mod
from testbed.vhost_user.codes import Request
from testbed.vhost_user.connection import Connection, Listener
from testbed.vhost_user.protocol import U64, Header
from testbed.vhost_user.relay import Relay

TIMEOUT = 20.0


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = make_private_dir("test-relay-channel")
    yield path
    remove_tree(path)


def test_channel_hang_up_keeps_the_main_connection(sockdir: Path) -> None:
    listener = Listener(sockdir / "be.sock")
    channel_ended = threading.Event()
    got: list[str] = []

    def scripted_backend() -> None:
        with listener.accept() as conn:
            conn.settimeout(TIMEOUT)
            with conn.recv() as msg:
                assert msg.header.request == Request.SET_BACKEND_REQ_FD and len(msg.fds) == 1
                channel = Connection.from_fd(msg.fds[0])
            with channel:
                channel.settimeout(TIMEOUT)
                with contextlib.suppress(PeerClosed):
                    channel.recv()
                    got.append("channel message")
                got.append("channel ended")
                channel_ended.set()
            with conn.recv() as msg:
                got.append(Request(msg.header.request).name)
                conn.send(Header.make(Request.GET_FEATURES, 8, reply=True), U64(7).pack())
            with contextlib.suppress(PeerClosed):
                conn.recv()
                got.append("unexpected message")

    thread = threading.Thread(target=scripted_backend, daemon=True)
    with listener, Relay(sockdir / "vu.sock", sockdir / "be.sock") as relay:
        thread.start()
        with conn_mod.connect(sockdir / "vu.sock", TIMEOUT) as front:
            front.settimeout(TIMEOUT)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            with theirs:
                front.send(Header.make(Request.SET_BACKEND_REQ_FD, 0), b"", [theirs.fileno()])
            ours.close()  # QEMU's unrealize: the channel first
            assert channel_ended.wait(TIMEOUT), "the back-end's channel end never hung up"
            assert relay.session is not None, "the relay ended the session with the channel"
            front.send(Header.make(Request.GET_FEATURES, 0))
            with front.recv() as reply:
                assert U64.unpack(reply.body).value == 7
        relay.wait_disconnected(TIMEOUT)
        thread.join(TIMEOUT)
    assert got == ["channel ended", "GET_FEATURES"]
    # This script skips negotiation: that one rule is all the relay may flag.
    assert [(v.request, v.rule) for v in relay.violations] == [("SET_BACKEND_REQ_FD", "feature")]
