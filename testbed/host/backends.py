"""Vhost-user back-ends from outside this project, ready to run on this host:
virtiofsd (Debian sid's package) and qemu-storage-daemon (already in the QEMU sysroot).

Both need sid's glibc, so both run through the QEMU sysroot's own loader, like QEMU itself
(see /work/shared/notes/qemu-upstream.md). virtiofsd is not added to the sysroot's package
list: that would re-provision the whole shared QEMU tree (a new mmdebstrap run, then a swap
under every running job) for one 2 MB binary. Its .deb is fetched with the image builder's
private sid apt state instead and unpacked beside the sysroot, under
``<cache>/backends/virtiofsd-<version>/``; its libraries (libcap-ng0, libseccomp2,
libgcc-s1) come from the sysroot. Idempotent: a wrapper whose target exists means done.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from testbed.errors import HostCapabilityError
from testbed.host import sysroot
from testbed.host.qemu import host_arch, qemu_root
from testbed.images import images_root
from testbed.images.apt import AptState, extract_deb
from testbed.paths import cache_dir, remove_tree, write_atomic

Log = Callable[[str], None]

VIRTIOFSD_PACKAGE = "virtiofsd"
VIRTIOFSD_BINARY = "usr/libexec/virtiofsd"
STORAGE_DAEMON_BINARY = "usr/bin/qemu-storage-daemon"


def backends_root() -> Path:
    return cache_dir() / "backends"


def loader_wrapper(binary: Path, sysroot_dir: Path, arch: str) -> str:
    """A /bin/sh wrapper running ``binary`` through the sysroot's loader and libraries (pure)."""
    layout = sysroot.host_layout(arch)
    return (
        "#!/bin/sh\n"
        "# Provisioned by testbed: a Debian sid binary run through the QEMU sysroot's loader.\n"
        f'exec "{sysroot_dir / layout.loader}" --library-path '
        f'"{sysroot_dir / "usr" / "lib" / layout.triplet}" "{binary}" "$@"\n'
    )


def _write_wrapper(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text, 0o755)


def _sysroot_dir() -> Path:
    base = qemu_root() / "sysroot"
    if not (base / sysroot.host_layout(host_arch()).loader).exists():
        raise HostCapabilityError(
            f"no QEMU sysroot in {base}: run `testbed qemu provision` first (the outside "
            "back-ends run through its loader)"
        )
    return base


def ensure_storage_daemon(log: Log = print) -> Path:
    """bin/qemu-storage-daemon: the sysroot's, through its loader."""
    base = _sysroot_dir()
    binary = base / STORAGE_DAEMON_BINARY
    if not binary.is_file():
        raise HostCapabilityError(f"{binary} is missing: re-provision QEMU")
    wrapper = backends_root() / "bin" / "qemu-storage-daemon"
    text = loader_wrapper(binary, base, host_arch())
    if not wrapper.is_file() or wrapper.read_text() != text:
        _write_wrapper(wrapper, text)
        log(f"qemu-storage-daemon: {wrapper}")
    return wrapper


def ensure_virtiofsd(log: Log = print) -> Path:
    """bin/virtiofsd: sid's virtiofsd, fetched and unpacked once, through the loader."""
    arch = host_arch()
    base = _sysroot_dir()
    wrapper = backends_root() / "bin" / "virtiofsd"
    if wrapper.is_file():
        text = wrapper.read_text()
        for tree in backends_root().glob("virtiofsd-*"):
            binary = tree / VIRTIOFSD_BINARY
            if binary.is_file() and text == loader_wrapper(binary, base, arch):
                return wrapper  # it runs an unpacked tree: nothing to do, no apt call
    apt = AptState(images_root() / "apt" / arch / "sid", arch, "sid")
    if not apt.has_lists():
        log(f"virtiofsd: apt-get update (sid, {apt.deb_arch})")
        apt.update()
    info = apt.show([VIRTIOFSD_PACKAGE])[VIRTIOFSD_PACKAGE]
    tree = backends_root() / f"virtiofsd-{info.version.replace(':', '_')}"
    if not (tree / VIRTIOFSD_BINARY).is_file():
        (deb,) = apt.download([info], backends_root() / "debs", log)
        # Under apt's lock (download() has released it): two workers installing at once
        # must not swap a tree away under the other's running virtiofsd.
        with apt.locked():
            if not (tree / VIRTIOFSD_BINARY).is_file():
                tmp = Path(tempfile.mkdtemp(prefix=".virtiofsd-", dir=backends_root()))
                try:
                    extract_deb(deb, tmp)
                    tmp.chmod(0o755)
                    remove_tree(tree)  # a half-written tree from an interrupted run
                    os.replace(tmp, tree)
                finally:
                    remove_tree(tmp)
    _write_wrapper(wrapper, loader_wrapper(tree / VIRTIOFSD_BINARY, base, arch))
    log(f"virtiofsd {info.version}: {wrapper}")
    return wrapper


if __name__ == "__main__":
    # `.venv/bin/python -m testbed.host.backends`: install both, print their wrappers.
    ensure_virtiofsd()
    ensure_storage_daemon()
