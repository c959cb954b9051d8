"""Memfds, fault-injection options and the GET_SHMEM_CONFIG body they bend."""

from __future__ import annotations

import os

import pytest

from testbed.device import ShmemLayout
from testbed.errors import ConfigError
from testbed.limits import PAGE_SIZE
from testbed.vhost_user.backend import offer
from testbed.vhost_user.codes import Request
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import SHMEM_CONFIG_SIZE, ShMemConfig
from testbed.vhost_user.shmem import Memfd

M = 1 << 20
G = 1 << 30


def test_memfd_read_write_close() -> None:
    with Memfd(2 * PAGE_SIZE) as mem:
        mem.write(10, b"hello")
        assert mem.read(10, 5) == b"hello"
        assert os.fstat(mem.fileno()).st_size == 2 * PAGE_SIZE
        with pytest.raises(ConfigError, match="past its size"):
            mem.write(2 * PAGE_SIZE - 1, b"xy")
        fd = mem.fileno()
    with pytest.raises(OSError):
        os.fstat(fd)
    mem.close()  # idempotent


def test_faults_validation() -> None:
    assert not Faults().active
    assert Faults(no_shmem=True).active
    assert Faults().shmem_flags == 0x5
    assert Faults(shmem_reply_flags=0xD).shmem_flags == 0xD
    with pytest.raises(ConfigError):
        Faults(shmem_bit=64)
    with pytest.raises(ConfigError):
        Faults(delay_seconds=-1)
    with pytest.raises(ConfigError, match="without delay_seconds"):
        Faults(delay_request=Request.GET_SHMEM_CONFIG)


def test_shmem_config_body_is_encoded_once_and_bent_after() -> None:
    body = offer.shmem_config_body(ShmemLayout({0: 2 * M, 3: 2 * M}), Faults())
    assert body == ShMemConfig.from_regions({0: 2 * M, 3: 2 * M}).pack()
    assert len(body) == SHMEM_CONFIG_SIZE
    assert offer.bend_shmem_config(body) == body
    bent = offer.bend_shmem_config(body, nregions=(1 << 32) + 7, padding=-1)
    assert bent[:8] == (7).to_bytes(4, "little") + b"\xff" * 4  # cut to the wire's u32s
    assert bent[8:] == body[8:]
    assert offer.bend_shmem_config(body, truncate=100, extra=3) == body[:100] + bytes(3)
    raw = offer.shmem_config_body(ShmemLayout(), Faults(shmem_raw_sizes={5: 3}))
    assert ShMemConfig.unpack(raw).regions == {5: 3}
    four = offer.shmem_config_body(ShmemLayout({0: 2 * M}), Faults(shmem_nregions=4))
    assert ShMemConfig.unpack(four).nregions == 4
