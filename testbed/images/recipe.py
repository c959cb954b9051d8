"""Guest image recipes: images/<arch>.json plus the shared images/init (loading is I/O,
validation is pure and names the field that is wrong).

One file per architecture, one image per (architecture, kernel). The file holds what every
kernel shares (the userland, the boot and optional module lists, the command line) and, under
``kernels``, each named kernel's overrides: at least where its package comes from, plus what
differs for it (see KERNEL_OVERRIDES). A module built into a kernel needs no override: it
drops out of the load order by itself (testbed.images.kmod).

    {"arch": "x86_64", "suite": "sid", "kernel": {"package": ..., "follow": [...]}, ...,
     "kernels": {"6.1": {"kernel": {"suite": "bookworm"}},
                 "6.12": {"kernel": {"suite": "trixie"}, "cmdline_append": "..."}}}
"""

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

DEFAULT_KERNEL = "6.1"
"""The kernel of an image whose caller names none: bookworm's 6.1, which every scenario was
measured and tuned on (images/*.json). The one place to change it once 6.12 is measured
to be as good (see the recipes' "kernels")."""

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_READY_RE = re.compile(r"^[A-Z0-9][A-Z0-9_-]{7,}$")
_KERNEL_NAME_RE = re.compile(r"^[0-9][0-9a-z.+-]{0,31}$")
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
      see testbed.images.pciids);
    kernel_name: which of the file's ``kernels`` this is ("6.1", "6.12");
    load_with: per optional module, modules loaded with it that no depends= names but its
      device needs (virtio_pmem only makes an nvdimm region: nd_pmem turns it into
      /dev/pmem0), as sorted (module, companions) pairs.
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
    kernel_name: str = DEFAULT_KERNEL
    load_with: tuple[tuple[str, tuple[str, ...]], ...] = ()

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


_BASE_KEYS = frozenset(
    {
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
        "load_with",
        "cmdline",
        "ready_line",
        "initrd_compression",
        "pci_ids_vendors",
        "comment",
    }
)
KERNEL_OVERRIDES = (
    "comment",
    "kernel",
    "modules",
    "optional_modules",
    "load_with",
    "cmdline",
    "cmdline_append",
)
"""What a named kernel may change: 'kernel' is merged key by key into the shared one (a
kernel usually names only its suite), 'cmdline_append' adds words to the shared command
line (the kernel takes initcall_blacklist= more than once), the others replace the shared
value. Everything else is the same for every kernel by construction."""


def _parse_one(data: Mapping[str, Any], where: str, expected_arch: str, name: str) -> Recipe:
    """Validate one merged recipe (shared part plus one kernel's overrides)."""
    unknown = sorted(set(data) - _BASE_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(_BASE_KEYS))})"
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
    for pkg in (*packages, kernel_package):
        if not _PACKAGE_RE.match(pkg):
            raise ConfigError(f"{where}: {pkg!r} is not a valid Debian package name")
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
    optional = (
        _str_list(data, "optional_modules", where, allow_empty=True)
        if "optional_modules" in data
        else ()
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
        optional_modules=optional,
        pci_ids_vendors=vendors,
        kernel_name=name,
        load_with=_load_with(data, where, optional),
    )


def _load_with(
    data: Mapping[str, Any], where: str, optional: tuple[str, ...]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    value = data.get("load_with", {})
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where}: 'load_with' must map optional modules to lists of modules, "
            'e.g. {"virtio_pmem": ["nd_pmem"]}'
        )
    strays = sorted(set(value) - set(optional))
    if strays:
        raise ConfigError(
            f"{where}: 'load_with' names {', '.join(strays)}, which 'optional_modules' does "
            "not list: add them there or drop them from 'load_with'"
        )
    return tuple(sorted((k, _str_list(value, k, f"{where} load_with")) for k in value))


