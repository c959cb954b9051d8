"""Build and cache guest images: Debian packages -> kernel + reproducible initramfs + keys.

No root, no loop mounts, no chroot: `apt-get download` into a private apt state,
`dpkg-deb -x` into a per-package cache, and the initramfs written in Python.

Cache layout under paths.cache_dir()/images/:
    key-seed                    32 random bytes (0600), the only source of the SSH keys
    apt/<arch>/<suite>/         private apt state per suite (lists, sources.list)
    debs/<name>_<ver>_<arch>.deb  downloaded once, never fetched again
    unpacked/<deb stem>/        dpkg-deb -x of each .deb, made once
    <arch>-<kernel>-<content hash>/  one built image (see GuestImage) of one of the recipe's
                                kernels, written to a temp dir and renamed into place
                                atomically, so parallel builds are safe

Every function takes the kernel by its recipe name ("6.1", "6.12"; None: the recipe's
DEFAULT_KERNEL). The content hash covers the builder version, the recipe with that kernel's
overrides and its name, the /init, our own programs (daxio), the exact package
versions and the public keys. `load_image` finds an image without the network: it matches
the recipe key (everything but the package versions, which need apt's lists) stored in each
image's manifest. `ensure_image(..., refresh=True)` updates apt's lists and rebuilds only if
a package version changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed import paths
from testbed.errors import ConfigError, ProvisionError
from testbed.images import busybox, daxio, extra, keys, pciids
from testbed.images.apt import AptState, PackageInfo, depends_names, extract_deb
from testbed.images.contents import USRMERGE, ImageContents, PackageTree
from testbed.images.cpio import CpioEntry, compress_initrd, write_cpio
from testbed.images.kernel import guest_kernel
from testbed.images.ktree import (
    KernelTree,
    ModuleIndex,
    find_kernel,
    module_entries,
    optional_module_entries,
)
from testbed.images.recipe import DEFAULT_KERNEL, Recipe, load_recipe, sha256_hex

BUILDER_VERSION = "5"
"""Bump when the builder's output changes for the same inputs (it is part of the hash)."""

FAILED_MARK = "TESTBED-GUEST-FAILED"
"""Prefix of the lines /init prints when a boot step fails (a console failure pattern)."""

HASH_LEN = 16
HOST_KEY_PATH = "etc/dropbear/dropbear_ed25519_host_key"

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
    kernel_name: str = DEFAULT_KERNEL  # the recipe's name for the kernel: "6.1", "6.12"
    kernel_version: str = ""  # its Debian package version: "6.12.117-1"
    kernel_release: str = ""  # what `uname -r` prints in the guest: "6.12.117+deb13-amd64"


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
        daxio.program(recipe.arch),
        image_keys.client.public_line(),
        image_keys.host.public_line(),
    )


def content_hash(rkey: str, versions: Mapping[str, str]) -> str:
    return sha256_hex(rkey, json.dumps(dict(sorted(versions.items()))))[:HASH_LEN]


# ---- assembling -------------------------------------------------------------------------


def base_entries(recipe: Recipe, init: bytes, image_keys: ImageKeys) -> list[CpioEntry]:
    """Everything that does not come from a package: /init, accounts, keys, skeleton,
    our own programs (daxio)."""
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
        f(daxio.PATH, daxio.program(recipe.arch), 0o755),
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
        kernel_name=str(manifest.get("kernel_name", DEFAULT_KERNEL)),
        kernel_version=str(manifest.get("kernel_version", "")),
        kernel_release=str(manifest.get("kernel_release", "")),
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


def load_image(arch: str, kernel: str | None = None) -> GuestImage | None:
    """The newest cached image built from the current recipe with `kernel` (None: the
    default), /init and keys, or None.

    No network and no build: for callers that must not wait (well under a second).
    """
    recipe, init = load_recipe(arch, kernel=kernel)
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


def _assemble(
    recipe: Recipe,
    init: bytes,
    image_keys: ImageKeys,
    user_dirs: list[Path],
    ktree: KernelTree,
    say: Log,
) -> tuple[bytes, list[str], dict[str, list[str]]]:
    """The initramfs: (its bytes, the boot modules' order, each optional module's order)."""
    label = f"{recipe.arch} ({recipe.kernel_name})"
    contents = ImageContents(
        PackageTree(user_dirs), recipe.library_dirs, recipe.arch, dict(recipe.stub_libraries)
    )
    for entry in base_entries(recipe, init, image_keys):
        contents.add(entry)
    for rel in recipe.files:
        contents.add_from_tree(rel)
    contents.add_stubs()
    add_busybox_links(contents)
    trim_pci_ids(contents, recipe.pci_ids_vendors)
    index = ModuleIndex(ktree)
    mod_entries, order = module_entries(index, recipe.modules)
    for entry in mod_entries:
        contents.add(entry)
    say(f"{label}: modules to load: {' '.join(order) or '(none: all built in)'}")
    optional: dict[str, list[str]] = {}
    if recipe.optional_modules:
        opt_entries, optional = optional_module_entries(
            index, recipe.optional_modules, order, dict(recipe.load_with)
        )
        for entry in opt_entries:
            contents.add(entry)
        say(f"{label}: optional modules under /{extra.MODULES_DIR}: {optional}")
    for module, softdeps in sorted(index.unresolved_softdeps.items()):
        say(f"{label}: {module}'s softdep {', '.join(softdeps)} not found: left out")
    initrd = compress_initrd(write_cpio(contents.entries.values()), recipe.initrd_compression)
    return initrd, order, optional


