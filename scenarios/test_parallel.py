"""Parallel isolation: 4 scenarios at once on a 2-core machine share no port, socket or
run dir, and none fails (for lack of a free port or anything else).

The four run as a real `pytest -n 4` in a child process (what `make e2e WORKERS=4` does),
with their artifacts kept in a private results dir; their qemu-cmdline.txt files say
which hostfwd port, QMP socket, back-end socket and run dir each one used. Two boot with a
cold-plugged device (each its own guest: --isolated-boots, so the two layouts do not
share one boot); two are restored from the same snapshot file at the same time and
hot-plug theirs (their back-end sockets are made in their own run dirs, after the start).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.paths import PROJECT_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.arches("x86_64")]

COLD = [f"scenarios/test_coldplug.py::test_layout[{{arch}}-{name}]" for name in ("one", "two")]
RESTORED = [
    "scenarios/test_datapath.py::test_reset_drops_mappings[{arch}]",
    "scenarios/test_negotiation.py::test_without_shmem_qemu_never_asks[{arch}-not-offered]",
]
WORKERS = 4
# 4 TCG guests on 2 cores boot in ~10-20 s each; generous, but a hang must end.
CHILD_TIMEOUT = 420.0

_HOSTFWD = re.compile(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-:22")
_QMP = re.compile(r"-qmp '?unix:([^,'\s]+)")
_CHARDEV_SOCKET = re.compile(r"-chardev '?socket,id=[^,]+,path=([^,' ]+)")
_INCOMING = re.compile(r"^\s*-incoming ", re.MULTILINE)


@dataclass(frozen=True)
class VmResources:
    """What one VM held, read back from its qemu-cmdline.txt."""

    cmdline: Path
    ssh_port: int
    qmp_socket: Path
    backend_sockets: tuple[Path, ...]
    restored: bool
    """Started with -incoming (from a snapshot): its device comes later, by hot-plug."""

    @property
    def run_dir(self) -> Path:
        return self.qmp_socket.parent


def parse_cmdline(path: Path) -> VmResources:
    """Ports and sockets of format_command()'s output (one option per line). Pure but for
    reading the file."""
    text = path.read_text()
    port = _HOSTFWD.search(text)
    qmp = _QMP.search(text)
    assert port and qmp, f"{path}: no hostfwd port or QMP socket in\n{text}"
    sockets = tuple(Path(m) for m in _CHARDEV_SOCKET.findall(text))
    restored = bool(_INCOMING.search(text))
    return VmResources(path, int(port.group(1)), Path(qmp.group(1)), sockets, restored)


def run_child(argv: list[str], env: dict[str, str], log: Path, timeout: float) -> int:
    """Run ``argv`` in its own process group; on timeout or on our own interruption, kill
    the whole group (pytest, its xdist workers, their QEMUs) so nothing outlives us."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT,
            process_group=0,
        )  # fmt: skip
        try:
            return proc.wait(timeout)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_four_scenarios_at_once(arch: str, artifacts: Path) -> None:
    results = artifacts / "child-results"
    node_ids = [node.format(arch=arch) for node in COLD + RESTORED]
    junit = results / "junit.xml"
    argv = [
        sys.executable, "-m", "pytest", "-n", str(WORKERS), "-p", "no:randomly",
        "-p", "no:cacheprovider", "--keep-artifacts", "--arch", arch, "--isolated-boots",
        f"--junitxml={junit}", *node_ids,
    ]  # fmt: skip
    env = {**os.environ, "TESTBED_RESULTS": str(results)}
    log = artifacts / "child-pytest.log"
    code = run_child(argv, env, log, CHILD_TIMEOUT)
    output = log.read_text(errors="replace")
    assert code == 0, f"`{shlex.join(argv)}` exited {code}:\n{output[-4000:]}"

    suites = ET.parse(junit).getroot()
    cases = list(suites.iter("testcase"))
    bad = [c.get("name") for c in cases if any(e.tag in ("failure", "error", "skipped") for e in c)]
    assert len(cases) == len(node_ids) and not bad, f"not all passed: {bad}\n{output[-4000:]}"

    vms = [parse_cmdline(p) for p in sorted(results.glob("artifacts/*/qemu-cmdline.txt"))]
    assert len(vms) == len(node_ids), f"want {len(node_ids)} qemu-cmdline.txt, got {vms}"
    assert sum(vm.restored for vm in vms) == len(RESTORED), f"want {len(RESTORED)} restored: {vms}"
    ports = [vm.ssh_port for vm in vms]
    run_dirs = [vm.run_dir for vm in vms]
    sockets = [s for vm in vms for s in (vm.qmp_socket, *vm.backend_sockets)]
    assert len(set(ports)) == len(ports), f"two VMs shared a hostfwd port: {ports}"
    assert len(set(run_dirs)) == len(run_dirs), f"two VMs shared a run dir: {run_dirs}"
    assert len(set(sockets)) == len(sockets), f"two VMs shared a socket: {sockets}"
    # Every cold-plugged one has its back-end on the command line; a restored one has none
    # there (its hot-plugged back-end listens in its own run dir, which no other shares).
    assert all(len(vm.backend_sockets) == (0 if vm.restored else 1) for vm in vms), vms
    leftovers = [d for d in run_dirs if d.exists()]
    assert not leftovers, f"run dirs outlived their VMs: {leftovers}"
