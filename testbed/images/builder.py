"""Build and cache guest images: Debian packages -> kernel + reproducible initramfs + keys.

No root, no loop mounts, no chroot: `apt-get download` into a private apt state,
`dpkg-deb -x` into a per-package cache, and the initramfs written in Python.

Cache layout under paths.cache_dir()/images/:
    key-seed                    32 random bytes (0600), the only source of the SSH keys
    apt/<arch>/                 private apt state (lists, sources.list)
    debs/<name>_<ver>_<arch>.deb  downloaded once, never fetched again
    unpacked/<deb stem>/        dpkg-deb -x of each .deb, made once
    <arch>-<content hash>/      one built image (see GuestImage), written to a temp dir and
                                renamed into place atomically, so parallel builds are safe

The content hash covers the builder version, the recipe, the /init, the exact package
versions and the public keys. `load_image` finds an image without the network: it matches
the recipe key (everything but the package versions, which need apt's lists) stored in each
image's manifest. `ensure_image(..., refresh=True)` updates apt's lists and rebuilds only if
a package version changed.
"""

from __future__ import annotations

import contextlib
import json
import lzma
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from testbed import paths
from testbed.errors import ConfigError, ProvisionError
from testbed.images import busybox, elf, extra, kernel, keys, kmod, pciids, stublib
from testbed.images.apt import AptState, PackageInfo, depends_names, extract_deb
from testbed.images.cpio import CpioEntry, compress_initrd, write_cpio
from testbed.images.recipe import Recipe, load_recipe, sha256_hex

BUILDER_VERSION = "4"
"""Bump when the builder's output changes for the same inputs (it is part of the hash)."""

FAILED_MARK = "TESTBED-GUEST-FAILED"
"""Prefix of the lines /init prints when a boot step fails (a console failure pattern)."""

HASH_LEN = 16
MODULES_DIR = "usr/lib/modules/testbed"  # /lib is a usrmerge link
MODULE_LIST = "etc/testbed/modules"
HOST_KEY_PATH = "etc/dropbear/dropbear_ed25519_host_key"
# usrmerge: Debian sid ships everything under usr/; the top-level names are links
USRMERGE = ("bin", "sbin", "lib", "lib64")

Log = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: everything a machine needs to boot it and SSH in."""

    arch: str
    kernel: Path  # x86_64: ELF vmlinux (PVH direct boot); aarch64: uncompressed Image
    initrd: Path  # newc cpio, gzip'ed or not (recipe's initrd_compression)
    client_key: Path  # OpenSSH ed25519 private key (0600) authorised for root
    host_public_key: Path  # the guest's host public key line, for pinning
    host_key_line: str  # "ssh-ed25519 AAAA..." (same as host_public_key's content)
    cmdline: str
    content_hash: str
    ready_line: str
    packages: dict[str, str]  # package name -> exact version in the image


def images_root() -> Path:
    return paths.cache_dir() / "images"


def _silent(_: str) -> None:
    pass


# ---- keys -------------------------------------------------------------------------------


def key_seed(root: Path) -> bytes:
    """The cache's secret seed, created once (0600) without racing a parallel build."""
    path = root / "key-seed"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".key-seed-", dir=root)  # mkstemp makes it 0600
    try:
        os.write(fd, os.urandom(32))
        os.close(fd)
        # link() fails if a parallel build created the seed first: then theirs is used
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path.read_bytes()


@dataclass(frozen=True)
class ImageKeys:
    client: keys.Ed25519Pair
    host: keys.Ed25519Pair

    @classmethod
    def from_master(cls, master: bytes) -> ImageKeys:
        return cls(
            client=keys.Ed25519Pair.from_seed(keys.derive_seed(master, "client")),
            host=keys.Ed25519Pair.from_seed(keys.derive_seed(master, "host")),
        )


