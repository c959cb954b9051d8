"""The benchmark (`testbed bench`, `make bench`): the test bed against the emulator's floor.

report.py is pure (figures, ratios, targets, boot phases, table, JSON); measure.py does the
I/O of one run of each measurement; run.py orders them and writes the outputs; chart.py
draws where the time of one boot goes.
"""

from testbed.bench.run import BenchOptions, run_bench

__all__ = ["BenchOptions", "run_bench"]
