"""Guest-less QEMU attached to our back-end: the shared-memory support probe and test driver.

QEMU runs with -nodefaults, memfd RAM (vhost-user needs shareable memory), no kernel, and
either ``-accel tcg -S`` (nothing executes) or ``-accel qtest``: then the qtest protocol lets
us act as the guest's PCI core -- assign BARs, write the virtio common config up to
DRIVER_OK -- so SHMEM_MAP/UNMAP can be exercised without booting anything.
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from testbed.errors import (
    ConfigError,
    ProtocolError,
    QemuExited,
    StateError,
    TestbedError,
    WaitTimeout,
)
from testbed.paths import make_private_dir, remove_tree
from testbed.resource import Closeable
from testbed.vhost_user.backend import Backend
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import Request
from testbed.vhost_user.shmem import ShmemLayout

log = logging.getLogger(__name__)

# virtio-id must be in QEMU's own name table (others abort 11.1.3); 26 is known good.
VIRTIO_ID = 26
DEVICE_SLOT = 3
MACHINES = {"x86_64": "q35", "aarch64": "virt"}
PROBE_LAYOUT = ShmemLayout({0: 2 << 20})


def machine_type(arch: str) -> str:
    try:
        return MACHINES[arch]
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r}: use x86_64 or aarch64") from None


def attach_options(
    arch: str,
    socket_path: Path,
    *,
    chardev_id: str = "vu0",
    memory: str = "512M",
    slot: int | None = None,
    server: bool = False,
) -> list[str]:
    """QEMU options attaching vhost-user-test-device-pci to a back-end listening on
    ``socket_path`` (``server``: QEMU listens and the back-end connects), with the
    shareable (memfd) guest RAM vhost-user needs. Pure."""
    addr = f",addr={slot:#x}.0" if slot is not None else ""
    # wait=on (the default): QEMU blocks until the back-end connects; with wait=off the
    # device realizes unconnected and fails ("Failed to set msg fds").
    listen = ",server=on" if server else ""
    return [
        "-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
        "-machine", f"{machine_type(arch)},memory-backend=mem",
        "-m", memory,
        "-chardev", f"socket,id={chardev_id},path={socket_path}{listen}",
        "-device",
        f"vhost-user-test-device-pci,chardev={chardev_id},virtio-id={VIRTIO_ID},"
        f"bus=pcie.0{addr}",
    ]  # fmt: skip


def guestless_command(
    qemu: Path,
    arch: str,
    socket_path: Path,
    qmp_path: Path,
    *,
    qtest_path: Path | None = None,
    memory: str = "256M",
    server: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of a guest-less QEMU: QMP (and qtest) connect to our listeners."""
    argv = [str(qemu), "-nodefaults", "-display", "none", "-no-user-config"]
    if qtest_path is not None:
        argv += ["-accel", "qtest", "-qtest", f"unix:{qtest_path}", "-qtest-log", "/dev/null"]
    else:
        argv += ["-accel", "tcg", "-S"]
    argv += attach_options(arch, socket_path, memory=memory, slot=DEVICE_SLOT, server=server)
    argv += ["-qmp", f"unix:{qmp_path}", *extra]
    return argv


_MTREE_LINE = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, [\w/-]+\): "
    r"(vhost-device-pci-shmembar|virtio-shmem-\d+(?:-\d+)?)\s*$"
)