def recipe_key(recipe: Recipe, init: bytes, image_keys: ImageKeys) -> str:
    """Hash of every input but the package versions (known without the network)."""
    return sha256_hex(
        BUILDER_VERSION,
        recipe.canonical(),
        init,
        image_keys.client.public_line(),
        image_keys.host.public_line(),
    )


def content_hash(rkey: str, versions: Mapping[str, str]) -> str:
    return sha256_hex(rkey, json.dumps(dict(sorted(versions.items()))))[:HASH_LEN]


# ---- the package tree -------------------------------------------------------------------


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


# ---- kernel and modules -----------------------------------------------------------------


@dataclass(frozen=True)
class KernelTree:
    version: str
    root: Path  # .../lib/modules/<version> (the one holding kernel/)
    vmlinuz: Path
    builtin: Path | None  # modules.builtin (Debian sid ships it in linux-base-*)


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


class _ModuleDepends(Mapping[str, list[str]]):
    """name -> depends, decompressing a module only when its depends are asked for."""

    def __init__(self, index: dict[str, Path]) -> None:
        self.index = index
        self.data: dict[str, bytes] = {}

    def module_bytes(self, name: str) -> bytes:
        if name not in self.data:
            raw = self.index[name].read_bytes()
            if raw.startswith(kernel.XZ_MAGIC):
                raw = lzma.decompress(raw)
            elif raw.startswith(kernel.ZSTD_MAGIC):
                raise ProvisionError(f"{self.index[name]}: zstd modules are not supported yet")
            where = str(self.index[name])
            self.data[name] = kmod.hide_btf(kmod.strip_signature(raw, where), where)
        return self.data[name]

    def __getitem__(self, name: str) -> list[str]:
        info = elf.modinfo(self.module_bytes(name), str(self.index[name]))
        return kmod.parse_depends(info.get("depends", ""))

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def module_entries(tree: KernelTree, wanted: tuple[str, ...]) -> tuple[list[CpioEntry], list[str]]:
    """The .ko files (decompressed: busybox insmod loads plain ELF) and their load order."""
    index: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(tree.root / "kernel"):
        for name in files:
            if ".ko" in name:
                index[kmod.module_name(name)] = Path(dirpath) / name
    builtin = kmod.parse_builtin(tree.builtin.read_text()) if tree.builtin else set()
    depends = _ModuleDepends(index)
    order = kmod.load_order(wanted, depends, builtin)
    entries = [
        CpioEntry.file(f"{MODULES_DIR}/{name}.ko", depends.module_bytes(name)) for name in order
    ]
    entries.append(CpioEntry.file(MODULE_LIST, "".join(f"{n}\n" for n in order).encode()))
    return entries, order


def optional_module_entries(
    tree: KernelTree, wanted: tuple[str, ...], at_boot: list[str]
) -> tuple[list[CpioEntry], dict[str, list[str]]]:
    """The optional modules under /extra (testbed.images.extra): each .ko once, and per
    wanted module the load order of what it needs beyond the boot modules. Under a fresh
    directory: an entry named lib would replace the image's lib -> usr/lib link."""
    index: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(tree.root / "kernel"):
        for name in files:
            if ".ko" in name:
                index[kmod.module_name(name)] = Path(dirpath) / name
    builtin = kmod.parse_builtin(tree.builtin.read_text()) if tree.builtin else set()
    depends = _ModuleDepends(index)
    orders: dict[str, list[str]] = {}
    carried: dict[str, bytes] = {}
    for name in wanted:
        order = [m for m in kmod.load_order([name], depends, builtin) if m not in at_boot]
        orders[kmod.module_name(name)] = order
        for m in order:
            carried.setdefault(m, depends.module_bytes(m))
    entries = [CpioEntry.directory(extra.EXTRA_DIR), CpioEntry.directory(extra.MODULES_DIR)]
    entries += [CpioEntry.file(extra.module_path(m), data) for m, data in sorted(carried.items())]
    entries += [
        CpioEntry.file(extra.order_path(name), "".join(f"{m}\n" for m in order).encode())
        for name, order in sorted(orders.items())
    ]
    return entries, orders


