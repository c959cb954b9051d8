"""A silent crash's site without the kernel's log: gdb attached to QEMU for a replay
(testbed.host.debugger), parsed by testbed.bugs.standalone_site.fault_in_gdb, the same
"binary + file offset" the kernel logs, stable from run to run."""

from __future__ import annotations

import pytest

from testbed.bugs.signature import crash_site, fault_in_gdb
from testbed.errors import TestbedError
from testbed.fuzz.grammar import Action, BodyKind, Case, ShmemConfig
from testbed.fuzz.player import play
from testbed.host import debugger
from testbed.host.qemu import resolve_qemu

M = 1 << 20

REPORT = """\
Thread 1 "ld-linux-x86-64" received signal SIGBUS, Bus error.
TESTBED-STOPPED
$1 = 0x7f886db717c0
$2 = 7
$3 = (void *) 0x7f8856eba000
#0  0x00007f886db717c0 in ?? () from /s/lib/libc.so.6
#1  0x00007f887019f09d in ?? ()
#2  0x0000000000000000 in ?? ()
process 1234
Mapped address spaces:

          Start Addr           End Addr       Size     Offset  Perms  objfile
      0x7f886fa00000     0x7f886fed9000   0x4d9000        0x0  r--p   /s/bin/qemu-system-x86_64
      0x7f886fed9000     0x7f88705ae000   0x6d5000   0x4d9000  r-xp   /s/bin/qemu-system-x86_64
      0x7f886da38000     0x7f886dba0000   0x168000    0x28000  r-xp   /s/lib/libc.so.6
TESTBED-END
"""


def test_a_gdb_report_gives_the_site_and_the_caller() -> None:
    found = fault_in_gdb(REPORT)
    assert found["binary"] == "libc.so.6" and found["offset"] == "1617c0"
    assert found["signal"] == "7" and found["addr"] == "7f8856eba000"
    # The return address minus one: the call instruction in QEMU's own binary.
    assert found["caller"] == "qemu-system-x86_64+0x79f09c"
    assert crash_site("", found) == "libc.so.6+0x1617c0 from qemu-system-x86_64+0x79f09c"
    assert fault_in_gdb("the process exited normally") == {}


@pytest.mark.qemu
@pytest.mark.skipif(not debugger.available(), reason="no gdb")
def test_a_sigbus_gets_the_same_site_every_replay() -> None:
    """The back-end truncates a mapped memfd, the guest reads it: SIGBUS, which the kernel
    does not log; under gdb the replay names its site, twice the same."""
    try:
        qemu = resolve_qemu("x86_64").path
    except TestbedError as exc:
        pytest.skip(f"no QEMU for x86_64: {exc}")
    fields = {"shmid": 0, "length": M, "flags": 1}
    action = Action("after-driver-ok", 9, BodyKind.MMAP, fields, fds=(f"memfd:{M}",),
                    after=("truncate:0", "read:0"))  # fmt: skip
    case = Case("x86_64", 0, 0, config=ShmemConfig({0: 2 * M}), actions=(action,))
    plain = play(case, qemu)
    assert plain.returncode == -7 and not plain.segfault, "the kernel logs no SIGBUS"
    sites = {crash_site("", play(case, qemu, debug=True).segfault) for _ in range(2)}
    [site] = sites
    assert site.startswith("libc.so.6+0x") and " from qemu-system-x86_64+0x" in site
