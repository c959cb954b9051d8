"""The device model (pure): layouts parsed and checked once, QEMU's limits, the packing
rule, and the option strings the command line, QMP and reproduce.sh take from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed import limits
from testbed.commands.run import injection_note
from testbed.device import (
    ForeignCommand,
    ShmemLayout,
    VhostUserDevice,
    parse_region,
    parse_size,
)
from testbed.errors import ConfigError
from testbed.limits import PAGE_SIZE
from testbed.pytest_plugin import UserBackend
from testbed.vhost_user.devices.spec import VirtioFsSpec
from testbed.vhost_user.protocol import ShMemConfig

M = 1 << 20
G = 1 << 30


def config_of(layout: ShmemLayout) -> ShMemConfig:
    return ShMemConfig.from_regions(dict(layout.regions))


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
    assert config_of(layout).regions == {3: 8 * M, 200: 8 * M}
    three = ShmemLayout({2: 4 * M, 0: 2 * M, 1: 2 * M})
    assert three.offsets() == {0: 0, 1: 2 * M, 2: 4 * M}
    assert three.total == 8 * M


def test_empty_layout() -> None:
    layout = ShmemLayout()
    assert not layout
    assert layout.total == 0
    assert layout.offsets() == {}
    assert config_of(layout) == ShMemConfig(0)


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
    assert ShMemConfig.unpack(config_of(layout).pack()).regions == sizes


def test_layout_is_immutable_and_compares_by_value() -> None:
    source = {1: 2 * M, 0: 2 * M}
    layout = ShmemLayout(source)
    source[2] = 4 * M
    assert dict(layout.regions) == {0: 2 * M, 1: 2 * M}
    with pytest.raises(TypeError):
        layout.regions[5] = M  # type: ignore[index]
    assert layout == ShmemLayout.of({0: 2 * M, 1: 2 * M}) and ShmemLayout.of(layout) is layout
    assert hash(layout) == hash(ShmemLayout({0: 2 * M, 1: 2 * M}))
    assert layout.region_args() == ["--region", f"0={2 * M}", "--region", f"1={2 * M}"]


def test_pack_is_the_one_packing_rule() -> None:
    assert limits.pack({9: 4 * M, 2: 8 * M}) == [
        limits.PackedRegion(2, 0, 8 * M),
        limits.PackedRegion(9, 8 * M, 4 * M),
    ]
    assert limits.pack({}) == []


def test_size_predicates() -> None:
    assert limits.is_page_multiple(0) and limits.is_page_multiple(3 * PAGE_SIZE)
    assert not limits.is_page_multiple(PAGE_SIZE + 1)
    assert limits.is_power_of_2(4 * M) and not limits.is_power_of_2(3 * M)
    assert not limits.is_power_of_2(0)
    assert limits.max_regions(False) == 3 and limits.max_regions(True) == 1


def test_capacity_by_bus_position(tmp_path: Path) -> None:
    sock = tmp_path / "vu.sock"
    three = {0: 2 * M, 1: 2 * M, 2: 4 * M}
    two = ShmemLayout({0: 2 * M, 1: 2 * M})
    VhostUserDevice("vu0", sock, ShmemLayout(three))  # the root bus takes three
    with pytest.raises(ConfigError, match="fits 3 on the root bus"):
        VhostUserDevice("vu0", sock, ShmemLayout({**three, 3: 8 * M}))
    with pytest.raises(ConfigError, match="fits 1 behind a root port"):
        VhostUserDevice("hp1", sock, two, bus="rp0")
    overfull = VhostUserDevice("hp1", sock, two, bus="rp0", allow_overfull=True)
    assert overfull.behind_root_port
    # Placing a device checks again: two regions fit the root bus, not a root port.
    with pytest.raises(ConfigError, match="fits 1 behind a root port"):
        VhostUserDevice.of(two).placed("hp1", sock, "rp0")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"virtio_id": 0}, "virtio-id"),
        ({"num_vqs": 0}, "num_vqs"),
        ({"vq_size": 100}, "power of two"),
        ({"config_size": -1}, "negative"),
        ({"reconnect_ms": 0}, "reconnect_ms"),
        ({"id": "bad id"}, "device id"),
    ],
)
def test_device_rejects(tmp_path: Path, options: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"id": "vu0", "socket": tmp_path / "vu.sock"}
    with pytest.raises(ConfigError, match=message):
        VhostUserDevice(**{**base, **options})  # type: ignore[arg-type]


def test_device_options_and_qmp_arguments(tmp_path: Path) -> None:
    sock = tmp_path / "vu.sock"
    device = VhostUserDevice(
        "hp1", sock, ShmemLayout({0: 4 * M}), virtio_id=2, vq_size=128, config_size=60, bus="rp0",
        reconnect_ms=200,
    )  # fmt: skip
    assert device.device_id == "hp1-dev"
    assert device.chardev_option() == f"socket,id=hp1,path={sock},reconnect-ms=200"
    assert device.device_option("pcie.0", 0x10) == (
        "vhost-user-test-device-pci,id=hp1-dev,chardev=hp1,virtio-id=2,num_vqs=1,"
        "vq_size=128,config_size=60,bus=pcie.0,addr=0x10"
    )
    assert device.chardev_add_arguments() == {
        "id": "hp1",
        "backend": {
            "type": "socket",
            "data": {
                "addr": {"type": "unix", "data": {"path": str(sock)}},
                "server": False,
                "reconnect-ms": 200,
            },
        },
    }
    assert device.device_add_arguments() == {
        "driver": "vhost-user-test-device-pci",
        "id": "hp1-dev",
        "chardev": "hp1",
        "virtio-id": 2,
        "num_vqs": 1,
        "vq_size": 128,
        "config_size": 60,
        "bus": "rp0",
        "addr": "0x0",
    }
    with pytest.raises(ConfigError, match="needs a bus"):
        VhostUserDevice("vu0", sock).device_add_arguments()


def test_guest_ejects_through_the_slot_holding_the_device() -> None:
    """pciehp's software eject: the guest powers off the slot whose address is the
    device's domain:bus:device (aarch64 virt; a script that finds no slot fails)."""
    from testbed.machine.profiles import profile_for
    from testbed.plugging import slot_power_off_script

    script = slot_power_off_script("0000:01:00.0")
    assert '= 0000:01:00 ]; then echo 0 > "$s/power"; exit 0' in script
    assert script.endswith("exit 1")
    assert profile_for("aarch64").native_pcie_hotplug
    assert not profile_for("x86_64").native_pcie_hotplug


