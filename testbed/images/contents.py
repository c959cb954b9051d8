"""The initramfs' files from the unpacked userland packages: the package tree looked up like
one root file system (usrmerge spellings tried), symlinks followed, and the ELF shared
library closure of every program added (or a generated stub in a library's place)."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from testbed.errors import ProvisionError
from testbed.images import elf, stublib
from testbed.images.cpio import CpioEntry

# usrmerge: Debian sid ships everything under usr/; the top-level names are links
USRMERGE = ("bin", "sbin", "lib", "lib64")


class PackageTree:
    """The union of several unpacked packages, looked up like one root file system."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = roots

    def _find(self, rel: str) -> Path | None:
        for root in self.roots:
            candidate = root / rel
            if candidate.is_symlink() or candidate.exists():
                return candidate
        return None

    def locate(self, rel: str) -> tuple[str, Path] | None:
        """(normalised relative path, host path) for `rel`, trying usrmerge'd spellings."""
        rel = str(PurePosixPath("/", rel).relative_to("/"))
        found = self._find(rel)
        if found is not None:
            return rel, found
        first = rel.split("/", 1)[0]
        if first in USRMERGE:
            merged = f"usr/{rel}"
            found = self._find(merged)
            if found is not None:
                return merged, found
        return None


def _normalise_link(link_rel: str, target: str) -> str:
    """Where a symlink at link_rel points, as a path relative to the image root."""
    base = PurePosixPath("/") if target.startswith("/") else PurePosixPath("/", link_rel).parent
    parts: list[str] = []
    for part in (base / target).parts[1:]:
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)


class ImageContents:
    """The initramfs entries, with ELF shared-library closure and symlink following."""

    def __init__(
        self,
        tree: PackageTree,
        library_dirs: tuple[str, ...],
        arch: str = "",
        stubs: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.tree = tree
        self.library_dirs = library_dirs
        self.arch = arch
        self.stubs = dict(stubs or {})
        self.stub_users: dict[str, list[tuple[str, bytes]]] = {}
        self.entries: dict[str, CpioEntry] = {}

    def add(self, entry: CpioEntry) -> None:
        if entry.path in self.entries:
            if self.entries[entry.path] != entry:
                raise ProvisionError(f"two different files for {entry.path} in the image")
            return
        self.entries[entry.path] = entry

    def add_from_tree(self, rel: str, needed_by: str = "the recipe") -> str:
        """Copy `rel` (following symlinks, adding each link too); returns the real path."""
        for _ in range(40):  # a bound on symlink chains, like the kernel's
            located = self.tree.locate(rel)
            if located is None:
                raise ProvisionError(
                    f"{rel} (wanted by {needed_by}) is in none of the recipe's packages; "
                    "add the package that ships it to 'packages' or fix 'files'"
                )
            rel, host = located
            if host.is_symlink():
                target = os.readlink(host)
                self.add(CpioEntry.symlink(rel, target))
                rel = _normalise_link(rel, target)
                continue
            if rel in self.entries:
                return rel
            mode = host.stat().st_mode
            if not stat.S_ISREG(mode):
                raise ProvisionError(f"{rel} from the packages is not a regular file")
            data = host.read_bytes()
            perm = 0o755 if mode & 0o111 else 0o644
            self.add(CpioEntry.file(rel, data, perm))
            if data[:4] == b"\x7fELF":
                self._add_elf_deps(rel, data)
            return rel
        raise ProvisionError(f"too many levels of symbolic links at {rel}")

    def _add_elf_deps(self, rel: str, data: bytes) -> None:
        interp = elf.interpreter(data, rel)
        if interp:
            self.add_from_tree(interp.lstrip("/"), rel)
        for soname in elf.needed_libraries(data, rel):
            if soname in self.stubs:
                self.stub_users.setdefault(soname, []).append((rel, data))
                continue
            for libdir in self.library_dirs:
                candidate = f"{libdir}/{soname}"
                if self.tree.locate(candidate) is not None:
                    self.add_from_tree(candidate, rel)
                    break
            else:
                raise ProvisionError(
                    f"{rel} needs {soname}, which none of the recipe's packages provide in "
                    f"{', '.join(self.library_dirs)}; add the library's package to 'packages'"
                )

    def add_stubs(self) -> None:
        """Generate each stub library from what its users import (call after all files)."""
        for soname, non_null in sorted(self.stubs.items()):
            users = self.stub_users.get(soname)
            if not users:
                raise ProvisionError(
                    f"stub library {soname}: no file in the image needs it; "
                    "drop it from the recipe's 'stub_libraries'"
                )
            symbols: dict[str, set[str]] = {}
            for rel, data in users:
                for version, names in elf.imported_symbols(data, soname, rel).items():
                    symbols.setdefault(version, set()).update(names)
            lib = stublib.stub_library(self.arch, soname, symbols, non_null)
            self.add(CpioEntry.file(f"{self.library_dirs[0]}/{soname}", lib))
