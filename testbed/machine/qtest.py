"""A guest-less QEMU: vhost-user devices and nothing else, optionally driven over qtest.

With ``-accel qtest`` QEMU runs no guest code; the qtest line protocol lets us act as the
guest's PCI core and virtio driver instead -- assign BARs, enable memory, negotiate
features, place virtqueues in guest RAM, walk device_status to DRIVER_OK (testbed.virtio's
program), notify a queue -- so SHMEM_MAP/UNMAP and a back-end's virtqueues can be exercised
without booting anything. :class:`QtestMemory` lends guest RAM to the driver's side of a
ring (tests/driver_ring.py). With ``QtestConfig(qtest=False)`` it is ``-accel tcg
-S``: QEMU realizes the devices (the vhost-user handshake happens) and never executes
anything.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import (
    ConfigError,
    ProtocolError,
    QemuExited,
    StateError,
    TestbedError,
    WaitTimeout,
)
from testbed.guest.pci import PciFunction, VirtioCap, parse_config_space
from testbed.machine.cmdline import GUESTLESS_SLOT, QtestConfig, build_qtest_command
from testbed.machine.profiles import profile_for
from testbed.machine.qemu import QemuMachine
from testbed.virtio import (
    ACKNOWLEDGE_PROGRAM,
    DEVICE_FEATURE,
    DEVICE_FEATURE_SELECT,
    DRIVER_OK_PROGRAM,
    F_VERSION_1,
    NOTIFY_OFF_MULTIPLIER,
    QUEUE_NOTIFY_OFF,
    QUEUE_SELECT,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    Expect,
    QueueSetup,
    Step,
    Write,
    negotiate_program,
    run_program,
)

_WIDTH_SUFFIX = {8: "b", 16: "w", 32: "l", 64: "q"}


class QtestClient:
    """The qtest line protocol over an accepted socket: port I/O and physical memory."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self._sock: socket.socket | None = sock
        sock.settimeout(timeout)
        self._buf = b""

    def command(self, line: str) -> str:
        if self._sock is None:
            raise StateError("closed", "open", "qtest")
        self._sock.sendall(line.encode() + b"\n")
        while True:
            reply, sep, rest = self._buf.partition(b"\n")
            if sep:
                self._buf = rest
                text = reply.decode()
                # Asynchronous notifications (IRQ lines) start with "IRQ"; skip them.
                if text.startswith("IRQ"):
                    continue
                if not text.startswith("OK"):
                    raise ProtocolError(f"qtest {line!r} failed: {text}")
                return text[2:].strip()
            try:
                data = self._sock.recv(65536)
            except TimeoutError as exc:
                raise WaitTimeout(f"qtest: no answer to {line!r}") from exc
            if not data:
                raise QemuExited(f"QEMU closed the qtest socket during {line!r}")
            self._buf += data

    def outl(self, port: int, value: int) -> None:
        self.command(f"outl {port:#x} {value:#x}")

    def inl(self, port: int) -> int:
        return int(self.command(f"inl {port:#x}"), 16)

    def read_int(self, addr: int, width: int) -> int:
        """A ``width``-bit (8, 16, 32, 64) read of guest-physical ``addr``."""
        return int(self.command(f"read{_WIDTH_SUFFIX[width]} {addr:#x}"), 16)

    def write_int(self, addr: int, width: int, value: int) -> None:
        self.command(f"write{_WIDTH_SUFFIX[width]} {addr:#x} {value:#x}")

    def read(self, addr: int, length: int) -> bytes:
        return bytes.fromhex(self.command(f"read {addr:#x} {length:#x}")[2:])

    def write(self, addr: int, data: bytes) -> None:
        self.command(f"write {addr:#x} {len(data):#x} 0x{data.hex()}")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class QtestMemory:
    """Guest memory through qtest (a GuestMemory for the driver's side of a ring): what
    the guest would read and write at a physical address, QEMU deciding what is there."""

    def __init__(self, qtest: QtestClient) -> None:
        self.qtest = qtest

    def read(self, gpa: int, length: int) -> bytes:
        return self.qtest.read(gpa, length) if length else b""

    def write(self, gpa: int, data: bytes) -> None:
        if data:
            self.qtest.write(gpa, data)

    def check(self, gpa: int, length: int) -> None:
        """Nothing to check on this side: a guest may point anywhere."""


