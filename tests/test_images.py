"""Fast tests of the image builder's pure parts, plus a rebuild-determinism check."""

from __future__ import annotations

import ctypes
import gzip
import json
import lzma
import os
import platform
import shutil
import stat
import struct
from pathlib import Path

import paramiko
import pytest

from testbed import paths
from testbed.errors import ConfigError, HostCapabilityError, ProvisionError
from testbed.images import apt, cpio, elf, kernel, keys, kmod, recipe, stublib

# ---- cpio ---------------------------------------------------------------------------------


def _sample() -> list[cpio.CpioEntry]:
    return [
        cpio.CpioEntry.file("usr/bin/tool", b"\x7fELF...", 0o755),
        cpio.CpioEntry.symlink("bin", "usr/bin"),
        cpio.CpioEntry.file("init", b"#!/bin/sh\n", 0o755),
        cpio.CpioEntry.char_device("dev/console", 5, 1),
        cpio.CpioEntry.file("etc/shadow", b"root:*:1::::::\n", 0o600),
    ]


def test_cpio_newc_layout() -> None:
    data = cpio.write_cpio(_sample())
    assert data.startswith(b"070701")
    # header fields of the first record: uid, gid, mtime are 0
    fields = [int(data[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
    assert fields[2] == 0 and fields[3] == 0 and fields[5] == 0
    entries = cpio.read_cpio(data)
    names = [e.path for e in entries]
    # parents added and listed before their children, sorted
    assert names == [
        "bin",
        "dev",
        "dev/console",
        "etc",
        "etc/shadow",
        "init",
        "usr",
        "usr/bin",
        "usr/bin/tool",
    ]
    by = {e.path: e for e in entries}
    assert stat.S_ISDIR(by["usr"].mode) and stat.S_IMODE(by["usr"].mode) == 0o755
    assert by["usr/bin/tool"].data == b"\x7fELF..."
    assert stat.S_IMODE(by["etc/shadow"].mode) == 0o600
    assert stat.S_ISLNK(by["bin"].mode) and by["bin"].data == b"usr/bin"
    assert stat.S_ISCHR(by["dev/console"].mode) and by["dev/console"].data == b"5:1"
    assert data.endswith(b"TRAILER!!!\0" + b"\0" * (-(110 + 11) % 4))
    assert len(data) % 4 == 0


def test_cpio_is_deterministic_and_order_independent() -> None:
    a = cpio.gzip_reproducible(cpio.write_cpio(_sample()))
    b = cpio.gzip_reproducible(cpio.write_cpio(list(reversed(_sample()))))
    assert a == b
    assert a[4:8] == b"\0\0\0\0"  # gzip mtime 0
    assert cpio.read_cpio(gzip.decompress(a))[0].path == "bin"


def test_initrd_compression_choices() -> None:
    raw = cpio.write_cpio(_sample())
    assert cpio.compress_initrd(raw, "none") == raw
    assert cpio.compress_initrd(raw, "gzip") == cpio.gzip_reproducible(raw)
    for compression in ("none", "gzip"):
        assert cpio.read_initrd(cpio.compress_initrd(raw, compression)) == cpio.read_cpio(raw)
    with pytest.raises(ProvisionError, match="initrd compression 'zstd'"):
        cpio.compress_initrd(raw, "zstd")


def test_cpio_rejects_duplicates_and_bad_paths() -> None:
    with pytest.raises(ProvisionError, match="added twice"):
        cpio.write_cpio([cpio.CpioEntry.file("a", b"1"), cpio.CpioEntry.file("/a", b"2")])
    with pytest.raises(ProvisionError, match="bad path"):
        cpio.write_cpio([cpio.CpioEntry.file("../etc/passwd", b"")])
    with pytest.raises(ProvisionError, match="both a file and a directory"):
        cpio.write_cpio(
            [cpio.CpioEntry.symlink("lib", "usr/lib"), cpio.CpioEntry.file("lib/x", b"")]
        )


# ---- kernel modules ------------------------------------------------------------------------


def test_module_order_from_depends() -> None:
    depends = {
        "virtio_net": ["net_failover"],
        "net_failover": ["failover"],
        "failover": [],
        "virtio_blk": ["virtio", "virtio_ring"],
        "virtio_rng": ["rng_core"],
    }
    order = kmod.load_order(
        ["virtio-net", "virtio_blk", "virtio_rng", "virtio_pci"],
        depends,
        builtin=["virtio", "virtio_ring", "virtio_pci", "rng-core"],
    )
    assert order == ["failover", "net_failover", "virtio_net", "virtio_blk", "virtio_rng"]


def test_module_errors_name_the_culprit() -> None:
    with pytest.raises(ProvisionError, match=r"'ghost' \(needed by virtio_net\)"):
        kmod.load_order(["virtio_net"], {"virtio_net": ["ghost"]})
    with pytest.raises(ProvisionError, match="cycle: a -> b -> a"):
        kmod.load_order(["a"], {"a": ["b"], "b": ["a"]})


def test_module_names_and_builtin_list() -> None:
    assert kmod.module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert kmod.parse_depends("") == []
    assert kmod.parse_depends("net_failover,virtio-ring") == ["net_failover", "virtio_ring"]
    assert kmod.parse_builtin("kernel/drivers/virtio/virtio.ko\n\n") == {"virtio"}


def _elf_with_section(name: str, content: bytes) -> bytes:
    """A minimal little-endian ELF64 with one named section (plus null and shstrtab)."""
    shstr = b"\0" + name.encode() + b"\0.shstrtab\0"
    body_off = 64
    shstr_off = body_off + len(content)
    sh_off = shstr_off + len(shstr)
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 0x28, sh_off)
    struct.pack_into("<HHH", head, 0x3A, 64, 3, 2)

    def sh(name_off: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, off, size, 0, 0, 1, 0)

    sections = sh(0, 0, 0) + sh(1, body_off, len(content))
    sections += sh(2 + len(name), shstr_off, len(shstr))
    return bytes(head) + content + shstr + sections


def test_modinfo_from_elf() -> None:
    data = _elf_with_section(".modinfo", b"license=GPL\0depends=net_failover\0name=virtio_net\0")
    info = elf.modinfo(data)
    assert info["depends"] == "net_failover" and info["name"] == "virtio_net"
    with pytest.raises(ProvisionError, match=r"no \.modinfo"):
        elf.modinfo(_elf_with_section(".text", b"\x90"))
    with pytest.raises(ProvisionError, match="not an ELF"):
        elf.modinfo(b"MZ" + bytes(100))


def test_needed_libraries_of_a_real_binary() -> None:
    binary = Path(shutil.which("ls") or "/bin/ls").resolve().read_bytes()
    if binary[4] != 2:
        pytest.skip("host ls is not a 64-bit ELF")
    assert "libc.so.6" in elf.needed_libraries(binary, "ls")
    assert (elf.interpreter(binary) or "").startswith("/lib")


def test_imported_symbols_of_a_real_binary() -> None:
    binary = Path(shutil.which("ls") or "/bin/ls").resolve().read_bytes()
    if binary[4] != 2:
        pytest.skip("host ls is not a 64-bit ELF")
    imports = elf.imported_symbols(binary, "libc.so.6", "ls")
    assert any(v.startswith("GLIBC_2.") for v in imports)
    assert any("malloc" in names for names in imports.values())
    with pytest.raises(ProvisionError, match=r"no versioned symbols of libnothere\.so\.1"):
        elf.imported_symbols(binary, "libnothere.so.1", "ls")


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_stub_library_layout(arch: str) -> None:
    lib = stublib.stub_library(arch, "libdemo.so.3", {"DEMO_1": ["demo_new", "demo_free"]})
    assert lib[:4] == b"\x7fELF" and lib[16] == 3  # ET_DYN
    assert struct.unpack_from("<H", lib, 18)[0] == {"x86_64": 62, "aarch64": 183}[arch]
    assert elf.needed_libraries(lib) == []  # has a dynamic section, needs nothing
    assert b"demo_new\0" in lib and b"DEMO_1\0" in lib and b"libdemo.so.3\0" in lib
    assert lib == stublib.stub_library(arch, "libdemo.so.3", {"DEMO_1": ["demo_free", "demo_new"]})
    with pytest.raises(ProvisionError, match="demo_old not imported"):
        stublib.stub_library(arch, "libdemo.so.3", {"DEMO_1": ["demo_new"]}, ["demo_old"])


@pytest.mark.skipif(platform.machine() != "x86_64", reason="loads an x86_64 stub in-process")
def test_stub_library_loads_and_answers(tmp_path: Path) -> None:
    # the host's own ld.so loads it: symbols, versions and hash table are what glibc wants
    path = tmp_path / "libdemo.so.3"
    path.write_bytes(
        stublib.stub_library(
            "x86_64", "libdemo.so.3", {"DEMO_1": ["demo_new", "demo_load"]}, ["demo_new"]
        )
    )
    lib = ctypes.CDLL(str(path))
    lib.demo_new.restype = ctypes.c_void_p
    lib.demo_load.restype = ctypes.c_int
    assert lib.demo_new() not in (None, 0)
    assert lib.demo_load() == 0


# ---- kernels --------------------------------------------------------------------------------


def _bzimage(payload: bytes) -> bytes:
    setup_sects = 1
    data = bytearray((setup_sects + 1) * 512)
    data[0x1F1] = setup_sects
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x20F)
    struct.pack_into("<II", data, 0x248, 16, len(payload))
    return bytes(data) + bytes(16) + payload + b"tail"


def test_x86_vmlinux_from_xz_bzimage() -> None:
    vmlinux = b"\x7fELF" + bytes(4000)
    payload = lzma.compress(vmlinux, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    payload += struct.pack("<I", len(vmlinux))  # the kernel build appends the size
    assert kernel.x86_vmlinux(_bzimage(payload)) == vmlinux
    bad = lzma.compress(vmlinux, format=lzma.FORMAT_XZ) + struct.pack("<I", 5)
    with pytest.raises(ProvisionError, match="image says 5"):
        kernel.x86_vmlinux(_bzimage(bad))
    with pytest.raises(ProvisionError, match="not an x86 bzImage"):
        kernel.x86_vmlinux(bytes(1024))


def test_arm64_image_from_gzip() -> None:
    image = bytearray(4096)
    image[0x38:0x3C] = kernel.ARM64_IMAGE_MAGIC
    assert kernel.arm64_image(gzip.compress(bytes(image))) == bytes(image)
    with pytest.raises(ProvisionError, match="not an arm64"):
        kernel.arm64_image(gzip.compress(bytes(100)))


# ---- keys -----------------------------------------------------------------------------------


def test_keys_are_derived_deterministically() -> None:
    master = bytes(range(32))
    a = keys.Ed25519Pair.from_seed(keys.derive_seed(master, "client"))
    b = keys.Ed25519Pair.from_seed(keys.derive_seed(master, "client"))
    host = keys.Ed25519Pair.from_seed(keys.derive_seed(master, "host"))
    assert a == b and a != host
    assert keys.openssh_private_key(a) == keys.openssh_private_key(b)


def test_openssh_private_key_loads_in_paramiko(tmp_path: Path) -> None:
    pair = keys.Ed25519Pair.from_seed(bytes(range(1, 33)))
    path = tmp_path / "key"
    path.write_bytes(keys.openssh_private_key(pair))
    loaded = paramiko.Ed25519Key.from_private_key_file(str(path))
    assert f"{loaded.get_name()} {loaded.get_base64()}" == pair.public_line()
    # and it signs with the right key: the public half verifies the signature
    sig = loaded.sign_ssh_data(b"challenge")
    sig.rewind()
    assert paramiko.Ed25519Key(data=pair.public_blob()).verify_ssh_sig(b"challenge", sig)


def test_dropbear_host_key_encoding() -> None:
    pair = keys.Ed25519Pair.from_seed(bytes(32))
    blob = keys.dropbear_host_key(pair)
    assert blob[:4] == struct.pack(">I", 11) and blob[4:15] == b"ssh-ed25519"
    assert blob[15:19] == struct.pack(">I", 64) and blob[19:] == pair.seed + pair.public
    assert keys.parse_dropbear_host_key(blob) == pair
    with pytest.raises(ProvisionError, match="does not match"):
        keys.parse_dropbear_host_key(blob[:-1] + bytes([blob[-1] ^ 1]))
    assert pair.public_line().startswith("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5")


# ---- recipes --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_shipped_recipes_are_valid(arch: str) -> None:
    rec, init = recipe.load_recipe(arch)
    assert rec.arch == arch and "quiet" in rec.cmdline and "console=" in rec.cmdline
    assert rec.ready_line.encode() in init
    assert "busybox-static" in rec.packages and "dropbear-bin" in rec.packages


def _recipe_data() -> dict[str, object]:
    data: dict[str, object] = json.loads((paths.RECIPES_DIR / "x86_64.json").read_text())
    return data


def test_recipe_errors_name_the_field() -> None:
    data = _recipe_data()
    data["packages"] = "busybox"
    with pytest.raises(ConfigError, match="'packages' must be a list"):
        recipe.parse_recipe(data, "x.json", "x86_64")
    data = _recipe_data()
    with pytest.raises(ConfigError, match="'arch' is 'x86_64' but the file is for 'aarch64'"):
        recipe.parse_recipe(data, "x.json", "aarch64")
    data = _recipe_data()
    data["colour"] = "blue"
    with pytest.raises(ConfigError, match="unknown keys colour"):
        recipe.parse_recipe(data, "x.json", "x86_64")
    data = _recipe_data()
    data["ready_line"] = "ok"
    with pytest.raises(ConfigError, match="ready_line"):
        recipe.parse_recipe(data, "x.json", "x86_64")
    data = _recipe_data()
    data["files"] = ["/etc/passwd"]
    with pytest.raises(ConfigError, match="relative path"):
        recipe.parse_recipe(data, "x.json", "x86_64")
    data = _recipe_data()
    data["cmdline"] = "quiet"
    with pytest.raises(ConfigError, match="console="):
        recipe.parse_recipe(data, "x.json", "x86_64")


def test_recipe_initrd_compression() -> None:
    data = _recipe_data()
    # the shipped recipe boots an uncompressed initrd (no inflate under TCG)
    assert recipe.parse_recipe(data, "x.json", "x86_64").initrd_compression == "none"
    del data["initrd_compression"]
    assert recipe.parse_recipe(data, "x.json", "x86_64").initrd_compression == "gzip"
    data["initrd_compression"] = "lz4"
    with pytest.raises(ConfigError, match="'initrd_compression' is 'lz4'; use one of gzip, none"):
        recipe.parse_recipe(data, "x.json", "x86_64")


def test_recipe_pci_ids_vendors() -> None:
    data = _recipe_data()
    assert "8086" in recipe.parse_recipe(data, "x.json", "x86_64").pci_ids_vendors
    del data["pci_ids_vendors"]
    assert recipe.parse_recipe(data, "x.json", "x86_64").pci_ids_vendors == ()  # all of it
    data["pci_ids_vendors"] = ["1af4", "Intel"]
    with pytest.raises(ConfigError, match=r"\['Intel'\] are not vendor ids"):
        recipe.parse_recipe(data, "x.json", "x86_64")


def test_recipe_kernel_suite() -> None:
    data = _recipe_data()
    kernels = data["kernels"]
    assert isinstance(kernels, dict)
    # the shipped recipes take the kernel from an older, faster-booting suite
    default = kernels[recipe.DEFAULT_KERNEL]
    rec = recipe.parse_recipe(data, "x.json", "x86_64")
    assert rec.kernel_suite == default["kernel"]["suite"] and rec.suite == "sid"
    del default["kernel"]
    rec = recipe.parse_recipe(data, "x.json", "x86_64")
    assert rec.kernel_suite == rec.suite  # defaults to the userland's suite
    default["kernel"] = {"suite": ""}
    with pytest.raises(ConfigError, match="'suite' must be a non-empty string"):
        recipe.parse_recipe(data, "x.json", "x86_64")
    default["kernel"] = {"suite": "trixie", "flavour": "cloud"}
    with pytest.raises(ConfigError, match="unknown keys flavour in 'kernel'"):
        recipe.parse_recipe(data, "x.json", "x86_64")


def test_recipe_files_on_disk(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no image recipe"):
        recipe.load_recipe("x86_64", tmp_path)
    (tmp_path / "x86_64.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        recipe.load_recipe("x86_64", tmp_path)
    (tmp_path / "x86_64.json").write_text(json.dumps(_recipe_data()))
    (tmp_path / "init").write_text("#!/bin/sh\necho hello\n")
    with pytest.raises(ConfigError, match="never prints the ready line"):
        recipe.load_recipe("x86_64", tmp_path)
    with pytest.raises(ConfigError, match="unknown architecture"):
        recipe.load_recipe("riscv64", tmp_path)


# ---- apt sources ----------------------------------------------------------------------------


def test_host_mirror_from_sources() -> None:
    deb822 = (
        "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb-src\nURIs: http://src.invalid/debian\n"
    )
    uris = apt.parse_deb822_sources(deb822)
    assert uris == ["http://mirror.invalid/debian", "http://mirror.invalid/debian-security"]
    one_line = (
        "# deb http://x.invalid/debian sid main\n"
        "deb [arch=amd64] http://y.invalid/debian/ bookworm main\n"
    )
    assert apt.pick_debian_mirror(apt.parse_one_line_sources(one_line)) == "http://y.invalid/debian"
    with pytest.raises(HostCapabilityError, match="no Debian archive"):
        apt.pick_debian_mirror(["http://z.invalid/ubuntu"])


def test_parse_apt_cache_show() -> None:
    text = (
        "Package: linux-image-amd64\nVersion: 7.2.13-1\nArchitecture: amd64\n"
        "Depends: linux-base-amd64 (= 7.2.13-1),\n linux-image-7.2.13+deb14-amd64 (= 7.2.13-1)\n\n"
        "Package: busybox-static\nVersion: 1:1.38.0-3+b1\nArchitecture: amd64\n"
    )
    infos = apt.parse_show(text)
    assert infos["busybox-static"].deb_name == "busybox-static_1%3a1.38.0-3+b1_amd64.deb"
    assert apt.depends_names(infos["linux-image-amd64"].depends) == [
        "linux-base-amd64",
        "linux-image-7.2.13+deb14-amd64",
    ]


# ---- rebuild determinism (needs the .debs in the default cache; no network) ----------------


def test_rebuild_from_cached_debs_is_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = paths.cache_dir() / "images"
    arch = "x86_64"
    if not (source / "apt" / arch).is_dir() or not (source / "debs").is_dir():
        pytest.skip("no cached x86_64 packages: run `testbed images build --arch x86_64` once")
    cache = tmp_path / "cache"
    images = cache / "images"
    images.mkdir(parents=True)
    # reuse the downloads read-only (links), copy apt's mutable state
    os.symlink(source / "debs", images / "debs")
    os.symlink(source / "unpacked", images / "unpacked")
    shutil.copytree(source / "apt" / arch, images / "apt" / arch, symlinks=True)
    (images / "key-seed").write_bytes(bytes(range(32)))
    monkeypatch.setenv("TESTBED_CACHE", str(cache))

    from testbed.images import build_image, load_image

    first = build_image(arch, log=None)
    initrd = first.initrd.read_bytes()
    assert load_image(arch) == first
    shutil.rmtree(first.initrd.parent)
    second = build_image(arch, log=None)
    assert second.content_hash == first.content_hash
    assert second.initrd.read_bytes() == initrd
    assert second.kernel.read_bytes()[:4] == b"\x7fELF"
    assert stat.S_IMODE(second.client_key.stat().st_mode) == 0o600
    entries = {e.path: e for e in cpio.read_initrd(initrd)}
    assert entries["root/.ssh/authorized_keys"].data.decode().startswith("ssh-ed25519 ")
    assert stat.S_IMODE(entries["root"].mode) == 0o700
    assert (
        keys.parse_dropbear_host_key(
            entries["etc/dropbear/dropbear_ed25519_host_key"].data
        ).public_line()
        == second.host_key_line
    )
    # lspci's libkmod is the generated stub, so libcrypto (its dependency) stays out
    libdir = "usr/lib/x86_64-linux-gnu"
    stub = entries[f"{libdir}/libkmod.so.2"].data
    assert len(stub) < 4096 and b"LIBKMOD_5\0" in stub
    assert f"{libdir}/libcrypto.so.3" not in entries


def test_strip_signature_removes_exactly_the_appended_signature() -> None:
    body = b"\x7fELF" + b"\x00" * 60
    signature = b"P" * 517
    info = bytes([0, 0, 2, 0, 0, 0, 0, 0]) + struct.pack(">I", len(signature))
    signed = body + signature + info + kmod.SIGNATURE_MAGIC
    assert kmod.strip_signature(signed) == body
    assert kmod.strip_signature(body) == body  # unsigned: unchanged
    # a sig_len pointing before the start of the file is a broken module, said so
    bad = body + bytes(8) + struct.pack(">I", 10_000)
    with pytest.raises(ProvisionError, match=r"x\.ko: malformed module signature"):
        kmod.strip_signature(bad + kmod.SIGNATURE_MAGIC, "x.ko")


def test_hide_btf_leaves_the_module_loader_an_empty_btf_section() -> None:
    btf = b"\x9f\xeb\x01\x00" + bytes(60)
    module = _elf_with_section(".BTF", btf)
    assert elf.section(module, ".BTF") == btf
    hidden = kmod.hide_btf(module)
    assert elf.section(hidden, ".BTF") == b""
    assert len(hidden) == len(module)  # nothing moves: only sh_size changed
    without = _elf_with_section(".modinfo", b"name=virtio\0")
    assert kmod.hide_btf(without) == without


def test_busybox_applet_table_and_links() -> None:
    from testbed.images import busybox

    names = ["[", "[["] + [f"ap{i:03d}" for i in range(60)] + ["lspci", "zcat"]
    binary = b"\x7fELF junk\0" + b"\0".join(n.encode() for n in names) + b"\0\0more"
    assert busybox.applet_names(binary) == names
    links = busybox.applet_links(names, ["usr/bin/lspci", "usr/bin/busybox"])
    paths = {link.path for link in links}
    assert "usr/bin/lspci" not in paths  # the real one wins, as with --install
    assert {"usr/bin/[", "usr/bin/zcat"} <= paths and len(paths) == len(names) - 1
    assert all(link.data == b"busybox" for link in links)
    # a table that stops being sorted ends there; too short a table is not busybox's
    with pytest.raises(ProvisionError, match="applet table has 3 names"):
        busybox.applet_names(b"[\0[[\0ls\0cat\0")
    with pytest.raises(ProvisionError, match="no single applet table"):
        busybox.applet_names(b"\x7fELF no table here")


PCI_IDS_SAMPLE = """#
#\tList of PCI IDs
#
1000  Broadcom / LSI
\t0012  53c895a
1af4  Red Hat, Inc.
\t1041  Virtio 1.0 network device
\t105a  Virtio file system
# a comment inside the list
8086  Intel Corporation
\t29c0  82G33/G31/P35/P31 Express DRAM Controller
\t\t1af4 1100  QEMU Virtual Machine
abcd  Nobody
\t0001  Thing
# List of known device classes, subclasses and programming interfaces
C 00  Unclassified device
\t00  Non-VGA unclassified device
C 02  Network controller
"""


def test_pci_ids_keep_the_named_vendors_and_every_class() -> None:
    from testbed.images import pciids

    out = pciids.trim_pci_ids(PCI_IDS_SAMPLE, ["1af4", "8086"])
    assert out.startswith("#\n#\tList of PCI IDs")
    assert "1af4  Red Hat, Inc.\n\t1041  Virtio 1.0 network device" in out
    assert "\t\t1af4 1100  QEMU Virtual Machine" in out
    assert "1000  " not in out and "53c895a" not in out and "abcd  Nobody" not in out
    assert "\t0001  Thing" not in out
    assert out.endswith("C 00  Unclassified device\n\t00  Non-VGA unclassified device\n"
                        "C 02  Network controller\n")  # fmt: skip
    assert pciids.valid_vendor_id("1af4") and not pciids.valid_vendor_id("1AF4")
