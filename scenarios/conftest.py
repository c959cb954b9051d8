"""End-to-end scenarios: real QEMU, our back-end, a real guest over SSH.

The machinery (options --arch/--accel/--keep-artifacts, the `boot`, `artifacts` and
`run_dir` fixtures, the result table) lives in testbed.pytest_plugin.
"""

pytest_plugins = ["testbed.pytest_plugin"]
