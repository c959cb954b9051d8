"""Shared-memory layouts (pure), size parsing, memfds, and fault-injection options."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.errors import ConfigError
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.probe import attach_options, guestless_command, parse_mtree_shmem
from testbed.vhost_user.protocol import Request, ShMemConfig
from testbed.vhost_user.shmem import PAGE_SIZE, Memfd, ShmemLayout, parse_region, parse_size

M = 1 << 20
G = 1 << 30


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("64K", 64 << 10),
        ("4M", 4 * M),
        ("4m", 4 * M),
        ("2G", 2 * G),
        ("1T", 1 << 40),
        ("16MiB", 16 * M),
        (" 8M ", 8 * M),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "4X", "-4M", "1.5M", "4 M B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="not understood"):
        parse_size(text)


def test_parse_region() -> None:
    assert parse_region("1=4M") == (1, 4 * M)
    assert parse_region("0x10=64K") == (16, 64 << 10)
    with pytest.raises(ConfigError, match="SHMID=SIZE"):
        parse_region("4M")
    with pytest.raises(ConfigError, match="not a number"):
        parse_region("a=4M")
    with pytest.raises(ConfigError, match="out of range"):
        parse_region("256=4M")


def test_layout_offsets_ascending_shmid() -> None:
    layout = ShmemLayout({200: 8 * M, 3: 8 * M})
    assert list(layout.regions) == [3, 200]
    assert layout.offsets() == {3: 0, 200: 8 * M}
    assert layout.total == 16 * M
    assert layout.to_config().regions == {3: 8 * M, 200: 8 * M}
    three = ShmemLayout({2: 4 * M, 0: 2 * M, 1: 2 * M})
    assert three.offsets() == {0: 0, 1: 2 * M, 2: 4 * M}
    assert three.total == 8 * M


def test_empty_layout() -> None:
    layout = ShmemLayout()
    assert not layout
    assert layout.total == 0
    assert layout.offsets() == {}
    assert layout.to_config() == ShMemConfig(0)


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        ({0: 4 * M, 1: 16 * M}, "not a power of two"),
        ({0: 3 * M}, "not a power of two"),
        ({0: 4097}, "multiple of the page size"),
        ({0: 0}, "must be > 0"),
        ({256: 4 * M}, "out of range"),
        ({-1: 4 * M}, "out of range"),
    ],
)
def test_layout_validation(regions: dict[int, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ShmemLayout(regions)


def test_layout_accepts_measured_good_ones() -> None:
    ShmemLayout({0: 4 * M, 1: 12 * M})  # 16M: QEMU 11.1.3 takes it
    ShmemLayout({5: 4 * G})
    ShmemLayout({5: 16 * G})


def test_layout_parse_duplicates() -> None:
    assert ShmemLayout.parse(["0=2M", "1=2M"]).regions == {0: 2 * M, 1: 2 * M}
    with pytest.raises(ConfigError, match="given twice"):
        ShmemLayout.parse(["0=2M", "0=2M"])


@given(st.dictionaries(st.integers(0, 255), st.integers(1, 1 << 20), min_size=1, max_size=8))
def test_layout_offsets_property(pages: dict[int, int]) -> None:
    sizes = {k: v * PAGE_SIZE for k, v in pages.items()}
    total = sum(sizes.values())
    if total & (total - 1):
        with pytest.raises(ConfigError):
            ShmemLayout(sizes)
        return
    layout = ShmemLayout(sizes)
    offsets = layout.offsets()
    ordered = sorted(sizes)
    assert list(offsets) == ordered
    # Back to back, no gaps, no overlap, ending at the total.
    end = 0
    for shmid in ordered:
        assert offsets[shmid] == end
        end += sizes[shmid]
    assert end == layout.total
    assert ShMemConfig.unpack(layout.to_config().pack()).regions == sizes


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


def test_parse_mtree_shmem() -> None:
    text = (
        "address-space: memory\n"
        "  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n"
        "      00000000c0000000-00000000c03fffff (prio 1, i/o): vhost-device-pci-shmembar\n"
        "        00000000c0000000-00000000c01fffff (prio 0, i/o): virtio-shmem-0\n"
        "        00000000c0200000-00000000c03fffff (prio 0, i/o): virtio-shmem-1\r\n"
        "          00000000c0200000-00000000c02fffff (prio 0, ram): virtio-shmem-1-0\n"
        "      00000000c0000000-00000000c03fffff (prio 1, i/o): vhost-device-pci-shmembar\n"
    )
    assert parse_mtree_shmem(text) == {
        "vhost-device-pci-shmembar": (0xC0000000, 4 * M),
        "virtio-shmem-0": (0xC0000000, 2 * M),
        "virtio-shmem-1": (0xC0200000, 2 * M),
        "virtio-shmem-1-0": (0xC0200000, 1 * M),
    }


def test_guestless_command_and_attach_options(tmp_path: Path) -> None:
    argv = guestless_command(
        Path("/q"), "aarch64", tmp_path / "vu.sock", tmp_path / "qmp.sock", qtest_path=None
    )
    assert argv[:2] == ["/q", "-nodefaults"]
    assert "-S" in argv and argv[argv.index("-accel") + 1] == "tcg"
    assert "virt,memory-backend=mem" in argv
    assert any("share=on" in a and "memory-backend-memfd" in a for a in argv)
    device = argv[argv.index("-device") + 1]
    assert device.startswith("vhost-user-test-device-pci,chardev=vu0,virtio-id=26,bus=pcie.0")
    assert f"socket,id=vu0,path={tmp_path / 'vu.sock'}" in argv
    q35 = attach_options("x86_64", Path("/s"))
    assert "q35,memory-backend=mem" in q35
    with pytest.raises(ConfigError, match="unknown architecture"):
        attach_options("riscv64", Path("/s"))
