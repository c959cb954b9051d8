"""End-to-end scenarios: real QEMU, our back-end, a real guest over SSH.

The machinery (options --arch/--accel/--keep-artifacts, the `boot`, `artifacts` and
`run_dir` fixtures, the result table) lives in testbed.pytest_plugin.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["testbed.pytest_plugin"]

SOAK = Path(__file__).parent / "soak"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The soak (minutes long) runs only when asked for by path (`make soak`), never as
    part of `pytest scenarios` / `make e2e`."""
    if collection_path == SOAK and not any("soak" in str(arg) for arg in config.args):
        return True
    return None