# PCI config space access, per machine: q35 by the 0xcf8/0xcfc ports; virt by its ECAM
# window: the high one (256 GiB + 256 MiB) when highmem is on -- the default --, else the
# low one. The driver picks the window where our device's vendor id reads back.
_VIRT_ECAMS = (0x40_1000_0000, 0x3F000000)
_VIRTIO_VENDOR = 0x1AF4
# Where we place the BARs. q35: inside the 32-bit PCI hole; virt: inside its 32-bit
# PCI MMIO window (0x10000000-0x3efeffff). 64-bit BARs get their high half 0.
_BAR_PLACES = {"x86_64": (0xE0000000, 0xC0000000), "aarch64": (0x3E000000, 0x20000000)}
_COMMON_CFG_BAR = 2  # measured: the test device's modern virtio registers, BAR 2 offset 0


@dataclass
class PciFunctionDriver:
    """Acts as the guest's PCI core and virtio driver for one function, through qtest."""

    qtest: QtestClient
    arch: str
    slot: int = GUESTLESS_SLOT
    bars: dict[int, int] = field(default_factory=dict)

    ecam: int | None = None
    common: int | None = None
    """Where the common config is (the virtio capability's BAR and offset), once known."""

    def __post_init__(self) -> None:
        if self.arch not in _BAR_PLACES:
            raise ConfigError(f"no PCI driver for {self.arch!r}")
        if self.arch == "aarch64" and self.ecam is None:
            for base in _VIRT_ECAMS:
                self.ecam = base
                if self.read32(0) & 0xFFFF == _VIRTIO_VENDOR:
                    return
            raise TestbedError(
                f"no virtio device at 00:{self.slot:02x}.0 in any virt ECAM window "
                f"({', '.join(hex(b) for b in _VIRT_ECAMS)})"
            )

    def _cfg_addr(self, reg: int) -> int:
        if self.arch == "x86_64":
            return 0x80000000 | (self.slot << 11) | (reg & ~3)
        assert self.ecam is not None
        return self.ecam + ((self.slot << 15) | (reg & ~3))

    def read32(self, reg: int) -> int:
        if self.arch == "x86_64":
            self.qtest.outl(0xCF8, self._cfg_addr(reg))
            return self.qtest.inl(0xCFC)
        return self.qtest.read_int(self._cfg_addr(reg), 32)

    def write32(self, reg: int, value: int) -> None:
        if self.arch == "x86_64":
            self.qtest.outl(0xCF8, self._cfg_addr(reg))
            self.qtest.outl(0xCFC, value)
        else:
            self.qtest.write_int(self._cfg_addr(reg), 32, value)

    def assign_bar(self, bar: int, address: int) -> None:
        """Program a 64-bit memory BAR (bar, bar+1) to ``address``."""
        self.write32(0x10 + 4 * bar, address & 0xFFFFFFFF)
        self.write32(0x10 + 4 * (bar + 1), address >> 32)
        self.bars[bar] = address

    def enable_memory(self) -> None:
        command = self.read32(0x04) & 0xFFFF
        # Memory space + bus master, as a guest's driver would.
        self.write32(0x04, command | 0x6)

    def reprogram(self) -> None:
        """The BARs back where they were, memory enabled: what a guest's PCI core does
        again after a system reset cleared them."""
        for bar, address in list(self.bars.items()):
            self.assign_bar(bar, address)
        self.enable_memory()

    def start_device(
        self,
        bar4_address: int | None = None,
        *,
        features: int | None = None,
        queues: Sequence[QueueSetup] = (),
    ) -> int:
        """Assign BAR 2 (and BAR 4), enable, then play testbed.virtio's program on the
        common config to DRIVER_OK; returns the features accepted.

        Default: VIRTIO_F_VERSION_1 only, no queue -- the guest's devmem recipe. With
        ``features``: read the device's features and accept those of ``features`` it offers
        (VERSION_1 among them); ``queues`` are set up and enabled before DRIVER_OK.
        """
        bar2, bar4 = _BAR_PLACES[self.arch]
        self.assign_bar(_COMMON_CFG_BAR, bar2)
        self.assign_bar(4, bar4 if bar4_address is None else bar4_address)
        self.enable_memory()
        # The test device moves the modern registers to BAR 2 (BAR 4 holds the shared
        # memory); other devices keep them in BAR 4: the capability says where.
        cap = self._virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG)
        self.common = self.bars[cap.bar] + cap.offset
        if features is None and not queues:
            self._play(DRIVER_OK_PROGRAM)
            return F_VERSION_1
        self._play(ACKNOWLEDGE_PROGRAM)
        offered = self.device_features()
        accepted = offered & (F_VERSION_1 if features is None else features)
        if not accepted & F_VERSION_1:
            raise StateError(
                f"device features {offered:#x}", "VIRTIO_F_VERSION_1", f"00:{self.slot:02x}.0"
            )
        self._play(negotiate_program(accepted, queues))
        return accepted

    def _common(self, offset: int) -> int:
        """The address of ``offset`` in the common config."""
        return self.common_address(offset)

    def common_address(self, offset: int) -> int:
        """The guest-physical address of ``offset`` in the common config (device_status is
        at DEVICE_STATUS): where a guest's driver writes to reset the device."""
        if self.common is None:
            raise StateError("BARs unassigned", "start_device() first", "virtio common config")
        return self.common + offset

    def _play(self, program: tuple[Step, ...]) -> None:
        def write(step: Write) -> None:
            self.qtest.write_int(self._common(step.offset), step.width, step.value)

        def read(step: Expect) -> int:
            return self.qtest.read_int(self._common(step.offset), step.width)

        run_program(program, write, read, f"00:{self.slot:02x}.0")

    def device_features(self) -> int:
        """The 64 device feature bits, as a driver reads them (select 0, then 1)."""
        words = []
        for select in (0, 1):
            self.qtest.write_int(self._common(DEVICE_FEATURE_SELECT), 32, select)
            words.append(self.qtest.read_int(self._common(DEVICE_FEATURE), 32))
        return words[0] | words[1] << 32

    def config_space(self) -> PciFunction:
        """The function's 256-byte config space, parsed (capabilities included)."""
        data = b"".join(self.read32(reg).to_bytes(4, "little") for reg in range(0, 256, 4))
        return parse_config_space(data)

    def _virtio_cap(self, cfg_type: int) -> VirtioCap:
        for cap in self.config_space().virtio_caps:
            if cap.cfg_type == cfg_type:
                if cap.bar not in self.bars:
                    raise StateError(f"BAR {cap.bar} unassigned", "assigned", cap.type_name)
                return cap
        raise TestbedError(f"00:{self.slot:02x}.0 has no virtio capability of type {cfg_type}")

    def notify(self, queue: int) -> None:
        """Kick ``queue``: write its index at its notify address (the notify capability's
        offset + queue_notify_off x notify_off_multiplier)."""
        cap = self._virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG)
        multiplier = self.read32(cap.position + NOTIFY_OFF_MULTIPLIER)
        self.qtest.write_int(self._common(QUEUE_SELECT), 16, queue)
        notify_off = self.qtest.read_int(self._common(QUEUE_NOTIFY_OFF), 16)
        address = self.bars[cap.bar] + cap.offset + notify_off * multiplier
        self.qtest.write_int(address, 16, queue)

    def isr(self) -> int:
        """Read (and so clear) the ISR status byte: bit 0 = a queue interrupt is pending."""
        cap = self._virtio_cap(VIRTIO_PCI_CAP_ISR_CFG)
        return self.qtest.read_int(self.bars[cap.bar] + cap.offset, 8)

    def device_config(self, offset: int, length: int) -> bytes:
        """Bytes of the device-specific config space (QEMU asks the back-end: GET_CONFIG)."""
        cap = self._virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG)
        return self.qtest.read(self.bars[cap.bar] + cap.offset + offset, length)


