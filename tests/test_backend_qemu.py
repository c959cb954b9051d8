"""Our back-end against real QEMU 11.1.3, no guest: QEMU's own view via QMP (query-pci,
info mtree), and the data path driven through qtest (we play the guest's PCI core)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.bugs import KnownBugSeen
from testbed.bugs.marks import known_bug
from testbed.device import ShmemLayout, VhostUserDevice
from testbed.errors import QemuExited, StateError, TestbedError
from testbed.host.qemu import resolve_qemu
from testbed.machine import QtestConfig, QtestMachine
from testbed.machine.probe import parse_mtree_shmem, pci_bar, probe_shmem_support
from testbed.paths import make_private_dir, remove_tree
from testbed.vhost_user.backend import Backend, DisconnectKind
from testbed.vhost_user.codes import BackendRequest, Request
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import U64, Header, MMap
from testbed.vhost_user.shmem import Memfd
from testbed.vhost_user.trace import CHANNEL_FROM_QEMU, TO_QEMU
from testbed.virtio import DEVICE_STATUS

pytestmark = pytest.mark.qemu

M = 1 << 20
G = 1 << 30
TIMEOUT = 20.0

# The realize handshake QEMU 11.1.3 sends (platform facts, confirmed on the wire).
REALIZE = [
    "GET_FEATURES",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "SET_BACKEND_REQ_FD",
    "SET_OWNER",
    "GET_FEATURES",
    "SET_VRING_CALL",
    "SET_VRING_ERR",
    "GET_SHMEM_CONFIG",
]


def _qemu(arch: str) -> Path:
    try:
        return resolve_qemu(arch).path
    except TestbedError as exc:
        pytest.skip(f"no QEMU 11.1 for {arch}: {exc}")


def _machine(
    arch: str, socket: Path, *, qtest: bool = False, listen: bool = False, sites: bool = False
) -> QtestMachine:
    """A guest-less QEMU (not started) with one vhost-user device on ``socket``; ``sites``:
    gdb attached, for the site of a crash that prints nothing (the kernel's log may have
    no line for it: rate-limited while a campaign runs, or unreadable)."""
    device = VhostUserDevice("vu0", socket)
    config = QtestConfig(arch, _qemu(arch), (device,), qtest=qtest, listen=listen)
    return QtestMachine(config, crash_sites=sites)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = make_private_dir("test-vu")
    yield path
    remove_tree(path)


def _bar4_place(total: int) -> int:
    # Aligned to its size; above 4 GiB for the big ones (the pci container takes any address).
    return 0xC0000000 if total <= 256 * M else 0x40_0000_0000


LAYOUTS = {
    "none": {},
    "one": {0: 4 * M},
    "two": {0: 2 * M, 1: 2 * M},
    "sparse-3-200": {3: 8 * M, 200: 8 * M},
    "4GiB": {5: 4 * G},
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_appears_in_qemu_x86(name: str, sockdir: Path) -> None:
    layout = ShmemLayout(LAYOUTS[name])
    trace_path = sockdir / "trace.jsonl"
    with (
        Backend(sockdir / "vu.sock", layout, trace_path=trace_path) as backend,
        _machine("x86_64", sockdir / "vu.sock", qtest=True).start() as qemu,
    ):
        backend.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
        assert backend.trace.names()[: len(REALIZE)] == REALIZE
        bar4 = pci_bar(qemu.pci_device(), 4)
        if not layout:
            assert bar4 is None
            assert "virtio-shmem" not in qemu.hmp("info mtree")
            return
        assert bar4 is not None
        assert bar4["size"] == layout.total
        assert bar4["prefetch"] and bar4["mem_type_64"]
        # Place BAR 4 as a guest would, then read the regions' offsets from QEMU's tree.
        pci = qemu.pci()
        base = _bar4_place(layout.total)
        pci.assign_bar(4, base)
        pci.enable_memory()
        tree = parse_mtree_shmem(qemu.hmp("info mtree"))
        assert tree["vhost-device-pci-shmembar"] == (base, layout.total)
        shown = {k for k in tree if k.startswith("virtio-shmem-")}
        assert shown == {f"virtio-shmem-{shmid}" for shmid in layout.regions}
        for shmid, offset in layout.offsets().items():
            assert tree[f"virtio-shmem-{shmid}"] == (base + offset, layout.regions[shmid])
    assert trace_path.read_text().count("\n") == len(backend.trace.entries())


def test_layout_aarch64_virt(sockdir: Path) -> None:
    layout = ShmemLayout({3: 8 * M, 200: 8 * M})
    with (
        Backend(sockdir / "vu.sock", layout) as backend,
        _machine("aarch64", sockdir / "vu.sock").start() as qemu,
    ):
        backend.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
        assert backend.trace.names()[: len(REALIZE)] == REALIZE
        bar4 = pci_bar(qemu.pci_device(), 4)
        assert bar4 is not None and bar4["size"] == 16 * M


def test_no_shmem_feature_means_no_request_44_and_no_bar(sockdir: Path) -> None:
    with (
        Backend(sockdir / "vu.sock", ShmemLayout({0: 4 * M}), faults=Faults(no_shmem=True)) as b,
        _machine("x86_64", sockdir / "vu.sock").start() as qemu,
    ):
        b.wait_for_request(Request.SET_VRING_ERR, TIMEOUT)
        # QMP answering means realize is over: GET_SHMEM_CONFIG would have come before.
        assert pci_bar(qemu.pci_device(), 4) is None
        assert Request.GET_SHMEM_CONFIG not in b.requests_seen
        acked = b.session.protocol_features if b.session else 0
        assert not acked & (1 << 22)


@pytest.mark.parametrize("bit", [20, 21])
def test_shmem_at_a_wrong_bit_is_ignored(bit: int, sockdir: Path) -> None:
    faults = Faults(shmem_bit=bit)
    with (
        Backend(sockdir / "vu.sock", ShmemLayout({0: 4 * M}), faults=faults) as b,
        _machine("x86_64", sockdir / "vu.sock").start() as qemu,
    ):
        b.wait_for_request(Request.SET_VRING_ERR, TIMEOUT)
        assert pci_bar(qemu.pci_device(), 4) is None
        assert Request.GET_SHMEM_CONFIG not in b.requests_seen


@pytest.mark.parametrize(
    ("nregions", "expected"),
    [(0, None), (1, 2 * M), (3, 4 * M)],
)
def test_nregions_disagreeing_with_sizes(
    nregions: int, expected: int | None, sockdir: Path
) -> None:
    """QEMU walks shmids 0..255 keeping non-zero sizes until it has ``nregions`` of them."""
    faults = Faults(shmem_nregions=nregions)
    with (
        Backend(sockdir / "vu.sock", ShmemLayout({0: 2 * M, 1: 2 * M}), faults=faults) as b,
        _machine("x86_64", sockdir / "vu.sock").start() as qemu,
    ):
        b.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
        bar4 = pci_bar(qemu.pci_device(), 4)
        assert (bar4 and bar4["size"]) == expected


def test_size_not_a_page_multiple_is_refused(sockdir: Path) -> None:
    faults = Faults(shmem_raw_sizes={0: 4097})
    with Backend(sockdir / "vu.sock", ShmemLayout(), faults=faults) as backend:
        qemu = _machine("x86_64", sockdir / "vu.sock")
        with pytest.raises(QemuExited) as info:
            qemu.start()
        assert info.value.returncode == 1
        assert "multiple of the host page size" in info.value.stderr_tail
        assert backend.wait_disconnected(TIMEOUT) is DisconnectKind.CLEAN


def _expect_clean_refusal(faults: Faults, layout: ShmemLayout, sockdir: Path) -> None:
    """QEMU must refuse the back-end (exit 1); a crash is left to the known-bug mark."""
    with Backend(sockdir / "vu.sock", layout, faults=faults):
        qemu = _machine("x86_64", sockdir / "vu.sock")
        try:
            qemu.start()
        except QemuExited as exc:
            assert exc.returncode == 1, f"QEMU did not refuse cleanly: {exc}"
            return
        qemu.close()
        pytest.fail("QEMU started despite the bad back-end")


@known_bug("bar-not-power-of-two-abort")
def test_total_not_a_power_of_two_is_refused(sockdir: Path) -> None:
    faults = Faults(shmem_raw_sizes={0: 4 * M, 1: 16 * M})
    _expect_clean_refusal(faults, ShmemLayout(), sockdir)


@known_bug("vub-get-features-abort")
@pytest.mark.parametrize(
    "faults",
    [Faults(shmem_reply_flags=0xD), Faults(disconnect_at=Request.GET_SHMEM_CONFIG)],
    ids=["wrong-reply-flags", "disconnect-at-44"],
)
def test_failed_shmem_config_is_refused(faults: Faults, sockdir: Path) -> None:
    layout = ShmemLayout({0: 4 * M})
    _expect_clean_refusal(faults, layout, sockdir)


@known_bug("truncated-shmem-config-accepted")
def test_truncated_shmem_config_is_refused(sockdir: Path) -> None:
    faults = Faults(shmem_truncate=100)
    with Backend(sockdir / "vu.sock", ShmemLayout({0: 2 * M, 1: 2 * M}), faults=faults) as b:
        qemu = _machine("x86_64", sockdir / "vu.sock")
        try:
            qemu.start()
        except QemuExited as exc:
            assert exc.returncode == 1, f"QEMU did not refuse cleanly: {exc}"
            return
        try:
            b.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
            reply = [e for e in b.trace.entries() if e.direction == TO_QEMU][-1]
            assert (reply.name, reply.size) == ("GET_SHMEM_CONFIG", 100)
            bar4 = pci_bar(qemu.pci_device(), 4)
            assert bar4 is not None and bar4["size"] == 4 * M
            raise KnownBugSeen(
                "truncated-shmem-config-accepted",
                "QEMU built BAR 4 from a truncated GET_SHMEM_CONFIG reply (100 of 2056 bytes)",
            )
        finally:
            qemu.close()


@known_bug("vub-get-features-abort")
@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_failed_shmem_config_on_vhost_user_rng_is_refused(arch: str, sockdir: Path) -> None:
    """A real device built on vhost-user-base (vhost-user-rng-pci) reaches the same
    GET_SHMEM_CONFIG code as the test device: a bad reply must fail realize (exit 1)."""
    socket = sockdir / "rng.sock"
    chardev = f"socket,id=rng0,path={socket}"
    rng = ("-chardev", chardev, "-device", "vhost-user-rng-pci,chardev=rng0")
    config = QtestConfig(arch, _qemu(arch), (), qtest=False, extra_args=rng)
    with Backend(socket, ShmemLayout({0: 4 * M}), faults=Faults(shmem_reply_flags=0x1)):
        qemu = QtestMachine(config)
        try:
            qemu.start()
        except QemuExited as exc:
            assert exc.returncode == 1, f"QEMU did not refuse cleanly: {exc}"
            assert "Flags 0x1 instead of 0x5" in exc.stderr_tail
            return
        qemu.close()
        pytest.fail("QEMU started vhost-user-rng-pci despite the bad GET_SHMEM_CONFIG reply")


def _send_raw(
    backend: Backend, qemu: QtestMachine, request: BackendRequest, payload: MMap, fds: list[int]
) -> int:
    """``request`` on the back-end channel without Backend's DRIVER_OK guard; QEMU's u64
    verdict, or QemuExited (exit status, stderr) when QEMU died instead of answering."""
    session = backend.session
    assert session is not None and session.channel is not None, "no back-end channel"
    body = payload.pack()
    try:
        session.channel.settimeout(TIMEOUT)
        session.channel.send(Header.make(request, len(body), need_reply=True), body, fds)
        with session.channel.recv() as reply:
            return U64.unpack(reply.body).value
    except (OSError, TestbedError):
        qemu.wait_exited(5.0)
        qemu.check_alive(f"after {request.name} {payload}")
        raise


STOPPED = {
    "map-before-driver-ok": (BackendRequest.SHMEM_MAP, "never started"),
    "unmap-before-driver-ok": (BackendRequest.SHMEM_UNMAP, "never started"),
    "map-after-reset": (BackendRequest.SHMEM_MAP, "device_status 0"),
    "map-after-system-reset": (BackendRequest.SHMEM_MAP, "system_reset"),
}


@known_bug("shmem-map-stopped-device-segfault")
@pytest.mark.parametrize("case", list(STOPPED))
@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_map_while_device_stopped_is_answered(case: str, arch: str, sockdir: Path) -> None:
    """SHMEM_MAP/UNMAP while the vhost device is stopped: the spec allows them once SHMEM
    is negotiated, so QEMU must answer (map or refuse) and keep running."""
    request, stopped_by = STOPPED[case]
    with (
        Backend(sockdir / "vu.sock", ShmemLayout({0: 2 * M, 1: 2 * M})) as backend,
        _machine(arch, sockdir / "vu.sock", qtest=True, sites=True).start() as qemu,
        Memfd(M) as mem,
    ):
        backend.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
        pci = qemu.pci()
        if stopped_by != "never started":
            pci.start_device()
            backend.wait_driver_ok(TIMEOUT)
            assert backend.map(1, 0, M, mem.fileno()) == 0
            if stopped_by == "system_reset":
                qemu.qmp("system_reset")
                qemu.wait_event("RESET", TIMEOUT)
            else:
                assert qemu.qtest is not None
                qemu.qtest.write_int(pci.common_address(DEVICE_STATUS), 8, 0)
                assert qemu.qtest.read_int(pci.common_address(DEVICE_STATUS), 8) == 0
        mapping = request is BackendRequest.SHMEM_MAP
        payload = MMap(1, 0, 0, M, 1 if mapping else 0)
        verdict = _send_raw(backend, qemu, request, payload, [mem.fileno()] if mapping else [])
        assert isinstance(verdict, int)
        assert qemu.qmp("query-status")["status"] == "running"


@pytest.mark.parametrize("queues", [1, 2])
def test_get_queue_num_answers_the_device_queue_count(queues: int, sockdir: Path) -> None:
    """GET_QUEUE_NUM is answered with the device's num_vqs; QEMU then sets up exactly those
    rings, and none beyond the answer (no queue-count violation)."""
    socket = sockdir / "vu.sock"
    device = VhostUserDevice("vu0", socket, num_vqs=queues)
    config = QtestConfig("x86_64", _qemu("x86_64"), (device,))
    with (
        Backend(socket, device.layout, num_queues=device.num_vqs) as backend,
        QtestMachine(config).start(),
    ):
        backend.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
    answers = [
        (e.payload or {})["value"]
        for e in backend.trace.entries()
        if e.direction == TO_QEMU and e.name == "GET_QUEUE_NUM"
    ]
    assert answers == [queues]
    rings = {
        (e.payload or {})["index"]
        for e in backend.trace.entries()
        if e.name == "SET_VRING_CALL" and e.direction != TO_QEMU
    }
    assert rings == set(range(queues))
    assert backend.violations == []


@known_bug("queue-num-ignored")
@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_backend_with_fewer_queues_is_refused(arch: str, sockdir: Path) -> None:
    """A back-end that answers GET_QUEUE_NUM with 1 for a 2-queue device: QEMU should
    refuse the device at realize (vhost-user-blk does: "The maximum number of queues
    supported by the backend is 1"). QEMU 11.1.3's vhost-user-base sets up ring 1 anyway,
    and our back-end flags every request for it (rule queue-count)."""
    socket = sockdir / "vu.sock"
    device = VhostUserDevice("vu0", socket, num_vqs=2)
    config = QtestConfig(arch, _qemu(arch), (device,))
    with (
        Backend(socket, device.layout, num_queues=2, faults=Faults(queue_num=1)) as backend,
        QtestMachine(config) as machine,
    ):
        try:
            machine.start()
        except QemuExited as exc:
            assert exc.returncode == 1 and "maximum number of queues" in exc.stderr_tail, exc
            return
        backend.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
    flagged = [v for v in backend.violations if v.rule == "queue-count"]
    if flagged:
        raise KnownBugSeen(
            "queue-num-ignored",
            f"QEMU set up ring 1 after the back-end answered GET_QUEUE_NUM with 1: "
            f"{', '.join(v.request for v in flagged)}",
        )
    pytest.fail("QEMU realized a 2-queue device for a 1-queue back-end without using ring 1")


def test_reconnect_gets_a_fresh_session(sockdir: Path) -> None:
    with Backend(sockdir / "vu.sock", ShmemLayout({0: 4 * M})) as backend:
        for round_ in (1, 2):
            with _machine("x86_64", sockdir / "vu.sock").start() as qemu:
                backend.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT, count=round_)
                session = backend.session
                assert session is not None and session.number == round_
                assert session.requests[0] is Request.GET_FEATURES
                assert qemu.shutdown() == 0
            assert backend.wait_disconnected(TIMEOUT, count=round_) is DisconnectKind.CLEAN
        assert (sockdir / "vu.sock").exists()
    assert not (sockdir / "vu.sock").exists()


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_map_unmap_data_path(arch: str, sockdir: Path) -> None:
    """DRIVER_OK without a guest (qtest writes the virtio common config), then MAP/UNMAP,
    reading and writing BAR 4 through QEMU's memory API."""
    layout = ShmemLayout({0: 2 * M, 1: 2 * M})
    with (
        Backend(sockdir / "vu.sock", layout) as backend,
        _machine(arch, sockdir / "vu.sock", qtest=True).start() as qemu,
        Memfd(1 * M) as mem,
    ):
        backend.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
        with pytest.raises(StateError, match="DRIVER_OK"):
            backend.map(1, 0, M, mem.fileno())  # QEMU would segfault: we refuse
        pci = qemu.pci()
        assert qemu.qtest is not None
        pci.start_device()
        backend.wait_driver_ok(TIMEOUT)
        seen = backend.trace.names()
        assert seen.index("SET_FEATURES") < seen.index("SET_MEM_TABLE")
        assert "SET_VRING_ENABLE" in seen
        region1 = pci.bars[4] + layout.offsets()[1]

        mem.write(0, b"hello from the back-end")
        tables = seen.count("SET_MEM_TABLE")
        assert backend.map(1, 0, M, mem.fileno(), 0, writable=True) == 0
        # QEMU re-sends the memory table with the mapped fd in it.
        backend.wait_for_request(Request.SET_MEM_TABLE, TIMEOUT, count=tables + 1)
        assert qemu.qtest.read(region1, 23) == b"hello from the back-end"
        qemu.qtest.write(region1 + 0x1000, b"guest wrote this")
        assert mem.read(0x1000, 16) == b"guest wrote this"
        tree = parse_mtree_shmem(qemu.hmp("info mtree"))
        assert tree["virtio-shmem-1-0"] == (region1, M)

        # QEMU refuses bad requests with a non-zero u64 and keeps serving.
        assert backend.map(7, 0, M, mem.fileno()) != 0  # unknown shmid
        assert backend.map(1, 0, M, mem.fileno()) != 0  # overlaps the first map
        assert backend.map(0, M, 2 * M, mem.fileno()) != 0  # past the end of region 0

        assert backend.unmap(1, 0, M) == 0
        # The range is gone: it reads as unbacked memory (0 on q35, all-ones on virt).
        assert qemu.qtest.read(region1, 23) in (bytes(23), b"\xff" * 23)
        assert "virtio-shmem-1-0" not in parse_mtree_shmem(qemu.hmp("info mtree"))
        replies = [e for e in backend.trace.entries() if e.direction == CHANNEL_FROM_QEMU]
        assert [e.payload for e in replies] == [
            {"value": 0},
            {"value": 1},
            {"value": 1},
            {"value": 1},
            {"value": 0},
        ]
        assert qemu.returncode is None


def test_probe_reports_support(sockdir: Path) -> None:
    result = probe_shmem_support(_qemu("x86_64"), "x86_64", TIMEOUT)
    assert result.supported, result.detail
    assert result.requests_seen[: len(REALIZE)] == REALIZE


def test_probe_reports_a_qemu_that_cannot_start() -> None:
    result = probe_shmem_support("/bin/false", "x86_64", 5)
    assert not result.supported
    assert "exit status 1" in result.detail


def test_connect_mode_qemu_listens(sockdir: Path) -> None:
    """chardev server=on: QEMU waits in realize for us to connect."""
    layout = ShmemLayout({0: 4 * M})
    path = sockdir / "qemu-vu.sock"
    with (
        Backend(path, layout, connect=True, connect_timeout=TIMEOUT) as backend,
        _machine("x86_64", path, listen=True).start() as qemu,
    ):
        backend.wait_for_request(Request.GET_SHMEM_CONFIG, TIMEOUT)
        bar4 = pci_bar(qemu.pci_device(), 4)
        assert bar4 is not None and bar4["size"] == layout.total
        assert qemu.shutdown() == 0
        assert backend.wait_disconnected(TIMEOUT) is DisconnectKind.CLEAN


def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.02)


def test_backend_command_serves_qemu_and_stops_cleanly(sockdir: Path) -> None:
    path = sockdir / "cli.sock"
    trace = sockdir / "trace.jsonl"
    argv = [sys.executable, "-m", "testbed", "backend", "--socket", str(path)]
    argv += ["--region", "0=2M", "--region", "1=2M", "--trace", str(trace)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _poll(path.exists, TIMEOUT, "the back-end's socket")
        with _machine("x86_64", path).start() as qemu:
            _poll(lambda: '"GET_SHMEM_CONFIG"' in trace.read_text(), TIMEOUT, "request 44")
            bar4 = pci_bar(qemu.pci_device(), 4)
            assert bar4 is not None and bar4["size"] == 4 * M
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143
    assert not path.exists()
    assert f"socket,id=vu0,path={path}" in out.decode()
    assert "qemu-system-aarch64" in out.decode()
    log = err.decode()
    assert "qemu->backend GET_SHMEM_CONFIG(44)" in log
    assert '"sizes": {"0": 2097152, "1": 2097152}' in log
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [e["name"] for e in lines if e["direction"] == "qemu->backend"][:10] == REALIZE
