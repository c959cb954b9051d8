"""Where a crash that printed nothing happened (SIGSEGV, SIGBUS): the faulting instruction
as "binary + offset in that file", from the host kernel's segfault line or from gdb attached
to QEMU. Pure text in, text out, apart from ``gdb_argv`` (an argv, not run here).

STANDARD LIBRARY ONLY, like the rest of the stand-alone template: `testbed bugs export`
copies this file's text into repro.py first (testbed.bugs.export.render_repro), and the test
bed imports it (testbed.bugs.signature, testbed.host.debugger): one implementation for both.
"""

from __future__ import annotations

import re

SEGFAULT_LINE = re.compile(
    r"\[(?P<pid>\d+)\]: segfault at (?P<addr>[0-9a-f]+) ip (?P<ip>[0-9a-f]+) .*? in "
    r"(?P<binary>[\w.+-]+)\[(?P<offset>[0-9a-f]+)[,+]"
)
"""The kernel's line: "qemu-system-x86_64[1234]: segfault at 0 ip ... in
qemu-system-x86_64[9cadd4,...]"."""
"""The kernel's line: "qemu-system-x86_64[1234]: segfault at 0 ip ... in
qemu-system-x86_64[9cadd4,...]"."""
SILENT_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE")
"""Deaths that print nothing: the site is what tells them apart."""
GDB_ATTACHED = "TESTBED-ATTACHED"


def gdb_argv(gdb: str, pid: int) -> list[str]:
    """A batch gdb that attaches to ``pid``, lets every signal through but the fatal ones,
    and on one of those prints the pc, the signal, the fault address, the backtrace and the
    mappings, then detaches: the signal is delivered as it would have been."""
    commands = [
        "set pagination off",
        "set confirm off",
        "set print thread-events off",
        "handle all nostop noprint pass",
        f"handle {' '.join(SILENT_SIGNALS)} stop print pass",
        f"echo {GDB_ATTACHED}\\n",
        "continue",
        "echo TESTBED-STOPPED\\n",
        "p/x $pc",
        "p $_siginfo.si_signo",
        "p $_siginfo._sifields._sigfault.si_addr",
        "bt 12",
        "info proc mappings",
        "echo TESTBED-END\\n",
        "detach",
    ]
    argv = [gdb, "-nx", "-q", "-batch", "-iex", "set debuginfod enabled off"]
    for command in commands:
        argv += ["-ex", command]
    return [*argv, "-p", str(pid)]


def segfault_in_log(log: str, pid: int) -> dict[str, str]:
    """The last kernel segfault line of process ``pid`` in ``log`` (dmesg's text): binary,
    offset (in the binary's mapping), ip, addr; empty when there is none."""
    for line in reversed(log.splitlines()):
        found = SEGFAULT_LINE.search(line)
        if found and int(found["pid"]) == pid:
            return {k: found[k] for k in ("binary", "offset", "ip", "addr")}
    return {}


_GDB_VALUE = re.compile(r"^\$(\d+) = (?:\(void \*\) )?(0x[0-9a-f]+|-?\d+)", re.M)
_GDB_FRAME = re.compile(r"^#(\d+)\s+(0x[0-9a-f]+)", re.M)
_GDB_MAPPING = re.compile(
    r"^\s*(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)\s+(?:[rwxps-]{4}\s+)?(/\S.*)$",
    re.M,
)


def fault_in_gdb(text: str) -> dict[str, str]:
    """The fatal signal's site from testbed.host.debugger's gdb report: the faulting pc as
    the binary it lies in and its offset in that file (what the kernel's segfault line
    says), the fault address, the signal number, and -- when the pc lies outside QEMU's
    binary (a libc routine) -- the first frame in a qemu-system-* binary as ``caller``
    ("qemu-system-x86_64+0x1a2b3c"). Empty when gdb reported no fatal signal."""
    _, stopped, report = text.partition("TESTBED-STOPPED")
    if not stopped:
        return {}
    values = {int(n): v for n, v in _GDB_VALUE.findall(report)}
    if 1 not in values:
        return {}
    maps = [
        (int(a, 16), int(b, 16), int(off, 16), path.strip().rsplit("/", 1)[-1])
        for a, b, off, path in _GDB_MAPPING.findall(report)
    ]

    def where(address: int) -> tuple[str, int] | None:
        for start, end, offset, name in maps:
            if start <= address < end:
                return name, address - start + offset
        return None

    pc = int(values[1], 16)
    site = where(pc)
    out = {
        "binary": site[0] if site else "?",
        "offset": f"{site[1]:x}" if site else f"{pc:x}",
        "ip": f"{pc:x}",
        "addr": f"{int(values[3], 16):x}" if values.get(3, "").startswith("0x") else "",
        "signal": values.get(2, ""),
    }
    if site is None or not site[0].startswith("qemu-system"):
        for _, frame in sorted((int(n), f) for n, f in _GDB_FRAME.findall(report)):
            found = where(int(frame, 16))
            if found and found[0].startswith("qemu-system"):
                # A return address: the call instruction is the byte before it.
                out["caller"] = f"{found[0]}+0x{found[1] - 1:x}"
                break
    return out


def format_site(found: dict[str, str]) -> str:
    """A site as signatures spell it: "qemu-system-x86_64+0x87e9a3", with "from <caller>"
    when the pc lies in a library QEMU called ("" for none)."""
    if not found:
        return ""
    site = f"{found['binary']}+0x{found['offset']}"
    caller = found.get("caller")
    return f"{site} from {caller}" if caller else site
