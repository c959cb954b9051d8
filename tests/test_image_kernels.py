"""The kernel choice in the image layer: the recipe's shared base and per-kernel overrides,
their validation, the kernel in the cache key, and the optional modules' load order (pure,
plus one check against the real Debian kernels when their packages are in the cache)."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from testbed import paths
from testbed.errors import ConfigError
from testbed.images import extra, keys, kmod, recipe
from testbed.images.builder import GuestImage, ImageKeys, _image_from_dir, recipe_key

ARCHES = ("x86_64", "aarch64")


def _data(arch: str = "x86_64") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((paths.RECIPES_DIR / f"{arch}.json").read_text())
    return data


def _parse(data: dict[str, Any], kernel: str | None = None) -> recipe.Recipe:
    return recipe.parse_recipe(data, "x.json", "x86_64", kernel)


# ---- the shipped recipes ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
def test_both_kernels_share_everything_but_the_kernel(arch: str) -> None:
    assert recipe.DEFAULT_KERNEL == "6.1"
    assert recipe.kernel_names(arch) == ("6.1", "6.12")
    old, _ = recipe.load_recipe(arch)  # None: the default
    new, _ = recipe.load_recipe(arch, kernel="6.12")
    assert (old.kernel_name, old.kernel_suite) == ("6.1", "bookworm")
    assert (new.kernel_name, new.kernel_suite) == ("6.12", "trixie")
    assert old.kernel_package == new.kernel_package
    # the userland, the module lists and the ready line are the shared base, once
    for field in ("suite", "packages", "files", "modules", "optional_modules", "load_with"):
        assert getattr(old, field) == getattr(new, field), field
    assert new.cmdline.startswith(old.cmdline)
    assert {"virtio_pmem", "ext4"} <= set(new.optional_modules)
    assert dict(new.load_with) == {"virtio_pmem": ("nd_pmem",)}


def test_the_kernel_is_in_the_cache_key() -> None:
    image_keys = ImageKeys.from_master(bytes(32))
    old, init = recipe.load_recipe("x86_64")
    new, _ = recipe.load_recipe("x86_64", kernel="6.12")
    assert recipe_key(old, init, image_keys) != recipe_key(new, init, image_keys)
    # the name alone counts: the same overrides under another name are another image
    data = _data()
    data["kernels"]["6.1-copy"] = copy.deepcopy(data["kernels"]["6.1"])
    twin = _parse(data, "6.1-copy")
    assert twin.kernel_suite == old.kernel_suite
    assert recipe_key(twin, init, image_keys) != recipe_key(old, init, image_keys)
    assert recipe_key(old, init, image_keys) == recipe_key(
        recipe.load_recipe("x86_64", kernel="6.1")[0], init, image_keys
    )


# ---- merging ------------------------------------------------------------------------------


def test_overrides_merge_into_the_base() -> None:
    data = _data()
    data["kernels"]["9.9"] = {
        "comment": "a comment is not part of the recipe",
        "kernel": {"suite": "sid", "package": "linux-image-cloud-amd64"},
        "modules": ["virtio_net"],
        "cmdline_append": "initcall_debug",
    }
    base = _parse(data)
    rec = _parse(data, "9.9")
    # 'kernel' merges key by key: 'follow' still comes from the base
    assert (rec.kernel_suite, rec.kernel_package) == ("sid", "linux-image-cloud-amd64")
    assert rec.kernel_follow == base.kernel_follow
    assert rec.modules == ("virtio_net",)  # lists replace
    assert rec.cmdline == f"{base.cmdline} initcall_debug"
    assert rec.optional_modules == base.optional_modules  # not overridden: shared
    data["kernels"]["9.9"] = {"cmdline": "console=ttyS0 quiet"}
    assert _parse(data, "9.9").cmdline == "console=ttyS0 quiet"


# ---- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("kernels"), "'kernels' must name at least one kernel"),
        (lambda d: d.update(kernels={}), "'kernels' must name at least one kernel"),
        (
            lambda d: d["kernels"].update({"latest": {}}),
            r"kernels\.latest: a kernel's name is its version line",
        ),
        (
            lambda d: d["kernels"].update({"all": {}}),
            r"kernels\.all: a kernel's name is its version line",
        ),
        (
            lambda d: d["kernels"]["6.12"].update(packages=["busybox-static"]),
            r"kernels\.6\.12: a kernel cannot override packages .*set at the top level",
        ),
        (
            lambda d: d["kernels"]["6.12"].update(cmdline="console=ttyS0", cmdline_append="x"),
            "give 'cmdline' .* or 'cmdline_append' .*, not both",
        ),
        (lambda d: d["kernels"].update({"6.12": "trixie"}), "must be an object of overrides"),
        (
            lambda d: d["kernels"]["6.12"].update(kernel="trixie"),
            r"'kernel' must be an object, e.g. \{\"suite\": \"trixie\"\}",
        ),
        (
            lambda d: d["kernels"].pop("6.1"),
            "'kernels' has 6.12 but not '6.1', the default kernel",
        ),
        (
            lambda d: d.update(load_with={"virtio_net": ["failover"]}),
            "'load_with' names virtio_net, which 'optional_modules' does not list",
        ),
        (
            lambda d: d["kernels"]["6.12"].update(cmdline_append=""),
            r"kernels\.6\.12: 'cmdline_append' must be a non-empty string",
        ),
        (
            lambda d: d["kernels"]["6.12"].update(optional_modules="ext4"),
            r"kernels\.6\.12: 'optional_modules' must be a list",
        ),
    ],
)
def test_recipe_errors_say_where_and_what_to_do(change: Any, message: str) -> None:
    data = _data()
    change(data)
    with pytest.raises(ConfigError, match=message):
        recipe.parse_recipes(data, "x.json", "x86_64")


def test_an_unknown_kernel_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no kernel '6\.13'; this architecture has 6\.1, 6\.12"):
        recipe.load_recipe("aarch64", kernel="6.13")
    # an error in one kernel's entry is an error of the file, whichever kernel is asked for
    data = _data()
    data["kernels"]["6.12"]["modules"] = "virtio_net"
    (tmp_path / "x86_64.json").write_text(json.dumps(data))
    (tmp_path / "init").write_bytes((paths.RECIPES_DIR / "init").read_bytes())
    with pytest.raises(ConfigError, match=r"kernels\.6\.12: 'modules' must be a list"):
        recipe.load_recipe("x86_64", tmp_path, kernel="6.1")


def test_images_cli_kernel_choice() -> None:
    from testbed.commands import images as command

    assert command._kernels("x86_64", "all") == ("6.1", "6.12")
    assert command._kernels("aarch64", "6.12") == ("6.12",)
    with pytest.raises(ConfigError, match=r"no kernel '5\.10' for x86_64: use one of 6\.1, 6\.12"):
        command._kernels("x86_64", "5.10")
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["images", "build"])
    assert (args.arch, args.kernel) == ("all", "all")  # make setup builds every kernel
    assert parser.parse_args(["images", "show"]).kernel == recipe.DEFAULT_KERNEL


# ---- the image records its kernel ---------------------------------------------------------


def test_guest_image_records_its_kernel(tmp_path: Path) -> None:
    manifest: dict[str, object] = {
        "arch": "aarch64",
        "host_key_line": keys.Ed25519Pair.from_seed(bytes(32)).public_line(),
        "cmdline": "console=ttyAMA0",
        "content_hash": "0123456789abcdef",
        "ready_line": "TESTBED-GUEST-READY",
        "packages": {"linux-image-arm64": "6.12.117-1"},
        "kernel_name": "6.12",
        "kernel_version": "6.12.117-1",
        "kernel_release": "6.12.117+deb13-arm64",
        "files": {
            "kernel": "Image",
            "initrd": "initrd.img",
            "client_key": "client_key",
            "host_public_key": "host_key.pub",
        },
    }
    image = _image_from_dir(tmp_path, manifest)
    assert isinstance(image, GuestImage)
    assert (image.kernel_name, image.kernel_version, image.kernel_release) == (
        "6.12",
        "6.12.117-1",
        "6.12.117+deb13-arm64",
    )
    assert image.kernel == tmp_path / "Image"


# ---- optional modules: softdeps and load order (pure) -------------------------------------


def test_softdep_parsing() -> None:
    assert kmod.parse_softdep_pre("pre: crypto-crc32c") == ["crypto-crc32c"]
    assert kmod.parse_softdep_pre("pre: a b post: c") == ["a", "b"]
    assert kmod.parse_softdep_pre("post: c") == []
    assert kmod.parse_softdep_pre("") == []
    assert kmod.softdep_candidates("crypto-crc32c") == ["crypto_crc32c", "crc32c", "crc32c_generic"]
    builtin = b"dax.file=drivers/dax/dax\0crc32c_generic.alias=crypto-crc32c\0fuse.alias=fs-fuse\0"
    assert kmod.parse_builtin_aliases(builtin) == {
        "dax",
        "crc32c_generic",
        "crypto-crc32c",
        "fuse",
        "fs-fuse",
    }


def test_optional_load_order_companions_first_module_last() -> None:
    # 6.12 amd64's modinfo (depends= and the resolved softdep pre: crypto-crc32c)
    depends = {
        "virtio_pmem": ["nd_virtio", "libnvdimm"],
        "nd_virtio": [],
        "libnvdimm": [],
        "nd_pmem": ["libnvdimm", "nd_btt"],
        "nd_btt": ["libnvdimm"],
        "ext4": ["jbd2", "crc16", "mbcache", "crc32c_generic"],
        "jbd2": ["crc32c_generic"],
        "crc16": [],
        "mbcache": [],
        "crc32c_generic": [],
    }
    assert kmod.load_order(["nd_pmem", "virtio_pmem"], depends, ["dax"]) == [
        "libnvdimm",
        "nd_btt",
        "nd_pmem",
        "nd_virtio",
        "virtio_pmem",
    ]
    assert kmod.load_order(["ext4"], depends) == [
        "crc32c_generic",
        "jbd2",
        "crc16",
        "mbcache",
        "ext4",
    ]
    # a built-in module loads nothing (6.12's virtiofs), which load_command accepts
    assert kmod.load_order(["virtiofs"], depends, ["virtiofs", "fuse"]) == []


def test_load_command_loads_the_gzipped_files() -> None:
    command = extra.load_command(["virtio_pmem", "ext4"])
    assert extra.module_path("ext4") == "extra/modules/ext4.ko.gz"
    assert command.index("virtio_pmem.order") < command.index("ext4.order")
    assert "insmod /extra/modules/$m.ko.gz" in command


# ---- against the real packages (needs them unpacked in the cache; no network) -------------


def _kernel_tree(arch: str, kernel: str) -> Any:
    from testbed.images.ktree import find_kernel

    unpacked = paths.cache_dir() / "images" / "unpacked"
    deb_arch = {"x86_64": "amd64", "aarch64": "arm64"}[arch]
    release = {"6.1": "6.1.0-*", "6.12": "6.12.*+deb13"}[kernel]
    dirs = sorted(unpacked.glob(f"linux-image-{release}-{deb_arch}_*_{deb_arch}"))
    if not dirs:
        pytest.skip(f"no unpacked {arch} {kernel} kernel: run `testbed images build --kernel all`")
    return find_kernel([dirs[-1]])


EXPECTED = {
    # (arch, kernel): virtio_pmem's order, ext4's order, virtiofs's order
    ("x86_64", "6.1"): (
        ["libnvdimm", "nd_btt", "nd_pmem", "nd_virtio", "virtio_pmem"],
        ["crc32c_generic", "jbd2", "mbcache", "crc16", "ext4"],
        ["fuse", "virtiofs"],
    ),
    ("x86_64", "6.12"): (
        ["libnvdimm", "nd_btt", "nd_pmem", "nd_virtio", "virtio_pmem"],
        ["crc32c_generic", "jbd2", "crc16", "mbcache", "ext4"],
        [],
    ),
    ("aarch64", "6.1"): (
        # no FS_DAX on 6.1 arm64: dax is a module there, nd_pmem needs it
        ["libnvdimm", "dax", "nd_btt", "nd_pmem", "nd_virtio", "virtio_pmem"],
        ["crc32c_generic", "jbd2", "mbcache", "crc16", "ext4"],
        ["fuse", "virtiofs"],
    ),
    ("aarch64", "6.12"): (
        ["libnvdimm", "nd_btt", "nd_pmem", "nd_virtio", "virtio_pmem"],
        ["crc32c_generic", "jbd2", "mbcache", "crc16", "ext4"],
        [],
    ),
}


@pytest.mark.parametrize(("arch", "kernel"), sorted(EXPECTED))
def test_optional_orders_from_the_real_modinfo(arch: str, kernel: str) -> None:
    from testbed.images.cpio import CpioEntry
    from testbed.images.ktree import ModuleIndex, module_entries, optional_module_entries

    rec, _ = recipe.load_recipe(arch, kernel=kernel)
    index = ModuleIndex(_kernel_tree(arch, kernel))
    _, at_boot = module_entries(index, rec.modules)
    entries, orders = optional_module_entries(
        index, ("virtio_pmem", "ext4", "virtiofs"), at_boot, dict(rec.load_with)
    )
    assert (orders["virtio_pmem"], orders["ext4"], orders["virtiofs"]) == EXPECTED[arch, kernel]
    assert not index.unresolved_softdeps
    files: dict[str, CpioEntry] = {e.path: e for e in entries}
    assert files["extra/modules/ext4.ko.gz"].data[:2] == b"\x1f\x8b"
    assert (
        files["extra/modules/virtiofs.order"].data
        == "".join(f"{m}\n" for m in EXPECTED[arch, kernel][2]).encode()
    )