def parse_mtree_shmem(text: str) -> dict[str, tuple[int, int]]:
    """From ``info mtree``: name -> (start, size) of the shared-memory BAR and its regions
    (``virtio-shmem-<shmid>``, mappings ``virtio-shmem-<shmid>-<offset>``). Pure."""
    found: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        match = _MTREE_LINE.match(line)
        if match:
            start, end = int(match.group(1), 16), int(match.group(2), 16)
            found.setdefault(match.group(3), (start, end - start + 1))
    return found


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


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

    def outw(self, port: int, value: int) -> None:
        self.command(f"outw {port:#x} {value:#x}")

    def inl(self, port: int) -> int:
        return int(self.command(f"inl {port:#x}"), 16)

    def readl(self, addr: int) -> int:
        return int(self.command(f"readl {addr:#x}"), 16)

    def writeb(self, addr: int, value: int) -> None:
        self.command(f"writeb {addr:#x} {value:#x}")

    def writew(self, addr: int, value: int) -> None:
        self.command(f"writew {addr:#x} {value:#x}")

    def writel(self, addr: int, value: int) -> None:
        self.command(f"writel {addr:#x} {value:#x}")

    def readb(self, addr: int) -> int:
        return int(self.command(f"readb {addr:#x}"), 16)

    def read(self, addr: int, length: int) -> bytes:
        return bytes.fromhex(self.command(f"read {addr:#x} {length:#x}")[2:])

    def write(self, addr: int, data: bytes) -> None:
        self.command(f"write {addr:#x} {len(data):#x} 0x{data.hex()}")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


# PCI config space access, per machine: q35 by the 0xcf8/0xcfc ports; virt by its ECAM
# window: the high one (256 GiB + 256 MiB) when highmem is on -- the default --, else the
# low one. The driver picks the window where our device's vendor id reads back.
_VIRT_ECAMS = (0x40_1000_0000, 0x3F000000)
_VIRTIO_VENDOR = 0x1AF4
# Where we place the BARs. q35: inside the 32-bit PCI hole; virt: inside its 32-bit
# PCI MMIO window (0x10000000-0x3efeffff). 64-bit BARs get their high half 0.
_BAR_PLACES = {"x86_64": (0xE0000000, 0xC0000000), "aarch64": (0x3E000000, 0x20000000)}
_STATUS_OFFSET = 0x14  # device_status in the virtio common config
_COMMON_CFG_BAR = 2  # measured: the modern virtio registers sit at BAR 2 offset 0


@dataclass
class PciFunctionDriver:
    """Acts as the guest's PCI core and virtio driver for one function, through qtest."""

    qtest: QtestClient
    arch: str
    slot: int = DEVICE_SLOT
    bars: dict[int, int] = field(default_factory=dict)

    ecam: int | None = None

    def __post_init__(self) -> None:
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
        return self.qtest.readl(self._cfg_addr(reg))

    def write32(self, reg: int, value: int) -> None:
        if self.arch == "x86_64":
            self.qtest.outl(0xCF8, self._cfg_addr(reg))
            self.qtest.outl(0xCFC, value)
        else:
            self.qtest.writel(self._cfg_addr(reg), value)

    def assign_bar(self, bar: int, address: int) -> None:
        """Program a 64-bit memory BAR (bar, bar+1) to ``address``."""
        self.write32(0x10 + 4 * bar, address & 0xFFFFFFFF)
        self.write32(0x10 + 4 * (bar + 1), address >> 32)
        self.bars[bar] = address

    def enable_memory(self) -> None:
        command = self.read32(0x04) & 0xFFFF
        # Memory space + bus master, as a guest's driver would.
        self.write32(0x04, command | 0x6)

    def start_device(self, bar4_address: int | None = None) -> None:
        """Assign BAR 2 (and BAR 4), enable, then walk device_status to DRIVER_OK with
        VIRTIO_F_VERSION_1 negotiated -- the same steps the measured devmem recipe uses."""
        if self.arch not in _BAR_PLACES:
            raise ConfigError(f"no PCI driver for {self.arch!r}")
        bar2, bar4 = _BAR_PLACES[self.arch]
        self.assign_bar(_COMMON_CFG_BAR, bar2)
        self.assign_bar(4, bar4 if bar4_address is None else bar4_address)
        self.enable_memory()
        common = bar2
        status = common + _STATUS_OFFSET
        self.qtest.writeb(status, 0)  # reset
        self.qtest.writeb(status, 1)  # ACKNOWLEDGE
        self.qtest.writeb(status, 3)  # DRIVER
        self.qtest.writel(common + 0x08, 1)  # driver_feature_select: bits 32..63
        self.qtest.writel(common + 0x0C, 1)  # VIRTIO_F_VERSION_1 (bit 32)
        self.qtest.writel(common + 0x08, 0)
        self.qtest.writel(common + 0x0C, 0)
        self.qtest.writeb(status, 0xB)  # FEATURES_OK
        if not self.qtest.readb(status) & 0x8:
            raise TestbedError("the device refused FEATURES_OK (VERSION_1 only)")
        self.qtest.writeb(status, 0xF)  # DRIVER_OK


