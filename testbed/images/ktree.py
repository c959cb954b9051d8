"""The kernel inside the unpacked kernel packages: its image, its modules and their order.

I/O around the pure rules of testbed.images.kmod: finds the kernel and its modules
directory, reads each module only when its dependencies are asked for (decompressed,
signature stripped, .BTF hidden: see kmod), and gives the initramfs entries of the boot
modules and of the optional ones under /extra (testbed.images.extra).
"""

from __future__ import annotations

import lzma
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import ProvisionError
from testbed.images import elf, extra, kernel, kmod
from testbed.images.cpio import CpioEntry, gzip_reproducible

MODULES_DIR = "usr/lib/modules/testbed"  # /lib is a usrmerge link
MODULE_LIST = "etc/testbed/modules"


@dataclass(frozen=True)
class KernelTree:
    version: str  # the kernel release, what `uname -r` prints in the guest
    root: Path  # .../lib/modules/<version> (the one holding kernel/)
    vmlinuz: Path
    builtin: Path | None  # modules.builtin (Debian sid ships it in linux-base-*)

    @property
    def builtin_modinfo(self) -> Path:
        return self.root / "modules.builtin.modinfo"


def find_kernel(roots: list[Path]) -> KernelTree:
    """The kernel and its modules directory among the unpacked kernel packages."""
    moddirs: dict[str, Path] = {}
    vmlinuz: dict[str, Path] = {}
    builtin: dict[str, Path] = {}
    for root in roots:
        for base in (root / "usr/lib/modules", root / "lib/modules"):
            if base.is_dir():
                for d in base.iterdir():
                    if (d / "kernel").is_dir():
                        moddirs[d.name] = d
                    if (d / "vmlinuz").is_file():
                        vmlinuz[d.name] = d / "vmlinuz"
                    if (d / "modules.builtin").is_file():
                        builtin[d.name] = d / "modules.builtin"
        if (root / "boot").is_dir():
            for f in (root / "boot").glob("vmlinuz-*"):
                vmlinuz[f.name.removeprefix("vmlinuz-")] = f
    both = sorted(set(moddirs) & set(vmlinuz))
    if len(both) != 1:
        raise ProvisionError(
            f"expected one kernel with modules in the kernel packages, found kernels "
            f"{sorted(vmlinuz)} and module trees {sorted(moddirs)}; check 'kernel.follow'"
        )
    version = both[0]
    return KernelTree(version, moddirs[version], vmlinuz[version], builtin.get(version))


class ModuleIndex(Mapping[str, list[str]]):
    """name -> what to load before it (depends= plus the softdep pre: names that resolve),
    decompressing a module only when it is asked about."""

    def __init__(self, tree: KernelTree) -> None:
        self.files: dict[str, Path] = {}
        for dirpath, _dirs, names in os.walk(tree.root / "kernel"):
            for name in names:
                if ".ko" in name:
                    self.files[kmod.module_name(name)] = Path(dirpath) / name
        self.builtin = kmod.parse_builtin(tree.builtin.read_text()) if tree.builtin else set()
        path = tree.builtin_modinfo
        self.builtin_aliases = (
            kmod.parse_builtin_aliases(path.read_bytes()) if path.is_file() else set()
        )
        self.data: dict[str, bytes] = {}
        self.unresolved_softdeps: dict[str, list[str]] = {}
        """module -> its softdeps found neither built in nor among the candidates: left
        out (a soft dependency; modprobe skips those too), reported by the builder."""

    def module_bytes(self, name: str) -> bytes:
        if name not in self.data:
            raw = self.files[name].read_bytes()
            if raw.startswith(kernel.XZ_MAGIC):
                raw = lzma.decompress(raw)
            elif raw.startswith(kernel.ZSTD_MAGIC):
                raise ProvisionError(f"{self.files[name]}: zstd modules are not supported yet")
            where = str(self.files[name])
            self.data[name] = kmod.hide_btf(kmod.strip_signature(raw, where), where)
        return self.data[name]

    def _provides(self, module: str, name: str) -> bool:
        if module == kmod.module_name(name):
            return True
        aliases = elf.modinfo_items(self.module_bytes(module), str(self.files[module]))
        return any(key == "alias" and value == name for key, value in aliases)

    def _softdep(self, name: str) -> str | None:
        """The module to load for softdep `name`, "" when built in, None when unknown."""
        if name in self.builtin_aliases or kmod.module_name(name) in self.builtin:
            return ""
        for candidate in kmod.softdep_candidates(name):
            if candidate in self.files and self._provides(candidate, name):
                return candidate
        return None

    def __getitem__(self, name: str) -> list[str]:
        info = elf.modinfo(self.module_bytes(name), str(self.files[name]))
        before = kmod.parse_depends(info.get("depends", ""))
        for soft in kmod.parse_softdep_pre(info.get("softdep", "")):
            found = self._softdep(soft)
            if found is None:
                self.unresolved_softdeps.setdefault(name, []).append(soft)
            elif found and found not in before:
                before.append(found)
        return before

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def module_entries(
    index: ModuleIndex, wanted: tuple[str, ...]
) -> tuple[list[CpioEntry], list[str]]:
    """The boot modules' .ko files (decompressed: busybox insmod loads plain ELF) and
    their load order, read by /init from MODULE_LIST."""
    order = kmod.load_order(wanted, index, index.builtin)
    entries = [
        CpioEntry.file(f"{MODULES_DIR}/{name}.ko", index.module_bytes(name)) for name in order
    ]
    entries.append(CpioEntry.file(MODULE_LIST, "".join(f"{n}\n" for n in order).encode()))
    return entries, order


def optional_module_entries(
    index: ModuleIndex,
    wanted: tuple[str, ...],
    at_boot: list[str],
    load_with: Mapping[str, tuple[str, ...]] | None = None,
) -> tuple[list[CpioEntry], dict[str, list[str]]]:
    """The optional modules under /extra (testbed.images.extra): each .ko once, and per
    wanted module the load order of what it needs beyond the boot modules: its companions
    from ``load_with`` and their needs first, the module itself last; gzip'ed (see
    extra.MODULE_SUFFIX). A module built into
    this kernel gets an empty order (loading it is then a no-op). Under a fresh directory:
    an entry named lib would replace the image's lib -> usr/lib link."""
    companions = dict(load_with or {})
    orders: dict[str, list[str]] = {}
    carried: dict[str, bytes] = {}
    for name in wanted:
        chain = [*companions.get(name, ()), name]
        order = [m for m in kmod.load_order(chain, index, index.builtin) if m not in at_boot]
        orders[kmod.module_name(name)] = order
        for m in order:
            if m not in carried:
                carried[m] = gzip_reproducible(index.module_bytes(m))
    entries = [CpioEntry.directory(extra.EXTRA_DIR), CpioEntry.directory(extra.MODULES_DIR)]
    entries += [CpioEntry.file(extra.module_path(m), data) for m, data in sorted(carried.items())]
    entries += [
        CpioEntry.file(extra.order_path(name), "".join(f"{m}\n" for m in order).encode())
        for name, order in sorted(orders.items())
    ]
    return entries, orders
