"""The few ELF facts the image builder needs, read from bytes (pure, no I/O).

- `needed_libraries`: DT_NEEDED sonames of a dynamically linked binary or library, so the
  image carries exactly the shared libraries its programs load;
- `interpreter`: PT_INTERP (the dynamic loader's path);
- `modinfo`: a kernel module's .modinfo key=value strings (name, depends, ...);
- `empty_section`: make a section look empty to the kernel's module loader;
- `file_header`, `program_header`: the two headers a file we write from Python needs (a
  stub library, testbed.images.stublib; a static program, testbed.images.daxio).

Only 64-bit ELF is handled (both guest architectures are 64-bit); either byte order when
reading, little-endian when writing (both guest architectures).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from testbed.errors import ProvisionError

_PT_INTERP = 3
_PT_DYNAMIC = 2
_DT_NEEDED = 1
_DT_STRTAB = 5
_PT_LOAD = 1

# -- writing ------------------------------------------------------------------------------

MACHINES = {"x86_64": 62, "aarch64": 183}
"""e_machine: EM_X86_64, EM_AARCH64."""
ET_EXEC, ET_DYN = 2, 3
PT_LOAD, PT_DYNAMIC, PT_GNU_STACK = _PT_LOAD, _PT_DYNAMIC, 0x6474E551
PF_X, PF_W, PF_R = 1, 2, 4
EHDR_SIZE, PHDR_SIZE = 64, 56


def file_header(e_type: int, arch: str, entry: int, phnum: int) -> bytes:
    """An Elf64_Ehdr (little-endian, System V ABI) whose program headers follow it and
    with no section headers."""
    if arch not in MACHINES:
        raise ProvisionError(f"no ELF machine number for architecture {arch!r}")
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    return ident + struct.pack(
        "<HHIQQQIHHHHHH", e_type, MACHINES[arch], 1, entry, EHDR_SIZE, 0, 0, EHDR_SIZE,
        PHDR_SIZE, phnum, 64, 0, 0,
    )  # fmt: skip


def program_header(
    p_type: int, flags: int, offset: int, vaddr: int, filesz: int, memsz: int, align: int
) -> bytes:
    """An Elf64_Phdr (p_paddr = p_vaddr)."""
    return struct.pack("<IIQQQQQQ", p_type, flags, offset, vaddr, vaddr, filesz, memsz, align)


@dataclass(frozen=True)
class _Elf:
    data: bytes
    endian: str  # "<" or ">"

    def unpack(self, fmt: str, offset: int) -> tuple[int, ...]:
        return struct.unpack_from(self.endian + fmt, self.data, offset)


def _open(data: bytes, what: str) -> _Elf:
    if data[:4] != b"\x7fELF":
        raise ProvisionError(f"{what} is not an ELF file")
    if data[4] != 2:
        raise ProvisionError(f"{what} is not a 64-bit ELF file (class {data[4]})")
    endian = "<" if data[5] == 1 else ">"
    return _Elf(data, endian)


def _segments(elf: _Elf) -> list[tuple[int, int, int, int, int]]:
    """(type, offset, vaddr, filesz, memsz) of each program header."""
    (phoff,) = elf.unpack("Q", 0x20)
    phentsize, phnum = elf.unpack("HH", 0x36)
    out = []
    for i in range(phnum):
        base = phoff + i * phentsize
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz = elf.unpack("IIQQQQQ", base)
        out.append((p_type, p_offset, p_vaddr, p_filesz, p_memsz))
    return out


def interpreter(data: bytes, what: str = "binary") -> str | None:
    """The PT_INTERP path, or None for a static binary or a library."""
    elf = _open(data, what)
    for p_type, offset, _vaddr, filesz, _memsz in _segments(elf):
        if p_type == _PT_INTERP:
            return data[offset : offset + filesz].rstrip(b"\0").decode()
    return None


def needed_libraries(data: bytes, what: str = "binary") -> list[str]:
    """DT_NEEDED sonames in file order; [] for a static binary."""
    elf = _open(data, what)
    entries = _dynamic_entries(elf)
    if entries is None:
        return []
    strtab_vaddr = next((v for t, v in entries if t == _DT_STRTAB), None)
    if strtab_vaddr is None:
        raise ProvisionError(f"{what}: dynamic section without DT_STRTAB")
    # DT_STRTAB is a virtual address: map it back to a file offset through PT_LOAD
    strtab_off = _file_offset(elf, strtab_vaddr, what)
    return [_cstr(data, strtab_off + value) for tag, value in entries if tag == _DT_NEEDED]


@dataclass(frozen=True)
class _Section:
    name: str
    header: int
    """File offset of its section header."""
    flags: int
    offset: int
    size: int


def _sections(elf: _Elf) -> list[_Section]:
    (shoff,) = elf.unpack("Q", 0x28)
    shentsize, shnum, shstrndx = elf.unpack("HHH", 0x3A)
    raw = []
    for i in range(shnum):
        header = shoff + i * shentsize
        sh_name, _type, sh_flags, _addr, sh_offset, sh_size = elf.unpack("IIQQQQ", header)
        raw.append((sh_name, header, sh_flags, sh_offset, sh_size))
    str_off = raw[shstrndx][3]
    return [
        _Section(_cstr(elf.data, str_off + sh_name), header, flags, offset, size)
        for sh_name, header, flags, offset, size in raw
    ]


def section(data: bytes, name: str, what: str = "ELF file") -> bytes | None:
    """The bytes of the named section, or None."""
    for sec in _sections(_open(data, what)):
        if sec.name == name:
            return data[sec.offset : sec.offset + sec.size]
    return None


_SH_SIZE_AT = 32
"""Offset of sh_size in an Elf64_Shdr (after name, type, flags, addr and offset)."""


def empty_section(data: bytes, name: str, what: str = "ELF file") -> bytes:
    """``data`` with the named section's size set to 0 (unchanged without one): readers
    that go by the section headers, like the kernel's module loader, find it empty. The
    bytes stay where they were; nothing else moves."""
    elf = _open(data, what)
    out = bytearray(data)
    for sec in _sections(elf):
        if sec.name == name:
            struct.pack_into(elf.endian + "Q", out, sec.header + _SH_SIZE_AT, 0)
    return bytes(out)


def modinfo_items(data: bytes, what: str = "kernel module") -> list[tuple[str, str]]:
    """A module's .modinfo key=value strings in order, repeated keys (alias) included."""
    raw = section(data, ".modinfo", what)
    if raw is None:
        raise ProvisionError(f"{what} has no .modinfo section: not a kernel module?")
    items = []
    for item in raw.split(b"\0"):
        if b"=" in item:
            key, value = item.split(b"=", 1)
            items.append((key.decode(), value.decode(errors="replace")))
    return items


