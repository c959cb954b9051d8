"""Spec conformance is judged for every back-end that served a guest, not only the first.

A vhost-user rule QEMU breaks while talking to a back-end fails the scenario (the pytest
plugin checks every back-end and relay in ``GuestVM.served_by`` at the end). Here that is
shown for the case the suite once missed: a back-end of ours that was hot-plugged, which
sat in neither of the places the check looked at.

The rule broken is a real one, with real QEMU: the back-end answers GET_QUEUE_NUM with 1
for a device QEMU was told has 2 queues, and QEMU 11.1.3's vhost-user-base sets up ring 1
anyway (vhost-user-blk refuses such a back-end at realize). The scenario that shows it
runs in a child pytest, so that its failure is what this test looks at.
"""

from __future__ import annotations

from pathlib import Path

from testbed.bugs.rerun import rerun_scenario

M = 1 << 20

CHILD = """
from testbed.device import VhostUserDevice
from testbed.vhost_user.faults import Faults


def test_hotplugged_backend_sees_a_violation(boot):
    vm = boot(root_ports=1)
    device = vm.plug(VhostUserDevice.of({0: 4 << 20}, num_vqs=2, faults=Faults(queue_num=1)))
    vm.check_guest_sees(device)
    vm.unplug(device)
"""


def test_violation_in_a_hotplugged_backend_fails_the_scenario(arch: str, run_dir: Path) -> None:
    scenario = run_dir / "test_child_violation.py"
    scenario.write_text(CHILD)
    rerun = rerun_scenario(
        f"{scenario}::test_hotplugged_backend_sees_a_violation[{arch}]",
        ["-p", "testbed.pytest_plugin", "--arch", arch],
    )
    # The scenario's own steps pass; the back-end's violations fail it at the end.
    assert rerun.outcome in ("failed", "error"), rerun.summary()
    assert "vhost-user spec violations" in rerun.message, rerun.summary()
    assert "queue-count" in rerun.message, rerun.summary()
