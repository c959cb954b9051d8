"""A shared cold boot that fails pins the failure to the layout that causes it.

testbed.shared_boot boots a group's layouts in one guest. If one layout makes that boot
fail, the group must not go red as a whole nor hide the culprit: each layout then boots
alone, the good ones pass and the bad one fails with its own QEMU error. Shown in a child
pytest (its outcome is what is judged) with a real QEMU refusal: a back-end serving a
region size that is not a multiple of the page size makes QEMU refuse the device at
realize, so the shared guest never starts.
"""

from __future__ import annotations

from pathlib import Path

from testbed.bugs.rerun import outcome_of, run_pytest

CHILD = """
import pytest

from testbed.device import VhostUserDevice
from testbed.pytest_plugin import Shared
from testbed.shared_boot import SharedGroup
from testbed.vhost_user.faults import Faults

M = 1 << 20
BAD_SIZE = Faults(shmem_raw_sizes={0: 4 * M + 512})
GROUP = SharedGroup(
    "pinning",
    {
        "good-4M": VhostUserDevice.of({0: 4 * M}),
        "bad-size": VhostUserDevice.of({0: 4 * M}, faults=BAD_SIZE),
        "good-none": VhostUserDevice.of({}),
    },
)


@pytest.mark.shared_boot(GROUP.name)
@pytest.mark.parametrize("name", list(GROUP.devices))
def test_layout(shared: Shared, name: str) -> None:
    vm, device = shared.boot(GROUP, name)
    vm.check_guest_sees(device)
"""


def test_a_failing_shared_boot_is_pinned_to_its_layout(arch: str, run_dir: Path) -> None:
    (run_dir / "test_child_pinning.py").write_text(CHILD)
    report = run_pytest(
        [str(run_dir / "test_child_pinning.py")],
        run_dir,
        ["-p", "testbed.pytest_plugin", "--arch", arch],
    )
    cases = {case.get("name", ""): case for case in report.iter("testcase")}
    assert len(cases) == 3, f"want 3 layouts run, got {sorted(cases)}"
    outcomes = {name: outcome_of(case) for name, case in cases.items()}
    boots = {
        name: {p.get("name"): p.get("value", "") for p in case.iter("property")}.get("boot", "")
        for name, case in cases.items()
    }
    for good in ("good-4M", "good-none"):
        name = f"test_layout[{arch}-{good}]"
        assert outcomes[name][0] == "passed", f"{name}: {outcomes[name]}"
        assert boots[name].startswith("alone (QemuExited"), f"{name} booted: {boots[name]}"
    bad = f"test_layout[{arch}-bad-size]"
    kind, message = outcomes[bad]
    assert kind in ("failed", "error"), f"{bad} should fail alone: {outcomes[bad]}"
    assert "QemuExited" in message and "page" in message, (
        f"{bad} failed, but not with QEMU's refusal: {message}"
    )