# A pcie-root-port (testbed.machine.cmdline.behind_root_port_options), programmed as a
# guest's PCI core would: primary bus 0, secondary and subordinate bus 1, and a 64-bit
# prefetchable window covering where PciFunctionDriver puts BAR 2 and BAR 4 (0xc0000000 and
# 0xe0000000 on q35; upper halves 0).
_BUS_NUMBERS = 0x00010100
_SECONDARY_BUS = 1
_PREF_WINDOW = ((0xEFF1 << 16) | 0xC001, 0, 0)


@dataclass
class BehindRootPort(PciFunctionDriver):
    """A function on the root port's secondary bus (bus 1), by q35's 0xcf8/0xcfc."""

    bus: int = _SECONDARY_BUS

    def _cfg_addr(self, reg: int) -> int:
        return 0x80000000 | (self.bus << 16) | (self.slot << 11) | (reg & ~3)


def open_root_port(qtest: QtestClient, arch: str, slot: int | None = None) -> PciFunctionDriver:
    """Program the root port at 00:<slot>.0 (default: the profile's first root-port slot)
    -- bus numbers, the prefetchable window, memory on -- and return the driver of the
    function behind it, 01:00.0 (q35's config ports: x86_64)."""
    port = profile_for(arch).first_root_port_slot if slot is None else slot
    bridge = PciFunctionDriver(qtest, arch, port)
    bridge.write32(0x18, _BUS_NUMBERS)
    for reg, value in zip((0x24, 0x28, 0x2C), _PREF_WINDOW, strict=True):
        bridge.write32(reg, value)
    bridge.enable_memory()
    return BehindRootPort(qtest, arch, 0)


