"""The guest-side waits (testbed.guest.waits), run in the host's sh on a fake sysfs: the
scripts use only what busybox's ash and the host's dash both have."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from testbed.guest.waits import (
    dmesg_condition,
    function_gone_condition,
    new_function_condition,
    virtio_driver_condition,
    wait_script,
)

SLEEP = "sleep 0.02"  # the host's sh has no usleep


def _run(script: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    done = subprocess.run(["sh", "-c", script], timeout=30, capture_output=True, text=True, env=env)
    return done.returncode, done.stdout.strip()


def _fake_function(root: Path, bdf: str, device_id: str, driver: bool) -> None:
    d = root / bdf
    d.mkdir()
    (d / "device").write_text(f"{device_id}\n")
    if driver:
        (d / "driver").symlink_to(root)


def test_wait_script_gives_up_or_reports_what_it_found(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    script = wait_script(f"[ -e {flag} ]", 0.1, sleep=SLEEP, then=f"cat {flag}")
    assert _run(script) == (1, "")
    flag.write_text("there\n")
    assert _run(script) == (0, "there")


def test_wait_for_a_new_bound_function(tmp_path: Path) -> None:
    def script(known: list[str], timeout: float = 0.1) -> str:
        condition = new_function_condition(0x105A, known, root=str(tmp_path))
        return wait_script(condition, timeout, sleep=SLEEP)

    _fake_function(tmp_path, "0000:00:02.0", "0x1041", driver=True)  # the NIC
    assert _run(script([]))[0] == 1  # no test device at all: gives up
    _fake_function(tmp_path, "0000:00:10.0", "0x105a", driver=True)  # one already there
    assert _run(script(["0000:00:02.0", "0000:00:10.0"]))[0] == 1
    _fake_function(tmp_path, "0000:01:00.0", "0x105a", driver=False)  # listed, not bound
    assert _run(script(["0000:00:02.0", "0000:00:10.0"]))[0] == 1
    (tmp_path / "0000:01:00.0" / "driver").symlink_to(tmp_path)
    found = _run(script(["0000:00:02.0", "0000:00:10.0"], timeout=30))
    assert found == (0, "0000:01:00.0")  # the host takes the BDF from it


def test_wait_for_a_function_to_go(tmp_path: Path) -> None:
    _fake_function(tmp_path, "0000:01:00.0", "0x105a", driver=True)
    gone = wait_script(function_gone_condition("0000:01:00.0", str(tmp_path)), 0.1, sleep=SLEEP)
    assert _run(gone)[0] == 1
    (tmp_path / "0000:01:00.0" / "driver").unlink()
    (tmp_path / "0000:01:00.0" / "device").unlink()
    (tmp_path / "0000:01:00.0").rmdir()
    assert _run(gone)[0] == 0


def test_virtio_driver_needs_the_link_and_driver_ok(tmp_path: Path) -> None:
    """Bound is not probed: the driver link exists while the probe still runs; only the
    virtio status with DRIVER_OK (4) says the probe is over."""
    drivers = tmp_path / "drivers"
    (drivers / "virtiofs").mkdir(parents=True)
    (drivers / "virtio_blk").mkdir()
    virtio = tmp_path / "0000:01:00.0" / "virtio2"
    virtio.mkdir(parents=True)
    status = virtio / "status"
    script = wait_script(
        virtio_driver_condition("0000:01:00.0", "virtiofs", root=str(tmp_path)), 0.1, sleep=SLEEP
    )
    status.write_text("0x00000003\n")
    assert _run(script)[0] == 1  # no driver yet
    (virtio / "driver").symlink_to(drivers / "virtio_blk")
    status.write_text("0x0000000f\n")
    assert _run(script)[0] == 1  # another driver
    (virtio / "driver").unlink()
    (virtio / "driver").symlink_to(drivers / "virtiofs")
    status.write_text("0x0000000b\n")
    assert _run(script)[0] == 1  # bound, probe still running (no DRIVER_OK)
    status.write_text("0x0000000f\n")
    assert _run(script)[0] == 0


def test_dmesg_condition_prints_the_matching_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dmesg").write_text(f"#!/bin/sh\ncat {log}\n")
    (fake / "dmesg").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    script = wait_script(dmesg_condition(r"Cache len: 0x[0-9a-f]+"), 0.1, sleep=SLEEP)
    log.write_text("[ 1.0] virtiofs virtio2: probing\n")
    assert _run(script, env)[0] == 1
    log.write_text("[ 1.0] a\n[ 4.2] virtiofs virtio2: Cache len: 0x4000000 @ 0xf8000000\n")
    assert _run(script, env) == (0, "[ 4.2] virtiofs virtio2: Cache len: 0x4000000 @ 0xf8000000")
