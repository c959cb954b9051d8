"""Memfds and fault-injection options."""

from __future__ import annotations

import os

import pytest

from testbed.errors import ConfigError
from testbed.limits import PAGE_SIZE
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import Request
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
