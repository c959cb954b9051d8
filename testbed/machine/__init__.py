"""QEMU driver: the command line (pure, from an arch profile) and the process/QMP/console."""

from testbed.machine.cmdline import (
    MachineConfig,
    VhostUserDeviceSpec,
    build_command,
    format_command,
)
from testbed.machine.profiles import PROFILES, ArchProfile, profile_for
from testbed.machine.qemu import Machine, free_tcp_port

__all__ = [
    "PROFILES",
    "ArchProfile",
    "Machine",
    "MachineConfig",
    "VhostUserDeviceSpec",
    "build_command",
    "format_command",
    "free_tcp_port",
    "profile_for",
]
