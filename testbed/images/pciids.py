"""pci.ids cut down to the vendors a QEMU guest can show (pure).

lspci reads and parses the whole of pci.ids on every run that prints names: with the full
1.7 MB file that is ~0.11 s of TCG per `lspci -vv`, with the vendors QEMU emulates ~0.06 s,
and every boot unpacks 1.2 MB less initramfs. Names of the kept vendors' devices, and of
every device class, are exactly lspci's usual ones; a device of another vendor prints as
numbers ("Device 10de:1eb8" style), which the parsers do not rely on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_VENDOR = re.compile(r"^([0-9a-f]{4})  ")
_VENDOR_ID = re.compile(r"^[0-9a-f]{4}$")


def valid_vendor_id(text: str) -> bool:
    return bool(_VENDOR_ID.match(text))


def trim_pci_ids(text: str, vendors: Iterable[str]) -> str:
    """``text`` (pci.ids) with only the blocks of ``vendors`` (4 lower-case hex digits)
    and the device classes section (the 'C' lines at the end), header comments kept."""
    keep_ids = set(vendors)
    out: list[str] = []
    keeping = True  # the header comments, until the first vendor line
    in_classes = False
    for line in text.split("\n"):
        if line.startswith("C "):
            in_classes = True
        if in_classes:
            out.append(line)
            continue
        vendor = _VENDOR.match(line)
        if vendor:
            keeping = vendor.group(1) in keep_ids
        elif line.startswith("#") and keeping is False:
            continue  # comments between vendor blocks go with the dropped block
        if keeping:
            out.append(line)
    return "\n".join(out)
