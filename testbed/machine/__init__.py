"""The one QEMU driver: command lines (pure, from an arch profile), the process/QMP driver
(QemuMachine; GuestMachine with a guest, QtestMachine without one), capability probes."""

from testbed.machine.cmdline import MachineConfig, QtestConfig, build_command, format_command
from testbed.machine.guest import GuestMachine
from testbed.machine.profiles import PROFILES, ArchProfile, profile_for
from testbed.machine.qemu import QemuMachine, free_tcp_port
from testbed.machine.qtest import QtestMachine

__all__ = [
    "PROFILES",
    "ArchProfile",
    "GuestMachine",
    "MachineConfig",
    "QemuMachine",
    "QtestConfig",
    "QtestMachine",
    "build_command",
    "format_command",
    "free_tcp_port",
    "profile_for",
]
