"""daxio: the guest's tool for file I/O through a shared mmap (pure: bytes out).

The guest has busybox, which cannot mmap a file; the DAX scenarios (scenarios/test_dax.py)
need to write into a virtio-fs file through the guest's MAP_SHARED mapping of it -- the
one access that reaches the cache window without a FUSE request -- read it back the same
way, and ask whether the kernel serves a file with DAX. daxio does that with system calls
alone (no libc), one static ELF per architecture, put in every image as /usr/bin/daxio
(testbed.images.builder; its bytes are part of the image's content hash):

    daxio w FILE OFFSET LENGTH   LENGTH bytes of stdin into FILE's mapping at OFFSET
                                 (opened O_RDWR, PROT_READ|PROT_WRITE), then msync(MS_SYNC)
    daxio r FILE OFFSET LENGTH   LENGTH bytes of FILE's mapping at OFFSET to stdout
                                 (opened O_RDONLY, PROT_READ)
    daxio d FILE                 exit 0 if statx() sets STATX_ATTR_DAX for FILE

OFFSET and LENGTH are decimal; the mapping covers [0, OFFSET + LENGTH) of the file. Exit
status: 0; the errno of the system call that failed, named on stderr ("daxio: mmap");
200 usage; 201 stdin ended before LENGTH bytes; 202 not DAX. daxio touches the mapping
only through read(2) (w) and write(2) (r), which fault its pages in as a store or a load
would: a page that cannot be had (past the file's end) is that call's EFAULT (14).

The code below is what GNU as makes of images/daxio/daxio-<arch>.S (the source: read and
change that), with the commands at the top of each file; tests/test_daxio.py checks the
bytes against the sources wherever binutils for the architecture are installed
(binutils-aarch64-linux-gnu for aarch64), and runs the x86_64 program on the host.
Each entry: the entry point's offset in the code (the messages come first), the code.
"""

from __future__ import annotations

from testbed.errors import ProvisionError
from testbed.images import elf

PATH = "usr/bin/daxio"
"""Where the images carry it."""
BASE = 0x400000
"""Where the program is loaded (a fixed address: the code has no relocations)."""
ALIGN = 0x10000  # valid for 4K, 16K and 64K page kernels

EXIT_USAGE, EXIT_SHORT, EXIT_NOT_DAX = 200, 201, 202

CODE: dict[str, tuple[int, bytes]] = {
    "x86_64": (
        0xA2,
        bytes.fromhex(
            "646178696f3a206f70656e0a646178696f3a206d6d61700a646178696f3a20726561640a646178696f3a206d"
            "73796e630a646178696f3a2077726974650a646178696f3a2073746174780a646178696f3a206e6f74204441"
            "580a646178696f3a2073686f727420696e7075740a75736167653a20646178696f20777c722046494c45204f"
            "4646534554204c454e4754482c206f7220646178696f20642046494c450a4989e4498b04244883f8030f82e6"
            "010000498b742410440fb63e807e01000f85d30100004183ff640f84510100004883f8050f85bf010000498b"
            "7c2420e88e0100004989c5498b7c2428e8810100004989c6ba02000000bd030000004183ff77741131d2bd01"
            "0000004183ff720f8584010000bf9cffffff498b7424184531d2b8010100000f05488d35d0feffffba0c0000"
            "004885c00f88810100004989c031ff4b8d74350089ea41ba010000004531c9b8090000000f05488d35abfeff"
            "ffba0c000000483d01f0ffff0f834d0100004989c44a8d2c2831db4183ff7775614c39f3733131ff488d741d"
            "004c89f24829da31c00f05488d357afeffffba0c0000004885c00f88130100000f84fa0000004801c3ebca4c"
            "89e74b8d743500ba04000000b81a0000000f05488d3552feffffba0d0000004885c00f88df000000eb364c39"
            "f37331bf01000000488d741d004c89f24829dab8010000000f05488d352cfeffffba0d0000004885c00f88ac"
            "0000004801c3ebca31ffb8e70000000f054881ec00010000bf9cffffff498b74241831d241baff0700004989"
            "e0b84c0100000f05488d35f3fdffffba0d0000004885c0786af74424080000200075b9bfca000000488d35e0"
            "fdffffba0f000000eb5331c0803f0074200fb60f85c9741883e93083f9097711486bc00a700b4801c8700648"
            "ffc7ebe1c3bfc8000000488d35c8fdffffba35000000eb19bfc9000000488d35a2fdffffba13000000eb0648"
            "f7d84889c74889fbbf02000000b8010000000f054889dfe93effffff"
        ),
    ),
    "aarch64": (
        0xA4,
        bytes.fromhex(
            "646178696f3a206f70656e0a646178696f3a206d6d61700a646178696f3a20726561640a646178696f3a206d"
            "73796e630a646178696f3a2077726974650a646178696f3a2073746174780a646178696f3a206e6f74204441"
            "580a646178696f3a2073686f727420696e7075740a75736167653a20646178696f20777c722046494c45204f"
            "4646534554204c454e4754482c206f7220646178696f20642046494c450a0000f3030091600240f91f0c00f1"
            "e30e0054610a40f93400403922044039620e00359f920171e00900541f1400f1e10d0054601240f95c000094"
            "f50300aa601640f959000094f60300aa420080d2770080d29fde0171a0000054020080d2370080d29fca0171"
            "210c0054600c8092610e40f9030080d2080780d2010000d401f7ff10820180d2200cf8b7e40300aa000080d2"
            "a102168be20317aa230080d2050080d2c81b80d2010000d401f6ff10820180d21ffc3fb1a20a0054f80300aa"
            "1900158b1a0080d29fde0171e10200545f0316eb82010054000080d221031a8bc2021acbe80780d2010000d4"
            "61f4ff10820180d2c008f8b7200800b45a03008bf4ffff17e00318aaa102168b820080d2681c80d2010000d4"
            "61f3ff10a20180d26007f8b70d0000145f0316eb62010054200080d221031a8bc2021acb080880d2010000d4"
            "61f2ff30a20180d20006f8b75a03008bf5ffff17000080d2c80b80d2010000d4ff0304d1600c8092610e40f9"
            "020080d2e3ff80d2e4030091682480d2010000d4c1f0ff50a20180d20004f8b7e00740f920feaf37401980d2"
            "61f0ff70e20180d21b000014e90300aa000080d24b0180d22a014039aa0100342a1540384a0100344ac10051"
            "5f250071080100540c7ccb9bcc0000b5007c0b9b00000aab62000054f6ffff17c0035fd6001980d2e1eeff30"
            "a20680d206000014201980d2c1edff50620280d202000014e00300cbf30300aa400080d2080880d2010000d4"
            "e00313aaceffff17"
        ),
    ),
}


def program(arch: str) -> bytes:
    """The static executable for ``arch``: ELF header, one read+execute PT_LOAD of the
    whole file at BASE, PT_GNU_STACK (no executable stack), then the code."""
    if arch not in CODE:
        raise ProvisionError(f"no daxio for architecture {arch!r}")
    entry, code = CODE[arch]
    start = elf.EHDR_SIZE + 2 * elf.PHDR_SIZE
    size = start + len(code)
    return (
        elf.file_header(elf.ET_EXEC, arch, BASE + start + entry, 2)
        + elf.program_header(elf.PT_LOAD, elf.PF_R | elf.PF_X, 0, BASE, size, size, ALIGN)
        + elf.program_header(elf.PT_GNU_STACK, elf.PF_R | elf.PF_W, 0, 0, 0, 0, 16)
        + code
    )
