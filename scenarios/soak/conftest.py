"""The soak's knobs: cycles per arch (env SOAK_HOTPLUG_CYCLES / SOAK_MAP_CYCLES override
the defaults for every arch), as the ``hotplug_cycles`` and ``map_cycles`` fixtures, and a
hang guard that grows with them: pytest-timeout's 600 s default is per scenario, so each
soak test gets a timeout of its own, generous (a hang guard, not a speed check).

The defaults keep `make soak` at a few minutes per arch, with enough hot-plug cycles on
both for the memory rule to decide (aarch64's guest ejects the device itself, ~2 s a cycle,
instead of waiting out pciehp's 5 s attention button). The nightly job runs hundreds of
hot-plug cycles (SOAK_HOTPLUG_CYCLES=400): memory is only judged over runs of at least the
rule's min_cycles (test_soak.py), shorter runs report their slopes as "too short to decide".
"""

from __future__ import annotations

import os

import pytest

WARMUP = 5  # cycles before the baseline (test_soak.py uses the same)
DEFAULT_CYCLES = {
    ("HOTPLUG", "x86_64"): 100,
    ("HOTPLUG", "aarch64"): 100,
    ("MAP", "x86_64"): 500,
    ("MAP", "aarch64"): 500,
}
BOOT_BUDGET = 300  # seconds: boot, warm-up, teardown, on a loaded 2-core host
# Seconds per cycle allowed, ~5x what one takes on an idle host under TCG.
PER_CYCLE = {
    ("HOTPLUG", "x86_64"): 10,
    ("HOTPLUG", "aarch64"): 15,
    ("MAP", "x86_64"): 3,
    ("MAP", "aarch64"): 5,
}


def soak_cycles(kind: str, arch: str) -> int:
    """Cycles after warm-up: $SOAK_<kind>_CYCLES, else the default for ``arch``."""
    value = os.environ.get(f"SOAK_{kind}_CYCLES", "").strip()
    if not value:
        return DEFAULT_CYCLES[(kind, arch)]
    if not value.isdigit() or int(value) < 2:
        raise pytest.UsageError(f"SOAK_{kind}_CYCLES={value!r}: give a whole number >= 2")
    return int(value)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        arch = callspec.params.get("arch") if callspec is not None else None
        kind = item.name.removeprefix("test_").split("_soak")[0].upper()
        if (kind, arch) in PER_CYCLE and isinstance(arch, str):
            cycles = soak_cycles(kind, arch) + WARMUP
            item.add_marker(pytest.mark.timeout(BOOT_BUDGET + cycles * PER_CYCLE[(kind, arch)]))


@pytest.fixture
def hotplug_cycles(arch: str) -> int:
    return soak_cycles("HOTPLUG", arch)


@pytest.fixture
def map_cycles(arch: str) -> int:
    return soak_cycles("MAP", arch)
