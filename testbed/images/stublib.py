"""A do-nothing shared library, written as bytes (pure): stands in for a library whose only
user in the guest never needs it, to keep that library's dependencies out of the initramfs.

Why: lspci 3.15 links libkmod (for `-k`, module names), and sid's libkmod links libcrypto
and libzstd: 7.5 MB of the 18 MB initramfs, which the kernel unpacks on every boot (~0.4 s
under TCG). The guest has no modules.dep, so libkmod finds nothing anyway. The stub exports
the imported symbols with their versions; every function returns 0 (NULL / success / empty
list) except those named `non_null`, which return a non-NULL dummy pointer (kmod_new: lspci
then asks for modules, gets an empty list, and prints nothing about libkmod).

The layout is the minimum glibc's ld.so needs: one read+execute PT_LOAD with the code,
symbol, string, hash and version tables; one read+write PT_LOAD with the dynamic section
(ld.so relocates its pointers in place); PT_DYNAMIC; PT_GNU_STACK (no executable stack).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from testbed.errors import ProvisionError
from testbed.images import elf

PAGE = 0x10000  # 64 KiB: valid for 4K, 16K and 64K page kernels
# ("return 0" code, "return its own address" code)
_ARCH = {
    # xor eax,eax; ret  |  lea rax,[rip-7]; ret
    "x86_64": (bytes.fromhex("31c0c3"), bytes.fromhex("488d05f9ffffffc3")),
    # mov x0,#0; ret  |  adr x0,.; ret
    "aarch64": (
        struct.pack("<II", 0xD2800000, 0xD65F03C0),
        struct.pack("<II", 0x10000000, 0xD65F03C0),
    ),
}

_DT = {
    "NULL": 0,
    "HASH": 4,
    "STRTAB": 5,
    "SYMTAB": 6,
    "STRSZ": 10,
    "SYMENT": 11,
    "SONAME": 14,
    "VERSYM": 0x6FFFFFF0,
    "VERDEF": 0x6FFFFFFC,
    "VERDEFNUM": 0x6FFFFFFD,
}


def elf_hash(name: bytes) -> int:
    """The System V ELF hash (DT_HASH buckets and Verdef vd_hash)."""
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


class _Strings:
    def __init__(self) -> None:
        self.data = bytearray(b"\0")
        self.index: dict[str, int] = {}

    def add(self, text: str) -> int:
        if text not in self.index:
            self.index[text] = len(self.data)
            self.data += text.encode() + b"\0"
        return self.index[text]


def _align(buf: bytearray, n: int) -> int:
    buf += b"\0" * (-len(buf) % n)
    return len(buf)


def stub_library(
    arch: str, soname: str, symbols: Mapping[str, Iterable[str]], non_null: Iterable[str] = ()
) -> bytes:
    """An ELF shared object named `soname` defining `symbols` (version -> names)."""
    if arch not in _ARCH:
        raise ProvisionError(f"no stub libraries for architecture {arch!r}")
    ret0, ret_self = _ARCH[arch]
    versions = sorted(symbols)
    flat = sorted({(name, v) for v in versions for name in symbols[v]})
    names = [n for n, _v in flat]
    if len(set(names)) != len(names):
        raise ProvisionError(f"{soname}: a symbol is imported in two versions: {flat}")
    non_null = set(non_null)
    unknown = sorted(non_null - set(names))
    if unknown:
        raise ProvisionError(f"{soname}: {', '.join(unknown)} not imported by anything")

    strings = _Strings()
    strings.add(soname)
    phnum = 4
    body = bytearray(b"\0" * (elf.EHDR_SIZE + phnum * elf.PHDR_SIZE))

    code0 = _align(body, 16)
    body += ret0
    code_self = _align(body, 16)
    body += ret_self

    # .dynsym: index 0 is the null symbol
    symtab = _align(body, 8)
    body += b"\0" * 24
    for name, _v in flat:
        value = code_self if name in non_null else code0
        st_info = (1 << 4) | 2  # STB_GLOBAL, STT_FUNC
        # shndx: any defined section index; ld.so only checks it is not SHN_UNDEF
        body += struct.pack("<IBBHQQ", strings.add(name), st_info, 0, 1, value, 0)
    nsyms = len(flat) + 1

    # DT_HASH: one bucket chaining every symbol (a handful of symbols)
    hash_off = _align(body, 8)
    chain = [0] + [i - 1 if i > 1 else 0 for i in range(1, nsyms)]
    body += struct.pack(f"<II I {nsyms}I", 1, nsyms, nsyms - 1 if nsyms > 1 else 0, *chain)

    # versions: index 1 is the library itself (VER_FLG_BASE), then one per version name
    ver_index = {v: i + 2 for i, v in enumerate(versions)}
    versym = _align(body, 2)
    body += struct.pack(f"<{nsyms}H", 0, *(ver_index[v] for _n, v in flat))
    verdef = _align(body, 8)
    defs = [(soname, 1, 1), *((v, 0, ver_index[v]) for v in versions)]
    for i, (name, flags, ndx) in enumerate(defs):
        nxt = 28 if i + 1 < len(defs) else 0
        body += struct.pack(
            "<HHHHIII", 1, flags, ndx, 1, elf_hash(name.encode()), 20, nxt
        ) + struct.pack("<II", strings.add(name), 0)

    strtab = _align(body, 8)
    body += strings.data
    text_end = len(body)

    # the dynamic section on its own (writable) page
    dyn_vaddr = (text_end + PAGE - 1) // PAGE * PAGE
    dyn_off = _align(body, 16)
    entries = [
        ("SONAME", strings.index[soname]),
        ("HASH", hash_off),
        ("STRTAB", strtab),
        ("SYMTAB", symtab),
        ("STRSZ", len(strings.data)),
        ("SYMENT", 24),
        ("VERSYM", versym),
        ("VERDEF", verdef),
        ("VERDEFNUM", len(defs)),
        ("NULL", 0),
    ]
    for tag, value in entries:
        body += struct.pack("<qQ", _DT[tag], value)
    dyn_size = len(body) - dyn_off

    # dyn_off and dyn_vaddr must agree modulo the page size: the RW segment maps from
    # the start of the page that holds the dynamic section
    rw_off = dyn_off - dyn_off % PAGE
    dyn_vaddr += dyn_off % PAGE
    rw_vaddr = dyn_vaddr - dyn_off % PAGE

    r, w, x = elf.PF_R, elf.PF_W, elf.PF_X
    phdrs = [
        (elf.PT_LOAD, r | x, 0, 0, text_end, text_end, PAGE),
        (elf.PT_LOAD, r | w, rw_off, rw_vaddr, len(body) - rw_off, len(body) - rw_off, PAGE),
        (elf.PT_DYNAMIC, r | w, dyn_off, dyn_vaddr, dyn_size, dyn_size, 8),
        (elf.PT_GNU_STACK, r | w, 0, 0, 0, 0, 16),
    ]
    headers = elf.file_header(elf.ET_DYN, arch, 0, phnum) + b"".join(
        elf.program_header(*ph) for ph in phdrs
    )
    body[0 : len(headers)] = headers
    return bytes(body)
