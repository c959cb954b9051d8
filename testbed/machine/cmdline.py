"""The QEMU command line as a pure function of a MachineConfig (no I/O, unit-tested).

Everything a run needs is in the config: paths of sockets and logs are chosen by the caller
(Machine / GuestVM) so that the same function also writes the pasteable reproduce script.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testbed.device import VhostUserDevice
from testbed.errors import ConfigError
from testbed.machine.profiles import ArchProfile, profile_for

MIB = 1024 * 1024


@dataclass(frozen=True)
class MachineConfig:
    """Everything that decides a QEMU command line."""

    arch: str
    qemu: Path
    accel: str
    """'tcg' or 'kvm' (the decision is testbed.host.accel's job, not ours)."""
    kernel: Path
    initrd: Path | None
    qmp_socket: Path
    console_log: Path
    ssh_port: int
    kernel_cmdline: str = ""
    """The image's base command line."""
    extra_kernel_args: tuple[str, ...] = ()
    memory_mib: int = 512
    smp: int = 1
    cpu: str | None = None
    """Overrides the profile's CPU model for the accelerator."""
    phys_bits: int | None = None
    """x86 only: e.g. 44 so that a 1 TiB region's window fits (TCG's default has 40)."""
    vhost_user_devices: tuple[VhostUserDevice, ...] = ()
    root_ports: int = 0
    """Empty pcie-root-ports for hot-plug, ids rp0, rp1, ..."""
    root_port_pref64: int = 128 * MIB
    """Prefetchable window reserved per root port: BAR 4 of a hot-plugged device must fit.
    The window also holds BAR 2 and firmware aligns it to 2 MiB only, so 128M holds a 64M
    layout (64M would not). One size for every scenario: restored guests that share a
    machine share one snapshot (testbed.snapshot), made once per architecture."""
    rng: bool = True
    """virtio-rng: without it dropbear waits ~1 s for entropy under TCG."""
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    incoming: Path | None = None
    """Restore the guest from this file (QEMU's migration stream, see testbed.snapshot)
    instead of booting it: every other field must equal those of the QEMU that saved it."""

    @property
    def profile(self) -> ArchProfile:
        return profile_for(self.arch)


def root_port_id(index: int) -> str:
    return f"rp{index}"


def root_port_option(index: int, bus: str, slot: int, pref64_reserve: int | None = None) -> str:
    """The -device value of the pcie-root-port ``rp<index>`` at ``bus`` slot ``slot``
    (chassis index + 1), reserving ``pref64_reserve`` bytes of prefetchable window (None:
    the firmware's default). The one way every QEMU we start gets a root port."""
    option = f"pcie-root-port,id={root_port_id(index)},bus={bus},addr={slot:#x},chassis={index + 1}"
    if pref64_reserve is not None:
        option += f",pref64-reserve={pref64_reserve // MIB}M"
    return option


def kernel_command_line(config: MachineConfig) -> str:
    """The image's command line plus our console, the profile's TCG-only arguments (under
    TCG) and any extras, in that order."""
    profile = config.profile
    words = shlex.split(config.kernel_cmdline) if config.kernel_cmdline else []
    if not any(w.startswith("console=") for w in words):
        words.append(f"console={profile.console}")
    if config.root_ports and config.arch == "aarch64":
        # virt has no firmware to size hot-plug windows: pciehp takes them from here.
        words.append(f"pci=hpmmioprefsize={config.root_port_pref64 // MIB}M")
    if config.accel == "tcg":
        words.extend(a for a in profile.tcg_kernel_args if a not in words)
    words.extend(config.extra_kernel_args)
    return " ".join(words)


def cpu_model(config: MachineConfig) -> str:
    profile = config.profile
    cpu = config.cpu or (profile.kvm_cpu if config.accel == "kvm" else profile.tcg_cpu)
    if config.phys_bits is not None:
        cpu = f"{cpu},phys-bits={config.phys_bits}"
    return cpu


def validate(config: MachineConfig) -> None:
    """Reject configurations QEMU would refuse (or abort on) with a message saying why."""
    profile = config.profile
    if config.accel not in ("tcg", "kvm"):
        raise ConfigError(f"accelerator {config.accel!r}: use 'tcg' or 'kvm'")
    if config.memory_mib < 128:
        raise ConfigError(f"memory {config.memory_mib} MiB is too small: use at least 128")
    if config.smp < 1:
        raise ConfigError(f"smp {config.smp}: use at least 1")
    if not 0 < config.ssh_port < 65536:
        raise ConfigError(f"ssh port {config.ssh_port} is not a TCP port")
    if config.phys_bits is not None:
        if config.arch != "x86_64":
            raise ConfigError("phys_bits is an x86 CPU property: leave it unset for aarch64")
        if not 32 <= config.phys_bits <= 52:
            raise ConfigError(f"phys_bits {config.phys_bits}: use 32..52")
    if config.root_ports < 0 or config.root_ports > 8:
        raise ConfigError(f"{config.root_ports} root ports: use 0..8")
    if config.root_port_pref64 % MIB:
        raise ConfigError("root_port_pref64 must be a multiple of 1 MiB")
    ids = [d.id for d in config.vhost_user_devices]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"vhost-user device ids must be unique, got {ids}")
    buses = {root_port_id(i) for i in range(config.root_ports)} | {profile.root_bus}
    for dev in config.vhost_user_devices:
        if dev.bus is not None and dev.bus not in buses:
            raise ConfigError(
                f"device {dev.id}: bus {dev.bus!r} does not exist; use one of {sorted(buses)}"
            )