def modinfo(data: bytes, what: str = "kernel module") -> dict[str, str]:
    """A module's .modinfo as a dict (the last value wins for repeated keys like alias)."""
    return dict(modinfo_items(data, what))


_DT_SYMTAB = 6
_DT_VERSYM = 0x6FFFFFF0
_DT_VERNEED = 0x6FFFFFFE
_DT_VERNEEDNUM = 0x6FFFFFFF
_SHN_UNDEF = 0


def _dynamic_entries(elf: _Elf) -> list[tuple[int, int]] | None:
    """The dynamic section's (tag, value) pairs in file order, up to DT_NULL; None when the
    file has no PT_DYNAMIC (a static binary)."""
    dynamic = [s for s in _segments(elf) if s[0] == _PT_DYNAMIC]
    if not dynamic:
        return None
    _t, dyn_off, _v, dyn_size, _m = dynamic[0]
    entries = []
    for pos in range(dyn_off, dyn_off + dyn_size, 16):
        tag, value = elf.unpack("qQ", pos)
        if tag == 0:
            break
        entries.append((tag, value))
    return entries


def _dynamic(elf: _Elf, what: str) -> dict[int, int]:
    """The dynamic section: tag -> value (the first one of each tag)."""
    entries = _dynamic_entries(elf)
    if entries is None:
        raise ProvisionError(f"{what} has no dynamic section")
    first: dict[int, int] = {}
    for tag, value in entries:
        first.setdefault(tag, value)
    return first


def _file_offset(elf: _Elf, vaddr: int, what: str) -> int:
    for p_type, offset, start, filesz, _memsz in _segments(elf):
        if p_type == _PT_LOAD and start <= vaddr < start + filesz:
            return vaddr - start + offset
    raise ProvisionError(f"{what}: address {vaddr:#x} is outside every loaded segment")


def _cstr(data: bytes, offset: int) -> str:
    return data[offset : data.index(b"\0", offset)].decode()


def imported_symbols(data: bytes, soname: str, what: str = "binary") -> dict[str, list[str]]:
    """The symbols `data` imports from `soname`: version name -> sorted symbol names.

    Found through symbol versioning (DT_VERNEED names the library for each version, DT_VERSYM
    gives each undefined symbol's version). A binary that needs `soname` without versioned
    symbols from it gets ProvisionError: then its imports cannot be told apart.
    """
    elf = _open(data, what)
    dyn = _dynamic(elf, what)
    if _DT_VERNEED not in dyn or _DT_VERSYM not in dyn or _DT_SYMTAB not in dyn:
        raise ProvisionError(f"{what} has no symbol versions: cannot tell what it uses of {soname}")
    strtab = _file_offset(elf, dyn[_DT_STRTAB], what)
    # the version indices that belong to soname
    indices: dict[int, str] = {}
    pos = _file_offset(elf, dyn[_DT_VERNEED], what)
    for _ in range(dyn.get(_DT_VERNEEDNUM, 0)):
        _ver, cnt, file_name, aux, nxt = elf.unpack("HHIII", pos)
        if _cstr(data, strtab + file_name) == soname:
            apos = pos + aux
            for _ in range(cnt):
                _hash, _flags, other, name, anext = elf.unpack("IHHII", apos)
                indices[other] = _cstr(data, strtab + name)
                apos += anext
        if not nxt:
            break
        pos += nxt
    if not indices:
        raise ProvisionError(f"{what} uses no versioned symbols of {soname}")
    # DT_SYMTAB has no size entry; symbols end where the string table starts (ld's layout)
    symtab = _file_offset(elf, dyn[_DT_SYMTAB], what)
    versym = _file_offset(elf, dyn[_DT_VERSYM], what)
    count = (strtab - symtab) // 24 if strtab > symtab else 0
    if count <= 0:
        raise ProvisionError(f"{what}: cannot size the dynamic symbol table")
    found: dict[str, list[str]] = {}
    for i in range(1, count):
        st_name, _info, _other, shndx = elf.unpack("IBBH", symtab + 24 * i)
        (ver,) = elf.unpack("H", versym + 2 * i)
        if shndx == _SHN_UNDEF and (ver & 0x7FFF) in indices:
            found.setdefault(indices[ver & 0x7FFF], []).append(_cstr(data, strtab + st_name))
    return {v: sorted(names) for v, names in sorted(found.items())}
