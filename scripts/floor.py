#!/usr/bin/env python3
"""The floor: bare QEMU to the guest's ready line, with no test bed code at all.

The benchmark compares the test bed against this. It takes the QEMU argv (the one the test
bed builds, without -S) and the console file that argv writes to, starts QEMU, and measures
the time from Popen to the first console line holding the ready marker. No QMP, no
back-end, no SSH: what is left is what the emulator, firmware, kernel and /init cost.

    floor.py --console DIR/console.log --ready TESTBED-GUEST-READY -- qemu-system-x86_64 ...

Prints one JSON object: {"seconds": ..., "returncode": ...}. Exits 1 (with QEMU's stderr)
when QEMU dies or the deadline passes before the ready line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

# Finer than the test bed's console poll (20 ms): the floor must not be inflated by us.
POLL = 0.002
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If we are SIGKILLed (no `finally`), QEMU must not outlive us.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--console", required=True, type=Path, help="console file of argv")
    parser.add_argument("--ready", required=True, help="the guest's ready line")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument("--stderr", type=Path, help="keep QEMU's stderr here")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- QEMU argv")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        parser.error("give the QEMU command line after --")
    marker = args.ready.encode()
    args.console.unlink(missing_ok=True)
    err = args.stderr.open("wb") if args.stderr else subprocess.DEVNULL

    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=err,
        preexec_fn=_die_with_parent,
    )
    try:
        deadline = started + args.timeout
        while True:
            try:
                if marker in args.console.read_bytes():
                    seconds = time.monotonic() - started
                    break
            except FileNotFoundError:
                pass  # QEMU has not opened its console file yet
            if proc.poll() is not None:
                print(
                    f"floor: QEMU exited {proc.returncode} before the ready line", file=sys.stderr
                )
                return 1
            if time.monotonic() > deadline:
                print(f"floor: no {args.ready!r} within {args.timeout} s", file=sys.stderr)
                return 1
            time.sleep(POLL)
    finally:
        # Nothing outlives the measurement, also on Ctrl-C.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if args.stderr:
            err.close()  # type: ignore[union-attr]
    print(json.dumps({"seconds": round(seconds, 4), "returncode": proc.returncode}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