def root_slots(config: MachineConfig) -> dict[str, int]:
    """Assign a root-bus slot to every vhost-user device that needs one (chardev id ->
    slot): the guest sees such a device at 0000:00:<slot>.0."""
    profile = config.profile
    used = {profile.net_slot, profile.rng_slot}
    used |= {profile.first_root_port_slot + i for i in range(config.root_ports)}
    used |= {
        d.addr
        for d in config.vhost_user_devices
        if d.addr is not None and d.bus in (None, profile.root_bus)
    }
    slots: dict[str, int] = {}
    candidate = profile.first_device_slot
    for dev in config.vhost_user_devices:
        if dev.bus not in (None, profile.root_bus):
            continue
        if dev.addr is not None:
            slots[dev.id] = dev.addr
            continue
        while candidate in used:
            candidate += 1
        if candidate > profile.max_device_slot:
            raise ConfigError(
                f"no free slot on {profile.root_bus} for device {dev.id}: "
                "put some devices behind root ports"
            )
        slots[dev.id] = candidate
        used.add(candidate)
    return slots


def _head(qemu: Path) -> list[str]:
    """What every QEMU we start has first: nothing we did not ask for, no window."""
    return [str(qemu), "-nodefaults", "-no-user-config", "-display", "none"]


def memory_options(arch: str, memory_mib: int) -> list[str]:
    """The machine type with its RAM as a shareable memfd: vhost-user back-ends map it."""
    return [
        "-machine", f"{profile_for(arch).machine},memory-backend=mem",
        "-m", f"{memory_mib}M",
        "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
    ]  # fmt: skip


def device_options(device: VhostUserDevice, bus: str, addr: int) -> list[str]:
    """The -chardev and -device of one vhost-user device (every builder uses this)."""
    return ["-chardev", device.chardev_option(), "-device", device.device_option(bus, addr)]


def qmp_option(path: Path, *, dial: bool) -> list[str]:
    """-qmp on a UNIX socket. ``dial``: QEMU connects to our listener (a QemuMachine: no
    polling for QEMU's socket to appear, and a QEMU that dies is noticed at once); else QEMU
    listens itself, for a command run by hand (reproduce.sh, the boot floor)."""
    return ["-qmp", f"unix:{path}" if dial else f"unix:{path},server=on,wait=off"]


def build_command(
    config: MachineConfig, *, paused: bool = False, dial_qmp: bool = False
) -> list[str]:
    """The argv of QEMU for `config`. `paused` adds -S (the Machine connects QMP, then
    cont); `dial_qmp`: see qmp_option."""
    validate(config)
    profile = config.profile
    root = profile.root_bus
    argv = [
        *_head(config.qemu),
        # A guest that panics or reboots ends QEMU instead of looping: waits fail at once.
        "-no-reboot",
        "-msg",
        "timestamp=on",
        "-accel",
        config.accel,
        *memory_options(config.arch, config.memory_mib),
        "-cpu",
        cpu_model(config),
        "-smp",
        str(config.smp),
        "-kernel",
        str(config.kernel),
    ]
    if config.initrd is not None:
        argv += ["-initrd", str(config.initrd)]
    argv += ["-append", kernel_command_line(config)]
    argv += [
        "-chardev",
        # A restored guest's console goes on after its boot's, copied there by the caller.
        f"file,id=console,path={config.console_log}"
        + (",append=on" if config.incoming is not None else ""),
        "-serial",
        "chardev:console",
        *qmp_option(config.qmp_socket, dial=dial_qmp),
        "-netdev",
        f"user,id=net0,hostfwd=tcp:127.0.0.1:{config.ssh_port}-:22",
        # romfile= : no option ROM to load; we boot the kernel directly, never from the NIC.
        "-device",
        f"virtio-net-pci,netdev=net0,bus={root},addr={profile.net_slot:#x},romfile=",
    ]
    if config.rng:
        argv += ["-device", f"virtio-rng-pci,bus={root},addr={profile.rng_slot:#x}"]
    for i in range(config.root_ports):
        slot = profile.first_root_port_slot + i
        argv += ["-device", root_port_option(i, root, slot, config.root_port_pref64)]
    slots = root_slots(config)
    for dev in config.vhost_user_devices:
        if dev.id in slots:
            bus, addr = root, slots[dev.id]
        else:
            bus, addr = dev.bus or root, dev.addr or 0
        argv += device_options(dev, bus, addr)
    argv += list(config.extra_args)
    if config.incoming is not None:
        # The file comes over QMP (migrate-incoming) once its format is set: GuestMachine.
        argv += ["-incoming", "defer"]
    if paused:
        argv.append("-S")
    return argv


