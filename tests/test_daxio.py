"""daxio, the guest's mmap tool (testbed.images.daxio): the x86_64 program run on this host
against a file in a tmpfs, each mode and each failure's exit status and message; the
bytes of both architectures against their assembly sources where binutils are at hand;
the ELF headers a loader reads."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.images import daxio, elf
from testbed.images.builder import ImageKeys, base_entries
from testbed.images.recipe import load_recipe
from testbed.paths import PROJECT_ROOT, remove_tree

SOURCES = PROJECT_ROOT / "images" / "daxio"
# GNU binutils per architecture: (as, objcopy, nm)
BINUTILS = {
    "x86_64": ("as", "objcopy", "nm"),
    "aarch64": ("aarch64-linux-gnu-as", "aarch64-linux-gnu-objcopy", "aarch64-linux-gnu-nm"),
}
SHM = Path("/dev/shm")
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private dir in a tmpfs when the host has one (a file system like the guest's
    page cache, not DAX), with daxio in it."""
    path = Path(tempfile.mkdtemp(prefix="testbed-daxio-", dir=SHM if SHM.is_dir() else None))
    try:
        tool = path / "daxio"
        tool.write_bytes(daxio.program("x86_64"))
        tool.chmod(0o755)
        yield path
    finally:
        remove_tree(path)


def run(workdir: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    if os.uname().machine != "x86_64":
        pytest.skip("the x86_64 program runs on an x86_64 host only")
    return subprocess.run(
        [str(workdir / "daxio"), *args], input=stdin, capture_output=True, timeout=10, check=False
    )


def test_write_lands_in_the_file_and_read_returns_it(workdir: Path) -> None:
    data = workdir / "data"
    before = os.urandom(3 * PAGE)
    data.write_bytes(before)
    done = run(workdir, "w", str(data), "5000", "6", stdin=b"mapped")
    assert (done.returncode, done.stderr) == (0, b"")
    after = data.read_bytes()
    assert after == before[:5000] + b"mapped" + before[5006:]
    read = run(workdir, "r", str(data), "4090", "20")
    assert (read.returncode, read.stdout) == (0, after[4090:4110])


@pytest.mark.parametrize(
    ("args", "stdin", "status", "message"),
    [
        ((), b"", daxio.EXIT_USAGE, b"usage: daxio w|r FILE OFFSET LENGTH, or daxio d FILE\n"),
        (("x", "data", "0", "1"), b"", daxio.EXIT_USAGE, b"usage:"),
        (("rw", "data", "0", "1"), b"", daxio.EXIT_USAGE, b"usage:"),
        (("r", "data", "0"), b"", daxio.EXIT_USAGE, b"usage:"),
        (("r", "data", "1x", "1"), b"", daxio.EXIT_USAGE, b"usage:"),
        (("r", "data", "", "1"), b"", daxio.EXIT_USAGE, b"usage:"),
        (("r", "data", "0", "99999999999999999999"), b"", daxio.EXIT_USAGE, b"usage:"),
        (("w", "data", "0", "8"), b"four", daxio.EXIT_SHORT, b"daxio: short input\n"),
        (("r", "missing", "0", "1"), b"", 2, b"daxio: open\n"),  # ENOENT
        (("r", "data", "0", "0"), b"", 22, b"daxio: mmap\n"),  # EINVAL: an empty mapping
        (("r", "data", "4000", "200"), b"", 14, b"daxio: write\n"),  # EFAULT past the end
        (("w", "data", "4000", "200"), b"x" * 200, 14, b"daxio: read\n"),
        (("d", "missing"), b"", 2, b"daxio: statx\n"),
        (("d", "data"), b"", daxio.EXIT_NOT_DAX, b"daxio: not DAX\n"),  # tmpfs: no DAX
    ],
    ids=["no-args", "bad-mode", "long-mode", "no-length", "not-a-number", "empty-number",
         "overflow", "short-stdin", "no-file", "empty-map", "read-past-eof", "write-past-eof",
         "statx-no-file", "not-dax"],
)  # fmt: skip
def test_failures_say_what_failed(
    workdir: Path, args: tuple[str, ...], stdin: bytes, status: int, message: bytes
) -> None:
    (workdir / "data").write_bytes(b"d" * 4096)  # one page: a page past it has no file
    named = tuple(str(workdir / a) if a in ("data", "missing") else a for a in args)
    done = run(workdir, *named, stdin=stdin)
    assert done.returncode == status
    assert done.stderr.startswith(message), done.stderr


@pytest.mark.parametrize("arch", sorted(daxio.CODE))
def test_the_headers_a_loader_reads(arch: str) -> None:
    image = daxio.program(arch)
    e_type, machine = struct.unpack_from("<HH", image, 16)
    (entry,) = struct.unpack_from("<Q", image, 24)
    assert image[:4] == b"\x7fELF" and (e_type, machine) == (elf.ET_EXEC, elf.MACHINES[arch])
    assert elf.interpreter(image) is None and elf.needed_libraries(image) == []  # static
    offset, code = daxio.CODE[arch]
    start = len(image) - len(code)
    assert entry == daxio.BASE + start + offset
    assert 0 <= offset < len(code)


@pytest.mark.parametrize("arch", sorted(daxio.CODE))
def test_the_bytes_are_what_the_source_assembles_to(arch: str, tmp_path: Path) -> None:
    tools = BINUTILS[arch]
    if not all(shutil.which(tool) for tool in tools):
        pytest.skip(f"no GNU binutils for {arch} ({', '.join(tools)})")
    assembler, objcopy, nm = tools
    obj, raw = tmp_path / "daxio.o", tmp_path / "daxio.bin"
    source = SOURCES / f"daxio-{arch}.S"
    subprocess.run([assembler, "-o", str(obj), str(source)], check=True, timeout=30)
    subprocess.run([objcopy, "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True,
                   timeout=30)  # fmt: skip
    symbols = subprocess.run([nm, str(obj)], capture_output=True, text=True, check=True,
                             timeout=30).stdout  # fmt: skip
    start = next(int(line.split()[0], 16) for line in symbols.splitlines()
                 if line.endswith(" _start"))  # fmt: skip
    assert daxio.CODE[arch] == (start, raw.read_bytes()), (
        f"testbed/images/daxio.py is not what {source.name} assembles to: regenerate it"
    )


@pytest.mark.parametrize("arch", sorted(daxio.CODE))
def test_every_image_carries_it(arch: str) -> None:
    """In the entries that come from no package, executable (the recipe's key hashes the
    same bytes)."""
    recipe, init = load_recipe(arch)
    keys = ImageKeys.from_master(bytes(32))
    entries = {e.path: e for e in base_entries(recipe, init, keys)}
    entry = entries[daxio.PATH]
    assert entry.data == daxio.program(arch) and entry.mode & 0o777 == 0o755