def _merge(base: Mapping[str, Any], override: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The shared part with one kernel's overrides applied (see KERNEL_OVERRIDES)."""
    unknown = sorted(set(override) - set(KERNEL_OVERRIDES))
    if unknown:
        raise ConfigError(
            f"{where}: a kernel cannot override {', '.join(unknown)} (it may override "
            f"{', '.join(KERNEL_OVERRIDES)}); what every kernel shares is set at the top level"
        )
    merged = {k: v for k, v in base.items() if k != "kernels"}
    for key, value in override.items():
        if key == "kernel":
            if not isinstance(value, dict):
                raise ConfigError(
                    f'{where}: \'kernel\' must be an object, e.g. {{"suite": "trixie"}}'
                )
            shared = base.get("kernel", {})
            merged["kernel"] = {**(shared if isinstance(shared, dict) else {}), **value}
        elif key == "cmdline_append":
            extra = _str(override, "cmdline_append", where)
            merged["cmdline"] = f"{_str(base, 'cmdline', where)} {extra}"
        elif key != "comment":
            merged[key] = value
    return merged


def parse_recipes(data: Any, where: str, expected_arch: str) -> dict[str, Recipe]:
    """Validate a recipe file's JSON data: every kernel's recipe by name, in file order.
    `where` names the file in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the recipe must be a JSON object")
    kernels = data.get("kernels")
    if not isinstance(kernels, dict) or not kernels:
        raise ConfigError(
            f"{where}: 'kernels' must name at least one kernel with where it comes from, "
            f'e.g. {{"{DEFAULT_KERNEL}": {{"kernel": {{"suite": "bookworm"}}}}}}'
        )
    recipes: dict[str, Recipe] = {}
    for name, override in kernels.items():
        kwhere = f"{where} kernels.{name}"
        if not _KERNEL_NAME_RE.match(name):
            raise ConfigError(
                f"{kwhere}: a kernel's name is its version line, e.g. '6.12' (a digit first, "
                "then digits, lower-case letters, '.', '+', '-')"
            )
        if not isinstance(override, dict):
            raise ConfigError(f"{kwhere}: must be an object of overrides (may be empty)")
        if "cmdline" in override and "cmdline_append" in override:
            raise ConfigError(
                f"{kwhere}: give 'cmdline' (replaces the shared one) or 'cmdline_append' "
                "(adds to it), not both"
            )
        recipes[name] = _parse_one(_merge(data, override, kwhere), kwhere, expected_arch, name)
    if DEFAULT_KERNEL not in recipes:
        raise ConfigError(
            f"{where}: 'kernels' has {', '.join(recipes)} but not {DEFAULT_KERNEL!r}, the "
            "default kernel (testbed.images.recipe.DEFAULT_KERNEL): add it"
        )
    return recipes


def parse_recipe(data: Any, where: str, expected_arch: str, kernel: str | None = None) -> Recipe:
    """One kernel's recipe from a recipe file's JSON data (None: DEFAULT_KERNEL)."""
    recipes = parse_recipes(data, where, expected_arch)
    name = DEFAULT_KERNEL if kernel is None else kernel
    try:
        return recipes[name]
    except KeyError:
        raise ConfigError(
            f"{where}: no kernel {name!r}; this architecture has {', '.join(recipes)}"
        ) from None


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


def _read_recipe_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no image recipe {path}; restore it from the source tree") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc


def kernel_names(arch: str) -> tuple[str, ...]:
    """The kernels `arch`'s recipe names, in file order (validated)."""
    path = recipe_path(arch)
    return tuple(parse_recipes(_read_recipe_file(path), str(path), arch))


def load_recipe(
    arch: str, recipes_dir: Path | None = None, kernel: str | None = None
) -> tuple[Recipe, bytes]:
    """The recipe for `arch` with `kernel` (None: DEFAULT_KERNEL) and the /init script
    bytes, both validated."""
    path = recipe_path(arch, recipes_dir)
    init_path = path.parent / "init"
    recipe = parse_recipe(_read_recipe_file(path), str(path), arch, kernel)
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