# ---- assembling -------------------------------------------------------------------------


def base_entries(recipe: Recipe, init: bytes, image_keys: ImageKeys) -> list[CpioEntry]:
    """Everything that does not come from a package: /init, accounts, keys, skeleton."""
    d, f = CpioEntry.directory, CpioEntry.file
    entries = [
        f("init", init, 0o755),
        d("proc"),
        d("sys"),
        d("dev"),
        d("run"),
        d("tmp", 0o1777),
        d("var"),
        CpioEntry.symlink("var/run", "../run"),
        CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.char_device("dev/null", 1, 3, 0o666),
        # root login: 'x' defers to shadow, '*' there forbids passwords; keys only
        f("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        f("etc/shadow", b"root:*:1::::::\n", 0o600),
        f("etc/group", b"root:x:0:\ntty:x:5:\n"),
        f("etc/shells", b"/bin/sh\n"),
        f("etc/hostname", b"testbed\n"),
        d("root", 0o700),
        d("root/.ssh", 0o700),
        f(
            "root/.ssh/authorized_keys",
            (image_keys.client.public_line("testbed") + "\n").encode(),
            0o600,
        ),
        f(HOST_KEY_PATH, keys.dropbear_host_key(image_keys.host), 0o600),
    ]
    for name in USRMERGE:
        entries.append(CpioEntry.symlink(name, f"usr/{name}"))
    for link, target in recipe.symlinks:
        entries.append(CpioEntry.symlink(link, target))
    return entries


def resolve_packages(
    userland: AptState, kernel_apt: AptState, recipe: Recipe
) -> tuple[dict[str, PackageInfo], dict[str, PackageInfo]]:
    """Exact versions: (kernel packages, userland packages). The kernel metapackage is
    followed to the real kernel and modules packages in the kernel's own suite."""
    user = userland.show(list(recipe.packages))
    kern = dict(kernel_apt.show([recipe.kernel_package]))
    todo = [recipe.kernel_package]
    while todo:
        name = todo.pop()
        follow = [
            dep
            for dep in depends_names(kern[name].depends)
            if dep.startswith(recipe.kernel_follow) and dep not in kern
        ]
        if follow:
            kern.update(kernel_apt.show(follow))
            todo.extend(follow)
    clash = sorted(set(kern) & set(user))
    if clash:
        raise ConfigError(
            f"{', '.join(clash)} would come from both the kernel's suite and the userland's; "
            "take it out of the recipe's 'packages' or of 'kernel.follow'"
        )
    return kern, user


def unpack(debs: list[Path], root: Path) -> list[Path]:
    """Each .deb unpacked once into root/<deb stem>/ (atomically); the dirs in order."""
    out = []
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        dest = root / deb.name.removesuffix(".deb")
        if not dest.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
            try:
                extract_deb(deb, tmp)
                try:
                    os.replace(tmp, dest)
                except OSError:
                    if not dest.is_dir():  # only a parallel unpack's result may win
                        raise
            finally:
                paths.remove_tree(tmp)
        out.append(dest)
    return out


def _image_from_dir(directory: Path, manifest: dict[str, object]) -> GuestImage:
    files = manifest["files"]
    assert isinstance(files, dict)
    packages = manifest["packages"]
    assert isinstance(packages, dict)
    return GuestImage(
        arch=str(manifest["arch"]),
        kernel=directory / str(files["kernel"]),
        initrd=directory / str(files["initrd"]),
        client_key=directory / str(files["client_key"]),
        host_public_key=directory / str(files["host_public_key"]),
        host_key_line=str(manifest["host_key_line"]),
        cmdline=str(manifest["cmdline"]),
        content_hash=str(manifest["content_hash"]),
        ready_line=str(manifest["ready_line"]),
        packages={str(k): str(v) for k, v in packages.items()},
    )


def _read_manifest(directory: Path) -> dict[str, object] | None:
    try:
        data = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _complete(image: GuestImage) -> bool:
    return all(
        p.is_file() for p in (image.kernel, image.initrd, image.client_key, image.host_public_key)
    )


def load_image(arch: str) -> GuestImage | None:
    """The newest cached image built from the current recipe, /init and keys, or None.

    No network and no build: for callers that must not wait (well under a second).
    """
    recipe, init = load_recipe(arch)
    root = images_root()
    seed_path = root / "key-seed"
    if not seed_path.is_file():
        return None
    rkey = recipe_key(recipe, init, ImageKeys.from_master(seed_path.read_bytes()))
    candidates = []
    for directory in root.glob(f"{arch}-*"):
        manifest = _read_manifest(directory)
        if manifest and manifest.get("recipe_key") == rkey:
            image = _image_from_dir(directory, manifest)
            if _complete(image):
                candidates.append((directory.stat().st_mtime, directory.name, image))
    if not candidates:
        return None
    return max(candidates, key=lambda c: (c[0], c[1]))[2]


BUSYBOX = "usr/bin/busybox"


def add_busybox_links(contents: ImageContents) -> None:
    """The applet links /init used to make with `busybox --install -s` at every boot."""
    entry = contents.entries.get(BUSYBOX)
    if entry is None:
        raise ProvisionError(f"the image has no {BUSYBOX}: /init runs on it; add it to 'files'")
    for link in busybox.applet_links(busybox.applet_names(entry.data, BUSYBOX), contents.entries):
        contents.add(link)


PCI_IDS = "usr/share/misc/pci.ids"


def trim_pci_ids(contents: ImageContents, vendors: tuple[str, ...]) -> None:
    """The image's pci.ids cut down to ``vendors`` (testbed.images.pciids); all of it when
    the recipe names none or the image has no pci.ids."""
    entry = contents.entries.get(PCI_IDS)
    if entry is None or not vendors or not stat.S_ISREG(entry.mode):
        return  # (a link's data is its target, not the file)
    text = pciids.trim_pci_ids(entry.data.decode("utf-8", errors="replace"), vendors)
    contents.entries[PCI_IDS] = CpioEntry.file(PCI_IDS, text.encode(), entry.mode & 0o777)


def build_image(arch: str, log: Log | None = print, refresh: bool = False) -> GuestImage:
    """Resolve package versions, and build the image unless it is already cached."""
    say = log or _silent
    started = time.monotonic()
    recipe, init = load_recipe(arch)
    root = images_root()
    image_keys = ImageKeys.from_master(key_seed(root))
    rkey = recipe_key(recipe, init, image_keys)

    # one private apt state per suite: the kernel may come from another suite
    states = {
        suite: AptState(root / "apt" / arch / suite, arch, suite)
        for suite in dict.fromkeys((recipe.suite, recipe.kernel_suite))
    }
    for apt in states.values():
        if refresh or not apt.has_lists():
            say(f"{arch}: apt-get update ({apt.suite}, {apt.deb_arch}, {apt.mirror})")
            apt.update()
    kernel_infos, user_infos = resolve_packages(
        states[recipe.suite], states[recipe.kernel_suite], recipe
    )
    versions = {name: info.version for name, info in {**kernel_infos, **user_infos}.items()}
    chash = content_hash(rkey, versions)
    final = root / f"{arch}-{chash}"
    manifest = _read_manifest(final)
    if manifest is not None:
        image = _image_from_dir(final, manifest)
        if _complete(image):
            say(f"{arch}: image {chash} is up to date")
            os.utime(final)  # newest for load_image
            return image

    debs_dir = root / "debs"
    kernel_debs = states[recipe.kernel_suite].download(list(kernel_infos.values()), debs_dir, say)
    user_debs = states[recipe.suite].download(
        [user_infos[n] for n in recipe.packages], debs_dir, say
    )
    say(f"{arch}: unpacking {len(kernel_debs) + len(user_debs)} packages")
    kernel_dirs = unpack(kernel_debs, root / "unpacked")
    user_dirs = unpack(user_debs, root / "unpacked")

    ktree = find_kernel(kernel_dirs)
    say(f"{arch}: kernel {ktree.version}")
    contents = ImageContents(
        PackageTree(user_dirs), recipe.library_dirs, arch, dict(recipe.stub_libraries)
    )
    for entry in base_entries(recipe, init, image_keys):
        contents.add(entry)
    for rel in recipe.files:
        contents.add_from_tree(rel)
    contents.add_stubs()
    add_busybox_links(contents)
    trim_pci_ids(contents, recipe.pci_ids_vendors)
    mod_entries, order = module_entries(ktree, recipe.modules)
    for entry in mod_entries:
        contents.add(entry)
    say(f"{arch}: modules to load: {' '.join(order) or '(none: all built in)'}")
    optional: dict[str, list[str]] = {}
    if recipe.optional_modules:
        opt_entries, optional = optional_module_entries(ktree, recipe.optional_modules, order)
        for entry in opt_entries:
            contents.add(entry)
        say(f"{arch}: optional modules under /{extra.MODULES_DIR}: {optional}")
    initrd = compress_initrd(write_cpio(contents.entries.values()), recipe.initrd_compression)
    kernel_bytes = kernel.guest_kernel(arch, ktree.vmlinuz.read_bytes())
    kernel_name = "vmlinux" if arch == "x86_64" else "Image"

    host_line = image_keys.host.public_line()
    manifest = {
        "arch": arch,
        "content_hash": chash,
        "recipe_key": rkey,
        "builder_version": BUILDER_VERSION,
        "kernel_version": ktree.version,
        "kernel_suite": recipe.kernel_suite,
        "cmdline": recipe.cmdline,
        "ready_line": recipe.ready_line,
        "failed_mark": FAILED_MARK,
        "host_key_line": host_line,
        "modules": order,
        "optional_modules": optional,
        "packages": dict(sorted(versions.items())),
        "files": {
            "kernel": kernel_name,
            "initrd": "initrd.img",
            "client_key": "client_key",
            "host_public_key": "host_key.pub",
        },
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{arch}-", dir=root))
    try:
        (tmp / kernel_name).write_bytes(kernel_bytes)
        (tmp / "initrd.img").write_bytes(initrd)
        key_fd = os.open(tmp / "client_key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(key_fd, "wb") as fh:
            fh.write(keys.openssh_private_key(image_keys.client))
        (tmp / "client_key.pub").write_text(image_keys.client.public_line("testbed") + "\n")
        (tmp / "host_key.pub").write_text(host_line + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        try:
            os.replace(tmp, final)
        except OSError:
            if _read_manifest(final) is None:
                raise
            # a parallel build of the same inputs won; its bytes are identical
    finally:
        paths.remove_tree(tmp)
    image = _image_from_dir(final, manifest)
    say(
        f"{arch}: built {final.name} in {time.monotonic() - started:.1f} s "
        f"(initrd {len(initrd) / 1e6:.1f} MB, kernel {len(kernel_bytes) / 1e6:.1f} MB)"
    )
    return image


def ensure_image(arch: str, log: Log | None = print, refresh: bool = False) -> GuestImage:
    """The guest image for `arch`: the cached one if the inputs did not change, else built.

    refresh=True re-reads the Debian suite (apt-get update) and rebuilds when a package
    version changed; without it a cached image is returned without touching the network.
    """
    if not refresh:
        image = load_image(arch)
        if image is not None:
            return image
    try:
        return build_image(arch, log, refresh)
    except ConfigError:
        raise
    except OSError as exc:
        raise ProvisionError(
            f"building the {arch} guest image failed: {exc}; check free space and "
            f"permissions under {images_root()}"
        ) from exc


def image_summary(image: GuestImage) -> dict[str, object]:
    """A JSON-friendly view of an image (for `testbed images show --json`)."""
    data = asdict(image)
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
