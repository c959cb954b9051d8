"""Cold-plug layouts that share one boot, each still its own test with its own verdict.

A cold-plug scenario tests the firmware's and the kernel's first enumeration of a device
on QEMU's command line: that needs a boot, and a boot is most of such a scenario's time. A
``SharedGroup`` names several such devices (by a name each test knows); the first test of
the group that runs boots ONE guest with all of them on the command line (several devices
at boot is, if anything, a harder test of BAR placement), and every test of the group then
judges its own device in it (its own PCI function, its own back-end and trace).

A shared boot that fails for a shared reason (QEMU aborts at realize, the guest does not come
up) marks the group broken: every test of the group then boots its own guest with its own
device alone, so the failure is pinned to the layout that causes it. ``isolated`` (pytest
--isolated-boots, the nightly job) always boots one device per guest.

A pool holds at most one shared guest at a time per process (an xdist worker): the plugin
runs a group's tests back to back on one worker (xdist_group) and closes the guest after
the last of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.device import VhostUserDevice
from testbed.errors import ConfigError, ConsoleFailure, QemuExited, TestbedError, WaitTimeout
from testbed.plugging import PluggedDevice
from testbed.resource import Closeable
from testbed.vm import GuestVM

log = logging.getLogger(__name__)

# What says the shared boot itself failed (not one device's verdict): QEMU refusing or
# aborting at realize, a guest that never comes up or panics.
SHARED_FAILURES = (QemuExited, ConsoleFailure, WaitTimeout)


@dataclass(frozen=True)
class SharedGroup:
    """Devices that may share one cold boot, by name; ``options`` are the GuestOptions
    every one of them is booted with (shared or not)."""

    name: str
    devices: Mapping[str, VhostUserDevice]
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.devices:
            raise ConfigError(f"shared boot {self.name}: no devices")

    def device(self, name: str) -> VhostUserDevice:
        if name not in self.devices:
            raise ConfigError(f"shared boot {self.name} has no device {name!r}")
        return self.devices[name]


@dataclass
class SharedVM:
    """A live shared boot: the VM and which plugged device is whose."""

    key: tuple[str, str]
    vm: GuestVM
    by_name: dict[str, PluggedDevice]


Starter = Callable[[tuple[VhostUserDevice, ...], Path], GuestVM]
"""Boots a started GuestVM with these cold devices, its artifacts in that directory."""


class SharedPool(Closeable):
    """The shared boots of one process: at most one live at a time."""

    def __init__(self) -> None:
        self.live: SharedVM | None = None
        self.broken: dict[tuple[str, str], str] = {}
        """(group, arch) -> why its shared boot failed."""

    def get(self, group: SharedGroup, arch: str, logdir: Path, start: Starter) -> SharedVM | None:
        """The live shared boot of ``group`` on ``arch`` (booted now if needed), or None
        when the group's shared boot failed (then the caller boots the device alone)."""
        key = (group.name, arch)
        if key in self.broken:
            return None
        if self.live is not None and self.live.key == key:
            return self.live
        self.close()
        names = list(group.devices)
        try:
            vm = start(tuple(group.devices[n] for n in names), logdir)
        except SHARED_FAILURES as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.broken[key] = f"{type(exc).__name__}: {first}"
            log.warning("shared boot %s/%s failed; each layout boots alone: %s", *key, first)
            return None
        self.live = SharedVM(key, vm, dict(zip(names, vm.plugged, strict=True)))
        return self.live

    def close(self, failed: bool = False) -> None:
        live, self.live = self.live, None
        if live is not None:
            try:
                live.vm.close(failed=failed)
            except TestbedError as exc:
                log.warning("closing shared boot %s/%s: %s", *live.key, exc)