class GuestlessQemu(Closeable):
    """One guest-less QEMU process with QMP (and optionally qtest). Context manager;
    close() is idempotent and kills what is left."""

    def __init__(
        self,
        qemu: Path,
        arch: str,
        socket_path: Path,
        *,
        qtest: bool = False,
        memory: str = "256M",
        server: bool = False,
        extra: Sequence[str] = (),
        start_timeout: float = 20.0,
    ) -> None:
        self.qemu = Path(qemu)
        self.arch = arch
        self.socket_path = Path(socket_path)
        self.use_qtest = qtest
        self.memory = memory
        self.server = server
        self.extra = tuple(extra)
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.argv: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._qmp: QEMUMonitorProtocol | None = None
        self.qtest: QtestClient | None = None

    def start(self) -> GuestlessQemu:
        if self._proc is not None or self.dir is not None:
            raise StateError("started", "new", "GuestlessQemu.start")
        self.dir = make_private_dir("qemu")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        assert self.dir is not None
        qmp_path = self.dir / "qmp.sock"
        qtest_path = self.dir / "qtest.sock" if self.use_qtest else None
        # We listen and QEMU connects as client: no polling for QEMU's sockets to appear,
        # and a QEMU that dies early is noticed at once (see _accept).
        listeners = {"QMP": _listen(qmp_path)}
        if qtest_path is not None:
            listeners["qtest"] = _listen(qtest_path)
        try:
            self.argv = guestless_command(
                self.qemu, self.arch, self.socket_path, qmp_path,
                qtest_path=qtest_path, memory=self.memory, server=self.server,
                extra=self.extra,
            )  # fmt: skip
            self._stderr = (self.dir / "stderr.log").open("wb")
            log.debug("starting %s", " ".join(self.argv))
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
                process_group=0,
            )
            deadline = time.monotonic() + self.start_timeout
            if "qtest" in listeners:
                # QEMU connects qtest first and waits for it before it opens QMP.
                self.qtest = QtestClient(self._accept(listeners["qtest"], "qtest", deadline))
            qmp_sock = self._accept(listeners["QMP"], "QMP", deadline)
            self._qmp = QEMUMonitorProtocol(qmp_sock)
            try:
                self._qmp.connect()
            except Exception as exc:  # qemu.qmp's ConnectError: QEMU hung up (died)
                raise self._died("negotiating QMP", deadline) from exc
            self._qmp.settimeout(10.0)
        finally:
            for listener in listeners.values():
                listener.close()

    def _died(self, what: str, deadline: float) -> TestbedError:
        """The error for QEMU hanging up on us: its exit status and stderr, if it exited."""
        assert self._proc is not None
        try:
            self._proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return WaitTimeout(f"QEMU closed its socket while {what} but kept running")
        return QemuExited(
            f"QEMU exited while {what}", self._proc.returncode, self.stderr_text()[-3000:]
        )

    def _accept(self, listener: socket.socket, what: str, deadline: float) -> socket.socket:
        """Accept QEMU's connection, checking in short slices that QEMU is still alive."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(
                    f"QEMU did not connect {what} within {self.start_timeout:.0f}s: "
                    f"{self.stderr_text()[-500:]}"
                )
            readable, _, _ = select.select([listener], [], [], min(remaining, 0.05))
            if readable:
                conn, _ = listener.accept()
                conn.setblocking(True)
                return conn
            if self._proc is not None and self._proc.poll() is not None:
                raise QemuExited(
                    f"QEMU exited before connecting {what}",
                    self._proc.returncode,
                    self.stderr_text()[-3000:],
                )

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def stderr_text(self) -> str:
        if self.dir is None:
            return ""
        with contextlib.suppress(OSError):
            return (self.dir / "stderr.log").read_text(errors="replace")
        return ""

    def qmp(self, command: str, **args: Any) -> Any:
        if self._qmp is None:
            raise StateError("not started", "started", "GuestlessQemu.qmp")
        return self._qmp.cmd(command, **args)

    def hmp(self, command_line: str) -> str:
        result: str = self.qmp("human-monitor-command", **{"command-line": command_line})
        return result

    def pci_device(self, slot: int = DEVICE_SLOT) -> dict[str, Any]:
        """query-pci's entry for our device (bus 0)."""
        for bus in self.qmp("query-pci"):
            for dev in bus["devices"]:
                if dev["bus"] == 0 and dev["slot"] == slot and dev["function"] == 0:
                    return dev
        raise TestbedError(f"no PCI device at 00:{slot:02x}.0 in query-pci")

    def wait_exit(self, timeout: float) -> int:
        if self._proc is None:
            raise StateError("not started", "started", "GuestlessQemu.wait_exit")
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"QEMU did not exit within {timeout:.1f}s") from None

    def quit(self, timeout: float = 10.0) -> int:
        """QMP quit, then wait for the exit status."""
        with contextlib.suppress(Exception):
            self.qmp("quit")
        return self.wait_exit(timeout)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                if self._qmp is not None:
                    self._qmp.cmd("quit")
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self.qtest is not None:
            self.qtest.close()
            self.qtest = None
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            with contextlib.suppress(Exception):
                qmp.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self.dir is not None:
            remove_tree(self.dir)
            self.dir = None

    def __enter__(self) -> GuestlessQemu:
        return self.start()