# Where a guest-less QEMU gets its first device: a free slot of q35's and virt's root bus.
GUESTLESS_SLOT = 3


@dataclass(frozen=True)
class QtestConfig:
    """A QEMU without a guest: vhost-user devices on the root bus, nothing else."""

    arch: str
    qemu: Path
    devices: tuple[VhostUserDevice, ...] = ()
    """Placed at GUESTLESS_SLOT, GUESTLESS_SLOT + 1, ... unless they name an addr."""
    qtest: bool = True
    """True: -accel qtest, and we play the guest's PCI core over the qtest socket.
    False: -accel tcg -S, nothing ever executes (enough to look at QEMU's side)."""
    memory_mib: int = 256
    listen: bool = False
    """QEMU listens on the devices' sockets (chardev server=on) and waits in realize for
    the back-end to connect; default: the back-end listens and QEMU connects."""
    extra_args: tuple[str, ...] = ()


def build_qtest_command(config: QtestConfig, qmp_socket: Path, qtest_socket: Path) -> list[str]:
    """The argv of a guest-less QEMU; QMP (and qtest) dial our listeners at the given
    paths (qtest_socket is used only when config.qtest)."""
    argv = _head(config.qemu)
    if config.qtest:
        argv += ["-accel", "qtest", "-qtest", f"unix:{qtest_socket}", "-qtest-log", "/dev/null"]
    else:
        argv += ["-accel", "tcg", "-S"]
    argv += memory_options(config.arch, config.memory_mib)
    root = profile_for(config.arch).root_bus
    for i, dev in enumerate(config.devices):
        options = device_options(dev, root, GUESTLESS_SLOT + i if dev.addr is None else dev.addr)
        if config.listen:
            # wait=on (the default): realize blocks until the back-end connects; with
            # wait=off the device realizes unconnected and fails ("Failed to set msg fds").
            options[1] += ",server=on"
        argv += options
    return argv + qmp_option(qmp_socket, dial=True) + list(config.extra_args)


def behind_root_port_options(arch: str, device: VhostUserDevice) -> list[str]:
    """A guest-less QEMU's extra arguments for ``device`` behind a root port: rp0 at the
    profile's first root-port slot, the device at 01:00.0 on it (its bus must be rp0).
    testbed.machine.qtest.open_root_port programs that port as a guest would."""
    profile = profile_for(arch)
    port = root_port_option(0, profile.root_bus, profile.first_root_port_slot)
    return ["-device", port, *device_options(device, root_port_id(0), 0)]


def attach_options(arch: str, socket_path: Path, memory_mib: int = 512) -> list[str]:
    """QEMU options attaching one vhost-user-test-device-pci (chardev vu0) to a back-end
    listening on ``socket_path``, with the shareable RAM it needs: for a QEMU started by
    hand (`testbed backend` prints them)."""
    device = VhostUserDevice("vu0", socket_path)
    root = profile_for(arch).root_bus
    return memory_options(arch, memory_mib) + device_options(device, root, GUESTLESS_SLOT)


def bare_command(qemu: Path, qmp_socket: Path) -> list[str]:
    """A QEMU with no machine at all (-machine none): enough to ask QMP about the binary."""
    return [*_head(qemu), "-machine", "none", *qmp_option(qmp_socket, dial=True)]


def format_command(argv: Sequence[str]) -> str:
    """Shell-quoted, one option and its value per line: pasteable into a shell."""
    if not argv:
        return ""
    lines = [shlex.quote(argv[0])]
    i = 1
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            lines.append(f"{shlex.quote(word)} {shlex.quote(argv[i + 1])}")
            i += 2
        else:
            lines.append(shlex.quote(word))
            i += 1
    return " \\\n    ".join(lines) + "\n"