def test_a_users_back_end_serves_the_scenarios_share(tmp_path: Path) -> None:
    """--backend-cmd with {share} and {tag}: standing where our virtio-fs back-end would,
    the user's command names the scenario's own share and tag; {socket} stays for the
    start; the device keeps the model's shape (its window is what the relay injects when
    the back-end offers no SHMEM itself)."""
    spec = VirtioFsSpec(tmp_path, "daxfs", window_size=64 << 20)
    template = "fsd --sock {socket} --dir={share} -t {tag} --cache-size {window}"
    theirs = UserBackend(ForeignCommand.of(template), {})
    device = theirs.serve(VhostUserDevice.serving(spec))
    assert device.backend == ForeignCommand(
        ("fsd", "--sock", "{socket}", f"--dir={tmp_path}", "-t", "daxfs", "--cache-size",
         str(64 << 20))
    )  # fmt: skip
    assert (device.num_vqs, device.config_size, dict(device.layout.regions)) == (
        2, 40, {0: 64 << 20}
    )  # fmt: skip
    plain = theirs.serve(VhostUserDevice())
    assert plain.backend == ForeignCommand.of(template)


def test_testbed_exec_says_what_an_injected_region_is() -> None:
    """--region with a back-end we did not write: the relay injects the regions, and
    `testbed exec` says (on stderr) that the back-end will never map them and what a guest
    driver then does; nothing to say for our back-end or without regions."""
    theirs = ForeignCommand.of("virtiofsd --socket-path={socket}")
    note = injection_note(VhostUserDevice.of({0: 64 << 20}, backend=theirs))
    assert note is not None and "0=67108864" in note
    assert "never map" in note and "ENOSYS" in note and "FUSE_SETUPMAPPING" in note
    assert injection_note(VhostUserDevice.of({0: 64 << 20})) is None
    assert injection_note(VhostUserDevice.of(None, backend=theirs)) is None
    assert injection_note(None) is None
