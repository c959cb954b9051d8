"""The stand-alone repro template (testbed.bugs.standalone), the export's pure parts and the
check's verdict: no QEMU."""

from __future__ import annotations

import ast
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.bugs import Evidence
from testbed.bugs import standalone as sa
from testbed.bugs import standalone_backend as sb
from testbed.bugs.check import Row, exit_code, format_table
from testbed.bugs.export import cmdline_text, render_repro
from testbed.bugs.runner import DOES_NOT_APPLY, NOT_REPRODUCED, REPRODUCED, Outcome
from testbed.paths import make_private_dir, remove_tree

CRASH = {"stderr": r"pci_add_capability: Assertion `offset' failed", "exit": "signal:SIGABRT"}
SILENT = {"stderr": "", "exit": "any", "observable": "reached the memfd"}
SCRIPT: dict[str, Any] = {
    "bug": "some-bug",
    "title": 'A "quoted" title with \\ backslash',
    "arch": "x86_64",
    "signature": CRASH,
    "argv": ["{qemu}", "-qmp", "unix:{dir}/qmp.sock"],
    "qtest": False,
    "backend": {"socket": "vu.sock", "exchanges": [[1, None]], "disconnect_at": None},
    "steps": [{"op": "connect"}, {"op": "check_result", "result": "r0", "equals": 0, "say": '"""'}],
}


def test_judge_crash_needs_pattern_and_exit() -> None:
    text = "qemu: hw/pci/pci.c:2672: pci_add_capability: Assertion `offset' failed.\n"
    assert sa.judge(CRASH, text, "signal:SIGABRT", [])
    assert not sa.judge(CRASH, text, "status:1", [])
    assert not sa.judge(CRASH, "something else", "signal:SIGABRT", [])
    assert sa.judge({**CRASH, "exit": "any"}, text, "running", [])


def test_judge_silent_needs_an_observation() -> None:
    assert sa.judge(SILENT, "", "running", ["a write reached the memfd"])
    assert not sa.judge(SILENT, "reached the memfd", "running", [])


def test_exit_text() -> None:
    assert sa.exit_text(None) == "running"
    assert sa.exit_text(-6) == "signal:SIGABRT"
    assert sa.exit_text(-11) == "signal:SIGSEGV"
    assert sa.exit_text(1) == "status:1"


def test_rendered_repro_is_one_stdlib_file_with_the_script() -> None:
    source = render_repro(SCRIPT)
    tree = ast.parse(source)
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert "testbed" not in imported and "qemu" not in imported
    assert imported <= {
        "__future__", "argparse", "collections", "contextlib", "json", "os", "re", "select",
        "shutil", "signal", "socket", "struct", "subprocess", "sys", "tempfile", "threading",
        "time", "typing",
    }  # fmt: skip
    namespace: dict[str, Any] = {"__name__": "not_main"}
    exec(compile(source, "repro.py", "exec"), namespace)
    assert namespace["SCRIPT"] == SCRIPT


def test_cmdline_text_fills_placeholders() -> None:
    text = cmdline_text(SCRIPT)
    assert "qemu-system-x86_64" in text and "/tmp/qemu-repro/qmp.sock" in text
    assert "{dir}" not in text


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = make_private_dir("test-sa")
    yield path
    remove_tree(path)


def _ask(sock: socket.socket, request: int, flags: int) -> tuple[int, int, bytes]:
    sock.sendall(struct.pack("<III", request, flags, 0))
    sock.settimeout(5.0)
    head = sb._recv_exact(sock, 12)
    req, fl, size = struct.unpack("<III", head)
    return req, fl, sb._recv_exact(sock, size)


def test_replay_backend_answers_as_recorded(sockdir: Path) -> None:
    spec = {
        "exchanges": [
            [1, {"flags": 5, "size": 8, "body": (7).to_bytes(8, "little").hex()}],
            [1, {"flags": 0xD, "size": 8, "body": (9).to_bytes(8, "little").hex()}],
            [3, None],
            # Bent as the fuzzer bends them: another request code, two memfds attached,
            # an extra u64 after the answer; and a request the back-end left unanswered.
            [
                44,
                {
                    "flags": 5,
                    "size": 8,
                    "body": bytes(8).hex(),
                    "request": 1,
                    "fds": 2,
                    "then": [{"flags": 5, "size": 8, "body": (3).to_bytes(8, "little").hex()}],
                },
            ],
            [22, {"silent": True}],
        ],
        "disconnect_at": None,
    }
    backend = sb.ReplayBackend(str(sockdir / "vu.sock"), spec)
    backend.listen()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(sockdir / "vu.sock"))
            assert _ask(sock, 1, 1) == (1, 5, (7).to_bytes(8, "little"))
            assert _ask(sock, 1, 1) == (1, 0xD, (9).to_bytes(8, "little"))
            # The recording has fewer: the last one again.
            assert _ask(sock, 1, 1)[1] == 0xD
            # No recorded reply, but QEMU asks for an ack: u64 0.
            assert _ask(sock, 3, 1 | sb.FLAG_NEED_REPLY) == (3, 5, bytes(8))
            sock.sendall(struct.pack("<III", 44, 1, 0))
            head, fds, _, _ = socket.recv_fds(sock, 12, 4)
            assert struct.unpack("<III", head)[0] == 1 and len(fds) == 2
            for fd in fds:
                os.close(fd)
            assert sb._recv_exact(sock, 8) == bytes(8)
            assert _ask(sock, 2, 1)[0] == 44  # the extra reply came next, as recorded
            sock.sendall(struct.pack("<III", 22, 1 | sb.FLAG_NEED_REPLY, 0))
            backend.wait_request(22, 1, 5.0, lambda: None)
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recv(1)  # left unanswered, as the recorded back-end did
            backend.wait_request(1, 3, 5.0, lambda: None)
    finally:
        backend.close()
    assert not (sockdir / "vu.sock").exists()


def _row(status: str, listed: bool) -> Row:
    evidence = Evidence("boom", "signal:SIGABRT") if status == REPRODUCED else None
    return Row(Outcome("b", "x86_64", status, evidence, 0.1, "detail"), "11.1.3", listed)


def test_check_verdicts() -> None:
    assert exit_code([_row(REPRODUCED, True), _row(DOES_NOT_APPLY, True)]) == 0
    fixed = _row(NOT_REPRODUCED, True)
    assert fixed.verdict == "FIXED?" and exit_code([fixed]) == 1
    other = _row(NOT_REPRODUCED, False)
    assert other.verdict == "not seen" and exit_code([other]) == 0
    table = format_table([_row(REPRODUCED, True), fixed, other])
    assert "reproduces" in table and "FIXED?" in table and "does not list" in table
    assert "boom [signal:SIGABRT]" in table