@dataclass(frozen=True)
class ProbeResult:
    supported: bool
    detail: str
    requests_seen: list[str]


def probe_shmem_support(qemu_path: Path | str, arch: str, timeout: float = 20.0) -> ProbeResult:
    """Start ``qemu_path`` guest-less with our back-end attached and see whether it asks
    GET_SHMEM_CONFIG (VHOST_USER_PROTOCOL_F_SHMEM, bit 22 in QEMU 11.1). Never raises for
    an unsupported QEMU: the answer is in the result."""
    sockdir = make_private_dir("probe")
    seen: list[str] = []
    try:
        with Backend(sockdir / "vu.sock", PROBE_LAYOUT, faults=Faults()) as backend:
            qemu = GuestlessQemu(Path(qemu_path), arch, sockdir / "vu.sock",
                                 start_timeout=timeout)  # fmt: skip
            try:
                qemu.start()
                backend.wait_for_request(Request.GET_SHMEM_CONFIG, timeout)
                bar = pci_bar(qemu.pci_device(), 4)
                seen = [r.name for r in backend.requests_seen]
                if bar is None or bar["size"] != PROBE_LAYOUT.total:
                    return ProbeResult(
                        False,
                        f"GET_SHMEM_CONFIG was answered but BAR 4 is {bar}; expected "
                        f"{PROBE_LAYOUT.total} bytes",
                        seen,
                    )
                return ProbeResult(
                    True, "QEMU sent GET_SHMEM_CONFIG and exposed BAR 4 of the served size", seen
                )
            except QemuExited as exc:
                seen = [r.name for r in backend.requests_seen]
                return ProbeResult(False, f"QEMU could not start the device: {exc}", seen)
            except WaitTimeout:
                seen = [r.name for r in backend.requests_seen]
                stderr = qemu.stderr_text().strip()[-500:]
                why = "never connected" if not seen else "never asked GET_SHMEM_CONFIG"
                return ProbeResult(
                    False,
                    f"QEMU {why} within {timeout:.0f}s; it lacks vhost-user shared memory "
                    f"(needs QEMU 11.1){': ' + stderr if stderr else ''}",
                    seen,
                )
            finally:
                qemu.close()
    finally:
        remove_tree(sockdir)


def pci_bar(device: dict[str, Any], index: int) -> dict[str, Any] | None:
    """query-pci region of BAR ``index`` (address, size, prefetch, mem_type_64), or None."""
    for region in device.get("regions", []):
        if region.get("bar") == index:
            return region
    return None
