"""The QEMU command line builders (pure) and the GuestMachine driver against real QEMU (no
guest)."""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from testbed.device import VhostUserDevice
from testbed.errors import ConfigError, QemuExited, QmpCommandFailed, TestbedError, WaitTimeout
from testbed.machine import (
    GuestMachine,
    MachineConfig,
    QtestConfig,
    build_command,
    format_command,
    free_tcp_port,
)
from testbed.machine.cmdline import (
    attach_options,
    bare_command,
    behind_root_port_options,
    build_qtest_command,
    kernel_command_line,
    root_port_option,
)
from testbed.machine.probe import parse_mtree_shmem
from testbed.machine.qtest import acpi_eject, open_root_port
from testbed.paths import make_private_dir, remove_tree


def config(arch: str = "x86_64", **kw: Any) -> MachineConfig:
    base = MachineConfig(
        arch=arch,
        qemu=Path(f"/q/qemu-system-{arch}"),
        accel="tcg",
        kernel=Path("/k/vmlinux"),
        initrd=Path("/k/initrd.gz"),
        qmp_socket=Path("/run/x/qmp.sock"),
        console_log=Path("/logs/console.log"),
        ssh_port=40022,
        kernel_cmdline="quiet rdinit=/init",
    )
    return replace(base, **kw)


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == option]


