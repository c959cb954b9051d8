"""Fast tests: one hypothesis profile for all of them.

No per-example deadline: the suite runs beside QEMU guests on two cores, and a stalled
example is the host's load, not a slow property (the examples are bounded in size)."""

from hypothesis import settings

settings.register_profile("testbed", deadline=None)
settings.load_profile("testbed")

pytest_plugins = ["testbed.bugs.marks"]