def build_image(
    arch: str, log: Log | None = print, refresh: bool = False, kernel: str | None = None
) -> GuestImage:
    """Resolve package versions, and build the image unless it is already cached."""
    say = log or _silent
    started = time.monotonic()
    recipe, init = load_recipe(arch, kernel=kernel)
    label = f"{arch} ({recipe.kernel_name})"
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
            say(f"{label}: apt-get update ({apt.suite}, {apt.deb_arch}, {apt.mirror})")
            apt.update()
    kernel_infos, user_infos = resolve_packages(
        states[recipe.suite], states[recipe.kernel_suite], recipe
    )
    versions = {name: info.version for name, info in {**kernel_infos, **user_infos}.items()}
    chash = content_hash(rkey, versions)
    final = root / f"{arch}-{recipe.kernel_name}-{chash}"
    manifest = _read_manifest(final)
    if manifest is not None:
        image = _image_from_dir(final, manifest)
        if _complete(image):
            say(f"{label}: image {chash} is up to date")
            os.utime(final)  # newest for load_image
            return image

    debs_dir = root / "debs"
    kernel_debs = states[recipe.kernel_suite].download(list(kernel_infos.values()), debs_dir, say)
    user_debs = states[recipe.suite].download(
        [user_infos[n] for n in recipe.packages], debs_dir, say
    )
    say(f"{label}: unpacking {len(kernel_debs) + len(user_debs)} packages")
    kernel_dirs = unpack(kernel_debs, root / "unpacked")
    user_dirs = unpack(user_debs, root / "unpacked")

    ktree = find_kernel(kernel_dirs)
    say(f"{label}: kernel {ktree.version}")
    initrd, order, optional = _assemble(recipe, init, image_keys, user_dirs, ktree, say)
    kernel_bytes = guest_kernel(arch, ktree.vmlinuz.read_bytes())
    kernel_file = "vmlinux" if arch == "x86_64" else "Image"

    host_line = image_keys.host.public_line()
    manifest = {
        "arch": arch,
        "content_hash": chash,
        "recipe_key": rkey,
        "builder_version": BUILDER_VERSION,
        "kernel_name": recipe.kernel_name,
        # the metapackage's version is the kernel package's (Debian builds them together)
        "kernel_version": versions[recipe.kernel_package],
        "kernel_release": ktree.version,
        "kernel_suite": recipe.kernel_suite,
        "cmdline": recipe.cmdline,
        "ready_line": recipe.ready_line,
        "failed_mark": FAILED_MARK,
        "host_key_line": host_line,
        "modules": order,
        "optional_modules": optional,
        "packages": dict(sorted(versions.items())),
        "files": {
            "kernel": kernel_file,
            "initrd": "initrd.img",
            "client_key": "client_key",
            "host_public_key": "host_key.pub",
        },
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{arch}-", dir=root))
    try:
        (tmp / kernel_file).write_bytes(kernel_bytes)
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
        f"{label}: built {final.name} in {time.monotonic() - started:.1f} s "
        f"(initrd {len(initrd) / 1e6:.1f} MB, kernel {len(kernel_bytes) / 1e6:.1f} MB)"
    )
    return image


def ensure_image(
    arch: str, log: Log | None = print, refresh: bool = False, kernel: str | None = None
) -> GuestImage:
    """The guest image for `arch` with `kernel` (a name from the recipe's "kernels", e.g.
    "6.12"; None: DEFAULT_KERNEL): the cached one if the inputs did not change, else built.

    refresh=True re-reads the Debian suites (apt-get update) and rebuilds when a package
    version changed; without it a cached image is returned without touching the network.
    """
    if not refresh:
        image = load_image(arch, kernel)
        if image is not None:
            return image
    try:
        return build_image(arch, log, refresh, kernel)
    except ConfigError:
        raise
    except OSError as exc:
        raise ProvisionError(
            f"building the {arch} guest image ({kernel or DEFAULT_KERNEL}) failed: {exc}; "
            f"check free space and permissions under {images_root()}"
        ) from exc


def image_summary(image: GuestImage) -> dict[str, object]:
    """A JSON-friendly view of an image (for `testbed images show --json`)."""
    data = asdict(image)
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