def test_x86_base_command() -> None:
    argv = build_command(config())
    assert argv[0] == "/q/qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert "-S" not in argv
    assert option_values(argv, "-display") == ["none"]
    assert option_values(argv, "-accel") == ["tcg"]
    assert option_values(argv, "-machine") == ["q35,memory-backend=mem"]
    assert option_values(argv, "-object") == ["memory-backend-memfd,id=mem,size=512M,share=on"]
    assert option_values(argv, "-m") == ["512M"]
    assert option_values(argv, "-cpu") == ["max"]
    assert option_values(argv, "-kernel") == ["/k/vmlinux"]
    assert option_values(argv, "-initrd") == ["/k/initrd.gz"]
    assert option_values(argv, "-append") == [
        "quiet rdinit=/init console=ttyS0 noapictimer noreplace-smp"
    ]
    assert option_values(argv, "-qmp") == ["unix:/run/x/qmp.sock,server=on,wait=off"]
    assert option_values(argv, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22"]
    devices = option_values(argv, "-device")
    assert "virtio-net-pci,netdev=net0,bus=pcie.0,addr=0x2,romfile=" in devices
    assert "virtio-rng-pci,bus=pcie.0,addr=0x3" in devices
    assert "file,id=console,path=/logs/console.log" in option_values(argv, "-chardev")
    assert option_values(argv, "-serial") == ["chardev:console"]


def test_qmp_dials_us_only_for_a_machine() -> None:
    """The QemuMachine listens and QEMU dials; a command run by hand has QEMU listen."""
    argv = build_command(config(), paused=True, dial_qmp=True)
    assert option_values(argv, "-qmp") == ["unix:/run/x/qmp.sock"]


def test_guestless_commands() -> None:
    qmp, qtest = Path("/r/qmp.sock"), Path("/r/qtest.sock")
    dev = VhostUserDevice("vu0", Path("/r/vu.sock"))
    cfg = QtestConfig("aarch64", Path("/q"), (dev,), qtest=False)
    argv = build_qtest_command(cfg, qmp, qtest)
    assert argv[:2] == ["/q", "-nodefaults"]
    assert "-S" in argv and option_values(argv, "-accel") == ["tcg"]
    assert "-qtest" not in argv
    assert option_values(argv, "-machine") == ["virt,memory-backend=mem"]
    assert option_values(argv, "-object") == ["memory-backend-memfd,id=mem,size=256M,share=on"]
    assert option_values(argv, "-chardev") == ["socket,id=vu0,path=/r/vu.sock"]
    assert option_values(argv, "-device") == [
        "vhost-user-test-device-pci,id=vu0-dev,chardev=vu0,virtio-id=26,num_vqs=1,"
        "bus=pcie.0,addr=0x3"
    ]
    assert option_values(argv, "-qmp") == ["unix:/r/qmp.sock"]
    argv = build_qtest_command(QtestConfig("x86_64", Path("/q"), (dev,), listen=True), qmp, qtest)
    assert option_values(argv, "-accel") == ["qtest"] and "-S" not in argv
    assert option_values(argv, "-qtest") == ["unix:/r/qtest.sock"]
    assert option_values(argv, "-machine") == ["q35,memory-backend=mem"]
    assert option_values(argv, "-chardev") == ["socket,id=vu0,path=/r/vu.sock,server=on"]
    assert bare_command(Path("/q"), qmp)[-4:] == ["-machine", "none", "-qmp", "unix:/r/qmp.sock"]


def test_attach_options() -> None:
    q35 = attach_options("x86_64", Path("/s"))
    assert option_values(q35, "-machine") == ["q35,memory-backend=mem"]
    assert option_values(q35, "-m") == ["512M"]
    assert option_values(q35, "-chardev") == ["socket,id=vu0,path=/s"]
    with pytest.raises(ConfigError, match="unknown architecture"):
        attach_options("riscv64", Path("/s"))


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
    mib = 1 << 20
    assert parse_mtree_shmem(text) == {
        "vhost-device-pci-shmembar": (0xC0000000, 4 * mib),
        "virtio-shmem-0": (0xC0000000, 2 * mib),
        "virtio-shmem-1": (0xC0200000, 2 * mib),
        "virtio-shmem-1-0": (0xC0200000, 1 * mib),
    }


def test_paused_adds_dash_s_last() -> None:
    argv = build_command(config(extra_args=("-d", "guest_errors")), paused=True)
    assert argv[-3:] == ["-d", "guest_errors", "-S"]


def test_aarch64_profile_and_kvm_cpu() -> None:
    argv = build_command(config("aarch64"))
    assert option_values(argv, "-machine") == ["virt,memory-backend=mem"]
    assert option_values(argv, "-cpu") == ["max,pauth=off"]
    assert option_values(argv, "-append")[0].endswith("console=ttyAMA0")
    assert option_values(build_command(config("aarch64", accel="kvm")), "-cpu") == ["host"]
    assert option_values(build_command(config(accel="kvm")), "-cpu") == ["host"]


def test_cpu_override_and_phys_bits() -> None:
    argv = build_command(config(cpu="qemu64", phys_bits=44))
    assert option_values(argv, "-cpu") == ["qemu64,phys-bits=44"]
    with pytest.raises(ConfigError, match="phys_bits"):
        build_command(config("aarch64", phys_bits=44))


def test_kernel_command_line_keeps_image_console_and_appends_extras() -> None:
    cfg = config(
        kernel_cmdline="console=hvc0 quiet", accel="kvm", extra_kernel_args=("iomem=relaxed",)
    )
    assert kernel_command_line(cfg) == "console=hvc0 quiet iomem=relaxed"
    # aarch64 has no firmware sizing hot-plug windows: pciehp takes the size from here.
    cfg = config("aarch64", root_ports=1, root_port_pref64=128 * 1024 * 1024)
    assert "pci=hpmmioprefsize=128M" in kernel_command_line(cfg).split()
    assert "hpmmioprefsize" not in kernel_command_line(config(root_ports=1))


def test_tcg_only_kernel_args_come_before_extras_and_only_under_tcg() -> None:
    tcg = kernel_command_line(config(extra_kernel_args=("initcall_debug",))).split()
    assert tcg[-3:] == ["noapictimer", "noreplace-smp", "initcall_debug"]
    kvm = kernel_command_line(config(accel="kvm")).split()
    assert "noapictimer" not in kvm and "noreplace-smp" not in kvm
    # an image that already asks for one does not get it twice
    own = kernel_command_line(config(kernel_cmdline="console=ttyS0 noapictimer")).split()
    assert own.count("noapictimer") == 1
    assert "noapictimer" not in kernel_command_line(config("aarch64")).split()


def test_root_port_option_is_the_same_for_guests_and_guest_less_qemus() -> None:
    assert root_port_option(0, "pcie.0", 8) == "pcie-root-port,id=rp0,bus=pcie.0,addr=0x8,chassis=1"
    assert (
        root_port_option(1, "pcie.0", 9, 64 * 1024 * 1024)
        == "pcie-root-port,id=rp1,bus=pcie.0,addr=0x9,chassis=2,pref64-reserve=64M"
    )
    device = VhostUserDevice("vu0", Path("/run/x/vu.sock"), bus="rp0", addr=0)
    for arch in ("x86_64", "aarch64"):
        assert behind_root_port_options(arch, device) == [
            "-device",
            "pcie-root-port,id=rp0,bus=pcie.0,addr=0x8,chassis=1",
            "-chardev",
            "socket,id=vu0,path=/run/x/vu.sock",
            "-device",
            "vhost-user-test-device-pci,id=vu0-dev,chardev=vu0,virtio-id=26,num_vqs=1,"
            "bus=rp0,addr=0x0",
        ]


class PortsOnly:
    """A qtest client that records port writes and reads every port as 0."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def outl(self, port: int, value: int) -> None:
        self.writes.append((port, value))

    def inl(self, port: int) -> int:
        return 0


def test_open_root_port_and_acpi_eject_write_what_a_q35_guest_writes() -> None:
    qtest = PortsOnly()
    function = open_root_port(qtest, "x86_64")  # type: ignore[arg-type]
    port = 0x80000000 | (8 << 11)  # 00:08.0, the profile's first root-port slot
    assert qtest.writes == [
        (0xCF8, port | 0x18), (0xCFC, 0x00010100),  # buses: primary 0, secondary 1
        (0xCF8, port | 0x24), (0xCFC, (0xEFF1 << 16) | 0xC001),  # prefetchable window
        (0xCF8, port | 0x28), (0xCFC, 0),
        (0xCF8, port | 0x2C), (0xCFC, 0),
        (0xCF8, port | 0x04), (0xCF8, port | 0x04), (0xCFC, 0x6),  # memory + bus master
    ]  # fmt: skip
    assert function._cfg_addr(0x10) == 0x80000000 | (1 << 16) | 0x10  # 01:00.0
    qtest.writes.clear()
    acpi_eject(qtest)  # type: ignore[arg-type]
    assert qtest.writes == [(0xCC0 + 0x10, 0), (0xCC0 + 0x08, 1)]


def test_root_ports_and_vhost_user_devices() -> None:
    devs = (
        VhostUserDevice("vu0", Path("/run/x/vu0.sock")),
        VhostUserDevice("vu1", Path("/run/x/vu1.sock"), bus="rp1"),
        VhostUserDevice("vu2", Path("/run/x/vu2.sock"), num_vqs=2, virtio_id=4),
    )
    argv = build_command(config(root_ports=2, vhost_user_devices=devs))
    devices = option_values(argv, "-device")
    assert "pcie-root-port,id=rp0,bus=pcie.0,addr=0x8,chassis=1,pref64-reserve=128M" in devices
    assert "pcie-root-port,id=rp1,bus=pcie.0,addr=0x9,chassis=2,pref64-reserve=128M" in devices
    assert (
        "vhost-user-test-device-pci,id=vu0-dev,chardev=vu0,virtio-id=26,num_vqs=1,"
        "bus=pcie.0,addr=0x10" in devices
    )
    assert (
        "vhost-user-test-device-pci,id=vu1-dev,chardev=vu1,virtio-id=26,num_vqs=1,"
        "bus=rp1,addr=0x0" in devices
    )
    assert (
        "vhost-user-test-device-pci,id=vu2-dev,chardev=vu2,virtio-id=4,num_vqs=2,"
        "bus=pcie.0,addr=0x11" in devices
    )
    chardevs = option_values(argv, "-chardev")
    assert "socket,id=vu1,path=/run/x/vu1.sock" in chardevs


def test_reconnect_ms_goes_on_the_chardev_only() -> None:
    devs = (
        VhostUserDevice("vu0", Path("/s/vu0.sock"), reconnect_ms=250),
        VhostUserDevice("vu1", Path("/s/vu1.sock")),
    )
    argv = build_command(config(vhost_user_devices=devs))
    chardevs = option_values(argv, "-chardev")
    assert "socket,id=vu0,path=/s/vu0.sock,reconnect-ms=250" in chardevs
    assert "socket,id=vu1,path=/s/vu1.sock" in chardevs
    assert not any("reconnect" in d for d in option_values(argv, "-device"))


def test_explicit_slot_is_skipped_by_automatic_assignment() -> None:
    devs = (
        VhostUserDevice("a", Path("/s/a"), addr=0x10),
        VhostUserDevice("b", Path("/s/b")),
    )
    devices = option_values(build_command(config(vhost_user_devices=devs)), "-device")
    assert any(
        d.startswith("vhost-user-test-device-pci,id=b-dev") and "addr=0x11" in d for d in devices
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch": "riscv64"}, "unknown architecture"),
        ({"accel": "hvf"}, "accelerator"),
        ({"memory_mib": 64}, "too small"),
        ({"ssh_port": 0}, "TCP port"),
        ({"root_ports": 9}, "root ports"),
        ({"vhost_user_devices": (VhostUserDevice("x", Path("/s"), bus="rp3"),)}, "bus"),
        (
            {
                "vhost_user_devices": (
                    VhostUserDevice("x", Path("/s")),
                    VhostUserDevice("x", Path("/t")),
                )
            },
            "unique",
        ),
    ],
)
def test_invalid_configs_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_command(config(**changes))


def test_format_command_is_pasteable() -> None:
    argv = build_command(config(kernel_cmdline="quiet a='b c'"), paused=True)
    text = format_command(argv)
    assert text.count("\n") > 10
    assert shlex.split(text.replace("\\\n", " ")) == argv


# -- real QEMU, no guest --------------------------------------------------------------------

AARCH64_QEMU = Path.home() / ".cache/testbed/qemu/bin/qemu-system-aarch64"


@pytest.fixture
def rundir() -> Iterator[Path]:
    path = make_private_dir("test-machine")
    yield path
    remove_tree(path)


def spin_config(rundir: Path, **kw: Any) -> MachineConfig:
    """aarch64 virt boots a raw image at the kernel address: one `b .` spins forever."""
    if not AARCH64_QEMU.exists():
        pytest.skip(f"no provisioned QEMU at {AARCH64_QEMU}: run `testbed qemu provision`")
    image = rundir / "spin.bin"
    image.write_bytes(bytes.fromhex("00000014"))  # AArch64 `b .`
    base = MachineConfig(
        arch="aarch64",
        qemu=AARCH64_QEMU,
        accel="tcg",
        kernel=image,
        initrd=None,
        qmp_socket=rundir / "qmp.sock",
        console_log=rundir / "console.log",
        ssh_port=free_tcp_port(),
        memory_mib=128,
        rng=False,
    )
    return replace(base, **kw)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.qemu
def test_machine_qmp_events_and_clean_shutdown(rundir: Path) -> None:
    with GuestMachine(spin_config(rundir, root_ports=1), rundir) as machine:
        machine.start()
        pid = machine.pid
        assert pid is not None
        assert machine.qmp("query-status")["status"] == "running"
        assert 'pcie-root-port, id "rp0"' in machine.hmp("info qtree")
        machine.qmp("stop")
        assert machine.wait_event("STOP", timeout=5)["event"] == "STOP"
        with pytest.raises(WaitTimeout, match="STOP"):
            machine.wait_event("STOP", timeout=0.2)  # the one STOP was consumed
        with pytest.raises(QmpCommandFailed, match="DeviceNotFound"):
            machine.qmp("device_del", id="no-such-device")
        assert machine.shutdown(timeout=10) == 0
    assert not pid_alive(pid)
    assert not (rundir / "qmp.sock").exists()
    cmdline = (rundir / "qemu-cmdline.txt").read_text()
    assert shlex.split(cmdline.replace("\\\n", " "))[-1] == "-S"
    qmp_log = (rundir / "qmp.log").read_text()
    assert '"execute": "cont"' in qmp_log and '"event": "STOP"' in qmp_log


@pytest.mark.qemu
def test_machine_waits_on_chardev_state_and_stderr(rundir: Path) -> None:
    """QEMU's own view of a reconnecting chardev (query-chardev), which device_add acts
    on: disconnected until a listener appears and QEMU's main loop took the connection in,
    disconnected again once QEMU saw the hang-up."""
    path = rundir / "late.sock"
    with GuestMachine(spin_config(rundir), rundir) as machine:
        machine.start()
        machine.qmp(
            "chardev-add",
            {
                "id": "late",
                "backend": {
                    "type": "socket",
                    "data": {
                        "addr": {"type": "unix", "data": {"path": str(path)}},
                        "server": False,
                        "reconnect-ms": 50,
                    },
                },
            },
        )
        machine.wait_stderr(r"Unable to connect character device late\b", timeout=10)
        assert not machine.chardev_connected("late")
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
            listener.listen(1)
            machine.wait_chardev("late", connected=True, timeout=10)
            peer, _ = listener.accept()
            peer.close()
            machine.wait_chardev("late", connected=False, timeout=10)
        with pytest.raises(TestbedError, match="no chardev 'nope'"):
            machine.chardev_connected("nope")
        with pytest.raises(WaitTimeout, match="never printed"):
            machine.wait_stderr("never printed", timeout=0.2)


@pytest.mark.qemu
def test_machine_close_kills_and_is_idempotent(rundir: Path) -> None:
    machine = GuestMachine(spin_config(rundir), rundir)
    machine.start()
    pid = machine.pid
    assert pid is not None
    machine.close()
    machine.close()
    assert not pid_alive(pid)
    assert machine.returncode == -9


@pytest.mark.qemu
def test_machine_reports_qemu_exit_with_stderr(rundir: Path) -> None:
    missing = rundir / "no-such.sock"
    cfg = spin_config(rundir, vhost_user_devices=(VhostUserDevice("vu0", missing),))
    with GuestMachine(cfg, rundir) as machine, pytest.raises(QemuExited) as info:
        machine.start()
    assert info.value.returncode == 1
    assert str(missing) in info.value.stderr_tail


@pytest.mark.qemu
def test_machine_retries_taken_ssh_port(rundir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with GuestMachine(spin_config(rundir, ssh_port=taken), rundir) as machine:
            machine.start()
            assert machine.ssh_port != taken
            assert (
                "Could not set up host forwarding rule" in (rundir / "qemu-stderr.log").read_text()
            )


def test_free_tcp_port_never_hands_out_a_port_twice() -> None:
    """Threads starting VMs at once must not get the same port (the kernel can offer a
    port again as soon as our probe socket closes, long before QEMU binds it)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        ports = list(pool.map(lambda _: free_tcp_port(), range(200)))
    assert len(set(ports)) == len(ports)
    assert all(0 < p < 65536 for p in ports)


def test_private_dir_too_long_for_sockets_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from testbed import paths
    from testbed.errors import ConfigError

    deep = tmp_path / ("d" * 100)
    monkeypatch.setenv("TESTBED_TMPDIR", str(deep))
    with pytest.raises(ConfigError, match="TESTBED_TMPDIR"):
        paths.make_private_dir("run")
    assert list(deep.iterdir()) == []
