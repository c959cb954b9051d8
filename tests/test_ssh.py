"""The SSH transport's socket (testbed.guest.ssh), against a real listening socket."""

from __future__ import annotations

import socket

from testbed.guest.ssh import open_tcp


def test_ssh_socket_has_nagle_off() -> None:
    """Every request to the guest is a small packet waiting for an answer: with Nagle on,
    each one waited for the guest's delayed ACK (~43 ms per channel open, measured)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        sock = open_tcp("127.0.0.1", port, 5.0)
        try:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert sock.getpeername() == ("127.0.0.1", port)
        finally:
            sock.close()