# q35's ACPI PCI hot-plug registers (hw/acpi/ich9.c ACPI_PCIHP_ADDR_ICH9, hw/acpi/pcihp.c):
# select a bus by its ACPI "bsel", then write a slot bitmap to the eject register -- what
# the guest's _EJ0 method does. The root port's bus has bsel 0 (measured: q35's root bus
# is not hot-pluggable and gets none).
ACPI_PCIHP_ICH9 = 0xCC0
PCIHP_EJECT = 0x08
PCIHP_SELECT = 0x10


def acpi_eject(qtest: QtestClient, bsel: int = 0, slot: int = 0) -> None:
    """Eject the device at ``slot`` of the bus ``bsel`` as a q35 guest's ACPI _EJ0 does
    (after device_del: QEMU then completes the unplug, DEVICE_DELETED)."""
    qtest.outl(ACPI_PCIHP_ICH9 + PCIHP_SELECT, bsel)
    qtest.outl(ACPI_PCIHP_ICH9 + PCIHP_EJECT, 1 << slot)


class QtestMachine(QemuMachine):
    """A guest-less QEMU from a QtestConfig, with QMP and (config.qtest) a qtest client.
    Its sockets and, without a logdir, its logs live in a private run dir removed by close().
    """

    def __init__(
        self,
        config: QtestConfig,
        logdir: Path | None = None,
        *,
        qmp_timeout: float = 10.0,
        crash_sites: bool = False,
    ) -> None:
        super().__init__(logdir, qmp_timeout=qmp_timeout, crash_sites=crash_sites)
        self.config = config
        self.qtest: QtestClient | None = None
        self._qtest_listener: socket.socket | None = None

    @property
    def _qtest_socket(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "qtest.sock"

    def _command(self) -> list[str]:
        return build_qtest_command(self.config, self.qmp_socket, self._qtest_socket)

    def _pre_launch(self) -> None:
        if self.config.qtest:
            self._qtest_listener = self._listen(self._qtest_socket)

    def _post_launch(self, deadline: float) -> None:
        if self._qtest_listener is not None:
            self.qtest = QtestClient(self._accept(self._qtest_listener, "qtest", deadline))

    @property
    def ram_base(self) -> int:
        """Where guest RAM starts (config.memory_mib of it): rings and buffers go there."""
        return profile_for(self.config.arch).ram_base

    def memory(self) -> QtestMemory:
        """Guest memory over qtest, for the driver's side of a virtqueue."""
        if self.qtest is None:
            raise StateError("without qtest", "with qtest", "QtestMachine.memory")
        return QtestMemory(self.qtest)

    def pci(self, slot: int = GUESTLESS_SLOT) -> PciFunctionDriver:
        """A PCI/virtio driver for the function at 00:<slot>.0, over qtest."""
        if self.qtest is None:
            raise StateError("without qtest", "with qtest", "QtestMachine.pci")
        return PciFunctionDriver(self.qtest, self.config.arch, slot)

    def pci_device(self, slot: int = GUESTLESS_SLOT) -> dict[str, Any]:
        """query-pci's entry for the function at 00:<slot>.0."""
        for bus in self.qmp("query-pci"):
            for dev in bus["devices"]:
                if dev["bus"] == 0 and dev["slot"] == slot and dev["function"] == 0:
                    return dev
        raise TestbedError(f"no PCI device at 00:{slot:02x}.0 in query-pci")

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.qtest is not None:
                self.qtest.close()
                self.qtest = None
