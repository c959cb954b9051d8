"""Guest image recipes: images/<arch>.json plus the shared images/init (loading is I/O,
validation is pure and names the field that is wrong)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import paths
from testbed.errors import ConfigError
from testbed.images import pciids
from testbed.machine.profiles import ARCHES

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_READY_RE = re.compile(r"^[A-Z0-9][A-Z0-9_-]{7,}$")
INITRD_COMPRESSIONS = ("gzip", "none")
""""none" boots faster under TCG: the kernel copies the cpio instead of inflating it
(~0.3-0.4 s of emulated CPU for ~10 MB), and QEMU loads the bigger file in milliseconds."""


@dataclass(frozen=True)
class Recipe:
    """What goes into one architecture's guest image.

    suite: the Debian suite of the userland packages;
    kernel_suite: the suite the kernel comes from (the kernel does not care about the
      userland, and an older kernel can boot much faster under TCG: see images/*.json);
    kernel_package: the metapackage to start from (linux-image-amd64);
    kernel_follow: name prefixes of its Depends to follow to the real kernel and modules
      packages (Debian sid splits them into linux-binary-* and linux-modules-*);
    packages: userland packages to fetch; files: paths inside them to put into the image
      (same path; shared libraries they load are added automatically from DT_NEEDED);
    library_dirs: where DT_NEEDED sonames are looked up; symlinks: extra links (path->target);
    stub_libraries: sonames to replace with a generated do-nothing library (see
      testbed.images.stublib), each with the functions that must return non-NULL;
    modules: kernel modules to load at boot (their dependencies are added);
    optional_modules: drivers carried under /extra but loaded only when a scenario asks
      (GuestVM.load_modules; their dependencies are added), so that a device they would
      bind (virtio-fs at virtio-id 26) stays unbound in every other scenario;
    cmdline: the kernel command line; ready_line: what /init prints once sshd listens;
    initrd_compression: "gzip" or "none" (see INITRD_COMPRESSIONS);
    pci_ids_vendors: vendor ids whose names the image's pci.ids keeps (empty: all of it;
      see testbed.images.pciids).
    """

    arch: str
    suite: str
    kernel_suite: str
    kernel_package: str
    kernel_follow: tuple[str, ...]
    packages: tuple[str, ...]
    files: tuple[str, ...]
    library_dirs: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...]
    stub_libraries: tuple[tuple[str, tuple[str, ...]], ...]
    modules: tuple[str, ...]
    cmdline: str
    ready_line: str
    initrd_compression: str = "gzip"
    optional_modules: tuple[str, ...] = ()
    pci_ids_vendors: tuple[str, ...] = ()

    def canonical(self) -> str:
        """A stable text form for hashing."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _str(data: Mapping[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value.strip()


def _str_list(
    data: Mapping[str, Any], key: str, where: str, allow_empty: bool = False
) -> tuple[str, ...]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: '{key}' must be a list of non-empty strings, got {value!r}")
    if not value and not allow_empty:
        raise ConfigError(f"{where}: '{key}' must not be empty")
    if len(set(value)) != len(value):
        dups = sorted({v for v in value if value.count(v) > 1})
        raise ConfigError(f"{where}: '{key}' lists {', '.join(dups)} more than once")
    return tuple(value)


def _rel_path(value: str, where: str) -> str:
    if value.startswith("/") or ".." in value.split("/") or not value:
        raise ConfigError(f"{where}: {value!r} must be a relative path inside the image")
    return value


def parse_recipe(data: Any, where: str, expected_arch: str) -> Recipe:
    """Validate a recipe's JSON data. `where` names the file in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the recipe must be a JSON object")
    known = {
        "arch",
        "suite",
        "kernel",
        "packages",
        "files",
        "library_dirs",
        "symlinks",
        "stub_libraries",
        "modules",
        "optional_modules",
        "cmdline",
        "ready_line",
        "initrd_compression",
        "pci_ids_vendors",
        "comment",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    arch = _str(data, "arch", where)
    if arch != expected_arch:
        raise ConfigError(f"{where}: 'arch' is {arch!r} but the file is for {expected_arch!r}")
    kernel = data.get("kernel")
    if not isinstance(kernel, dict):
        raise ConfigError(
            f"{where}: 'kernel' must be an object with 'package', 'follow' and optionally 'suite'"
        )
    unknown_kernel = sorted(set(kernel) - {"package", "follow", "suite"})
    if unknown_kernel:
        raise ConfigError(
            f"{where}: unknown keys {', '.join(unknown_kernel)} in 'kernel' "
            "(known: follow, package, suite)"
        )
    suite = _str(data, "suite", where)
    packages = _str_list(data, "packages", where)
    kernel_package = _str(kernel, "package", f"{where} kernel")
    for name in (*packages, kernel_package):
        if not _PACKAGE_RE.match(name):
            raise ConfigError(f"{where}: {name!r} is not a valid Debian package name")
    symlinks = data.get("symlinks", {})
    if not isinstance(symlinks, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in symlinks.items()
    ):
        raise ConfigError(f"{where}: 'symlinks' must map image paths to link targets")
    stubs = data.get("stub_libraries", {})
    if not isinstance(stubs, dict) or not all(
        isinstance(k, str) and k.startswith("lib") and ".so" in k and "/" not in k for k in stubs
    ):
        raise ConfigError(
            f"{where}: 'stub_libraries' must map sonames (libfoo.so.N) to lists of functions"
        )
    stub_libraries = tuple(
        sorted((k, _str_list(stubs, k, f"{where} stub_libraries", True)) for k in stubs)
    )
    cmdline = _str(data, "cmdline", where)
    if "console=" not in cmdline:
        raise ConfigError(f"{where}: 'cmdline' needs a console= so the ready line reaches QEMU")
    ready = _str(data, "ready_line", where)
    if not _READY_RE.match(ready):
        raise ConfigError(
            f"{where}: 'ready_line' {ready!r} must be one unmistakable token "
            "(upper case, digits, '-', '_', at least 8 characters)"
        )
    compression = data.get("initrd_compression", "gzip")
    if compression not in INITRD_COMPRESSIONS:
        raise ConfigError(
            f"{where}: 'initrd_compression' is {compression!r}; "
            f"use one of {', '.join(INITRD_COMPRESSIONS)}"
        )
    vendors = (
        _str_list(data, "pci_ids_vendors", where, allow_empty=True)
        if "pci_ids_vendors" in data
        else ()
    )
    bad = [v for v in vendors if not pciids.valid_vendor_id(v)]
    if bad:
        raise ConfigError(
            f"{where}: 'pci_ids_vendors' {bad} are not vendor ids: use 4 lower-case hex digits"
        )
    return Recipe(
        arch=arch,
        suite=suite,
        kernel_suite=_str(kernel, "suite", f"{where} kernel") if "suite" in kernel else suite,
        kernel_package=kernel_package,
        kernel_follow=_str_list(kernel, "follow", f"{where} kernel"),
        packages=packages,
        files=tuple(_rel_path(f, where) for f in _str_list(data, "files", where)),
        library_dirs=tuple(_rel_path(d, where) for d in _str_list(data, "library_dirs", where)),
        symlinks=tuple(sorted((_rel_path(k, where), v) for k, v in symlinks.items())),
        stub_libraries=stub_libraries,
        modules=_str_list(data, "modules", where, allow_empty=True),
        cmdline=cmdline,
        ready_line=ready,
        initrd_compression=compression,
        optional_modules=(
            _str_list(data, "optional_modules", where, allow_empty=True)
            if "optional_modules" in data
            else ()
        ),
        pci_ids_vendors=vendors,
    )


def check_init(init: bytes, recipe: Recipe, where: str) -> None:
    """The /init must be a script that prints the recipe's ready line."""
    if not init.startswith(b"#!"):
        raise ConfigError(f"{where}: /init must start with '#!' (a busybox sh script)")
    if recipe.ready_line.encode() not in init:
        raise ConfigError(f"{where}: /init never prints the ready line {recipe.ready_line!r}")


def recipe_path(arch: str, recipes_dir: Path | None = None) -> Path:
    if arch not in ARCHES:
        raise ConfigError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHES)}")
    return (recipes_dir or paths.RECIPES_DIR) / f"{arch}.json"


def load_recipe(arch: str, recipes_dir: Path | None = None) -> tuple[Recipe, bytes]:
    """The recipe for `arch` and the /init script bytes, both validated."""
    path = recipe_path(arch, recipes_dir)
    init_path = path.parent / "init"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no image recipe {path}; restore it from the source tree") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    recipe = parse_recipe(data, str(path), arch)
    try:
        init = init_path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"no guest /init script at {init_path}") from exc
    check_init(init, recipe, str(init_path))
    return recipe, init


def sha256_hex(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        h.update(len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()
