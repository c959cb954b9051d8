"""Pure parts of hot-plug: QMP arguments and the guest's PCI listing."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import ConfigError, ParseError
from testbed.hotplug import (
    DEVICE_TYPE,
    ListedFunction,
    chardev_add_arguments,
    device_add_arguments,
    matching_functions,
    parse_pci_listing,
)

LISTING = """\
0000:00:00.0 0x8086 0x29c0 -
0000:00:02.0 0x1af4 0x1041 virtio-pci
0000:00:08.0 0x1b36 0x000c pcieport
0000:01:00.0 0x1af4 0x105a virtio-pci
0000:00:10.0 0x1af4 0x105a -
"""


def test_chardev_add_is_a_unix_client() -> None:
    args = chardev_add_arguments("hp1", Path("/tmp/testbed-x/hp1.sock"))
    assert args == {
        "id": "hp1",
        "backend": {
            "type": "socket",
            "data": {
                "addr": {"type": "unix", "data": {"path": "/tmp/testbed-x/hp1.sock"}},
                "server": False,
            },
        },
    }


def test_chardev_add_with_reconnect() -> None:
    args = chardev_add_arguments("hp1", Path("/s/hp1.sock"), reconnect_ms=250)
    assert args["backend"]["data"]["reconnect-ms"] == 250
    assert args["backend"]["data"]["server"] is False
    with pytest.raises(ConfigError, match="reconnect_ms"):
        chardev_add_arguments("hp1", Path("/s/hp1.sock"), reconnect_ms=0)


def test_device_add_goes_behind_the_port() -> None:
    args = device_add_arguments("hp1-dev", "hp1", "rp0")
    assert args == {
        "driver": DEVICE_TYPE,
        "id": "hp1-dev",
        "chardev": "hp1",
        "virtio-id": 26,
        "bus": "rp0",
        "addr": "0x0",
    }


def test_parse_listing_and_match() -> None:
    listing = parse_pci_listing(LISTING)
    assert listing["0000:00:08.0"] == ListedFunction("0000:00:08.0", 0x1B36, 0xC, "pcieport")
    assert listing["0000:00:10.0"].driver is None
    assert set(matching_functions(listing, 26)) == {"0000:01:00.0", "0000:00:10.0"}
    assert matching_functions(listing, 1) == {"0000:00:02.0": listing["0000:00:02.0"]}


@pytest.mark.parametrize(
    "line, message",
    [
        ("0000:00:00.0 0x8086", "want 'bdf vendor device driver'"),
        ("0000:00:00.0 zz 0x1 -", "not hex"),
    ],
)
def test_parse_listing_errors(line: str, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_pci_listing(line)
