"""Which QEMU binary to run, and provisioning the one we ship.

Resolution per guest architecture, first match wins:
  1. an explicit path (--qemu-<arch>), else $TESTBED_QEMU_<ARCH>: must be suitable, or we stop
     with an error naming it (never silently fall back past what the user asked for);
  2. each qemu-system-<arch> on $PATH, in PATH order, that is suitable;
  3. the provisioned one, cache_dir()/qemu/bin/qemu-system-<arch>.
Suitable: version >= 11.1 (QMP query-version) and vhost-user-test-device-pci present. The
verdict per binary is cached (keyed by path, mtime, size, inode) so resolution costs a stat.

The decision (choose_qemu) is pure over injected facts; probe_qemu gathers the facts.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import (
    ConfigError,
    HostCapabilityError,
    ProvisionError,
    TestbedError,
    WaitTimeout,
)
from testbed.host import debian, sysroot
from testbed.machine import probe
from testbed.paths import cache_dir, remove_tree, write_atomic
from testbed.waiting import wait_until

ARCHES = ("x86_64", "aarch64")
MIN_VERSION = (11, 1, 0)
REQUIRED_DEVICE = "vhost-user-test-device-pci"

SOURCE_EXPLICIT = "option/env"
SOURCE_PATH = "PATH"
SOURCE_PROVISIONED = "provisioned"

PROBE_TIMEOUT = 15.0  # seconds for one binary's -version + QMP probe (TCG hosts are slow)
PROVISION_TIMEOUT = 1800.0  # mmdebstrap downloads ~200 MB
LOCK_TIMEOUT = 2400.0  # a parallel provision may be downloading

Version = tuple[int, int, int]
Log = Callable[[str], None]


def env_var(arch: str) -> str:
    return f"TESTBED_QEMU_{arch.upper()}"


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise ConfigError(f"unknown guest architecture {arch!r}; use one of {', '.join(ARCHES)}")


# --------------------------------------------------------------------------- pure: versions


_VERSION_RE = re.compile(r"(?:version\s+)?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> Version:
    """'QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1)' or '11.1.3' -> (11, 1, 3)."""
    match = re.search(r"version\s+(\d+)\.(\d+)(?:\.(\d+))?", text) or _VERSION_RE.search(text)
    if not match:
        raise ValueError(f"no QEMU version in {text.strip()[:200]!r}")
    return (int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))


def version_from_qmp(reply: Mapping[str, Any]) -> Version:
    """The return value of QMP query-version -> (major, minor, micro)."""
    try:
        qemu = reply["qemu"]
        return (int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed query-version reply: {reply!r}") from exc


def meets_minimum(version: Version) -> bool:
    """version >= MIN_VERSION, counting QEMU development trees as the release they lead to.

    QEMU numbers its git tree after release x.y as x.y.50 and release candidates x.y.90+,
    both on the way to x.(y+1): a developer's master build of 11.0.50 is 11.1 in the making.
    Whether it really has the feature is then decided by the device check and the
    GET_SHMEM_CONFIG probe (doctor).
    """
    major, minor, micro = version
    effective = (major, minor + 1, 0) if micro >= 50 else version
    return effective >= MIN_VERSION


def format_version(version: Version | None) -> str:
    return "unknown" if version is None else ".".join(map(str, version))


# --------------------------------------------------------------------------- pure: decision


@dataclass(frozen=True)
class QemuBinary:
    """A QEMU that resolution picked: guest arch, path, version, and where it came from."""

    arch: str
    path: Path
    version: Version
    source: str  # SOURCE_EXPLICIT, SOURCE_PATH or SOURCE_PROVISIONED

    @property
    def version_str(self) -> str:
        return format_version(self.version)


@dataclass(frozen=True)
class QemuFacts:
    """What probing one binary found. ``problem`` set: it could not be run/queried at all."""

    path: Path
    problem: str = ""
    version: Version | None = None
    has_device: bool | None = None  # None: not asked (too old, or it failed first)
    exists: bool = True
    executable: bool = True

    def unsuitability(self) -> str | None:
        """Why this binary cannot run the suite, or None when it can."""
        if self.problem:
            return self.problem
        if self.version is None:
            return "its version could not be read"
        if not meets_minimum(self.version):
            return (
                f"it is QEMU {format_version(self.version)}; vhost-user shared memory needs "
                f"QEMU >= {format_version(MIN_VERSION)}"
            )
        if not self.has_device:
            return f"it has no {REQUIRED_DEVICE} (QEMU built without vhost-user?)"
        return None


@dataclass(frozen=True)
class Candidate:
    """A binary to consider; ``origin`` names how it was given (option, variable, PATH)."""

    path: Path
    source: str
    origin: str


def candidates_for(
    arch: str, explicit: str | None, environ: Mapping[str, str], provisioned: Path
) -> list[Candidate]:
    """The binaries to try, in order (pure: environ and provisioned path are injected).

    An explicit option or variable is the only candidate: the user asked for it.
    """
    if explicit:
        return [Candidate(Path(explicit).expanduser(), SOURCE_EXPLICIT, f"--qemu-{arch}")]
    env_value = environ.get(env_var(arch))
    if env_value:
        return [Candidate(Path(env_value).expanduser(), SOURCE_EXPLICIT, f"${env_var(arch)}")]
    found: list[Candidate] = []
    seen: set[str] = set()
    for directory in environ.get("PATH", "").split(os.pathsep):
        if not directory:
            continue
        path = Path(directory) / f"qemu-system-{arch}"
        key = os.path.realpath(path)
        # The provisioned wrapper may be on PATH too; it is reported as "provisioned".
        if key in seen or key == os.path.realpath(provisioned):
            continue
        seen.add(key)
        found.append(Candidate(path, SOURCE_PATH, "PATH"))
    found.append(Candidate(provisioned, SOURCE_PROVISIONED, "provisioned"))
    return found


def choose_qemu(
    arch: str, candidates: Sequence[Candidate], probe: Callable[[Path], QemuFacts]
) -> QemuBinary:
    """The first suitable candidate; probes lazily, in order. Pure apart from ``probe``.

    Raises ConfigError for an explicit path that does not exist or is not executable,
    HostCapabilityError for an explicit QEMU that is unsuitable or when nothing is suitable.
    """
    rejected: list[str] = []
    for cand in candidates:
        facts = probe(cand.path)
        if cand.source == SOURCE_PATH and not facts.exists:
            continue  # PATH directories without this binary are not worth a line
        why = facts.unsuitability()
        if why is None:
            assert facts.version is not None
            return QemuBinary(arch, cand.path, facts.version, cand.source)
        if cand.source == SOURCE_EXPLICIT:
            raise _explicit_error(cand, facts, why)
        rejected.append(f"{cand.path} ({cand.origin}): {why}")
    tried = "; ".join(rejected) if rejected else "no candidates"
    raise HostCapabilityError(
        f"no suitable qemu-system-{arch} (need QEMU >= {format_version(MIN_VERSION)} with "
        f"{REQUIRED_DEVICE}); tried: {tried}. Run `testbed qemu provision` to install one "
        f"under {cache_dir() / 'qemu'}, or point --qemu-{arch} / ${env_var(arch)} at your "
        "own build."
    )


def _explicit_error(cand: Candidate, facts: QemuFacts, why: str) -> Exception:
    undo = (
        f"unset {cand.origin[1:]} to use a QEMU from PATH or the provisioned one"
        if cand.origin.startswith("$")
        else f"drop {cand.origin} to use a QEMU from PATH or the provisioned one"
    )
    if not (facts.exists and facts.executable):
        return ConfigError(f"{cand.origin} {cand.path}: {why}; give an executable path, or {undo}")
    return HostCapabilityError(
        f"{cand.origin} {cand.path} cannot be used: {why}. Build QEMU >= "
        f"{format_version(MIN_VERSION)} with vhost-user (configure --enable-vhost-user), "
        f"or {undo} (`testbed qemu provision` installs one)"
    )


# --------------------------------------------------------------------------- I/O: probing


def _facts_cache_path() -> Path:
    return cache_dir() / "host" / "qemu-facts.json"


def _cache_key(path: Path) -> str | None:
    try:
        real = path.resolve(strict=True)
        st = real.stat()
    except OSError:
        return None
    return f"{real}:{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON next to ``path`` and rename it in place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def probe_qemu(path: Path, *, use_cache: bool = True, timeout: float = PROBE_TIMEOUT) -> QemuFacts:
    """Facts about one binary: runs it (``-version``, then QMP) unless the cache knows it."""
    if not path.exists():
        return QemuFacts(path, problem="it does not exist", exists=False, executable=False)
    if not path.is_file() or not os.access(path, os.X_OK):
        return QemuFacts(path, problem="it is not an executable file", executable=False)
    key = _cache_key(path)
    cache_file = _facts_cache_path()
    if use_cache and key:
        hit = read_json(cache_file).get(key)
        if isinstance(hit, dict):
            version = hit.get("version")
            return QemuFacts(
                path,
                problem=str(hit.get("problem", "")),
                version=(int(version[0]), int(version[1]), int(version[2])) if version else None,
                has_device=hit.get("has_device"),
            )
    facts, definitive = _probe_uncached(path, timeout)
    # Only settled verdicts are cached: a timeout on a loaded host must be retried next time.
    if key and definitive:
        cache = read_json(cache_file)
        cache[key] = {
            "problem": facts.problem,
            "version": list(facts.version) if facts.version else None,
            "has_device": facts.has_device,
        }
        with contextlib.suppress(OSError):
            write_json_atomic(cache_file, cache)
    return facts


def _probe_uncached(path: Path, timeout: float) -> tuple[QemuFacts, bool]:
    # -version first: cheap, and an old QEMU is rejected without starting a machine.
    try:
        out = probe.version_output(path, timeout)
    except WaitTimeout:
        return QemuFacts(
            path, problem=f"`{path} -version` did not finish in {timeout:.0f} s"
        ), False
    except OSError as exc:
        return QemuFacts(path, problem=f"it cannot be started: {exc}"), True
    try:
        version = parse_version(out.stdout)
    except ValueError:
        tail = (out.stderr or out.stdout).strip()[-300:]
        return QemuFacts(path, problem=f"`-version` printed no QEMU version: {tail!r}"), True
    if not meets_minimum(version):
        return QemuFacts(path, version=version), True
    try:
        qmp_version, types = probe.query_qmp(path, ("query-version", "qom-list-types"), timeout)
    except (TestbedError, OSError) as exc:
        return QemuFacts(path, problem=f"QMP with {path} failed: {exc}", version=version), False
    names = {t.get("name") for t in types} if isinstance(types, list) else set()
    return QemuFacts(
        path, version=version_from_qmp(qmp_version), has_device=REQUIRED_DEVICE in names
    ), True


def resolve_qemu(arch: str, explicit: str | None = None) -> QemuBinary:
    """The QEMU to run for guest ``arch`` (see the module docstring for the order)."""
    _check_arch(arch)
    cands = candidates_for(arch, explicit, os.environ, provisioned_path(arch))
    return choose_qemu(arch, cands, probe_qemu)


# --------------------------------------------------------------------------- provisioning


def qemu_root() -> Path:
    return cache_dir() / "qemu"


def provisioned_path(arch: str) -> Path:
    """cache_dir()/qemu/bin/qemu-system-<arch> (whether or not it exists yet)."""
    _check_arch(arch)
    return qemu_root() / "bin" / f"qemu-system-{arch}"


def host_arch() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def read_stamp(root: Path | None = None) -> sysroot.Stamp | None:
    """The stamp of a complete provisioned tree, or None."""
    try:
        return sysroot.Stamp.from_json(((root or qemu_root()) / "stamp.json").read_text())
    except (OSError, ValueError):
        return None


def _tree_complete(root: Path, arch: str) -> bool:
    """A stamp plus every wrapper and every binary it wraps: nothing to do."""
    stamp = read_stamp(root)
    if stamp is None or stamp.host_arch != arch:
        return False
    return all(
        os.access(root / "bin" / name, os.X_OK)
        and (root / "sysroot" / "usr" / "bin" / binary).is_file()
        for name, binary in sysroot.WRAPPED.items()
    )


def _sysroot_usable(root: Path, arch: str) -> bool:
    """A sysroot (hand-made or ours) with the binaries, the packages and the bundle link."""
    base = root / "sysroot"
    link, _ = sysroot.bundle_symlink(arch)
    layout = sysroot.host_layout(arch)
    return (
        (base / layout.loader).exists()
        and (base / link).is_symlink()
        and all((base / "usr" / "bin" / b).is_file() for b in sysroot.WRAPPED.values())
        and all(p in package_versions(base) for p in sysroot.PACKAGES)
    )


def package_versions(base: Path) -> dict[str, str]:
    """Package -> version, from each package's Debian changelog in the sysroot."""
    versions: dict[str, str] = {}
    for package in sysroot.PACKAGES:
        changelog = base / "usr" / "share" / "doc" / package / "changelog.Debian.gz"
        try:
            with gzip.open(changelog, "rt", errors="replace") as fh:
                version = sysroot.version_from_changelog(fh.readline())
        except OSError:
            continue
        if version:
            versions[package] = version
    return versions


def _write_wrappers_and_stamp(root: Path, arch: str, *, adopted: bool) -> sysroot.Stamp:
    bindir = root / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for name, binary in sysroot.WRAPPED.items():
        write_atomic(bindir / name, sysroot.wrapper_script(binary, arch), 0o755)
    stamp = sysroot.Stamp(
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        host_arch=arch,
        packages=package_versions(root / "sysroot"),
        adopted=adopted,
    )
    write_atomic(root / "stamp.json", stamp.to_json(), 0o644)  # last: it means "complete"
    return stamp


@contextlib.contextmanager
def _provision_lock(log: Log) -> Iterator[None]:
    """An exclusive flock beside the tree (not inside: the tree is swapped by rename)."""
    lock_path = cache_dir() / "qemu.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        told: list[bool] = []

        def locked() -> bool:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if not told:
                    log(f"waiting for another provision to finish (lock {lock_path})")
                    told.append(True)
                return False

        try:
            # flock has no timeout of its own: polled, bounded by the deadline.
            wait_until(locked, LOCK_TIMEOUT, f"the provision lock {lock_path}", interval=0.2)
        except WaitTimeout:
            raise ProvisionError(
                f"another provision held {lock_path} for {LOCK_TIMEOUT:.0f} s; if none is "
                "running, remove the lock file and retry"
            ) from None
        yield  # closing the lock file releases the flock


def provision(log: Log = print, *, install_missing: bool = False) -> dict[str, Path]:
    """Make cache_dir()/qemu hold QEMU 11.1 for both guest arches; idempotent, parallel-safe.

    Returns {arch: wrapper path}. A complete tree is left alone (well under a second). A
    hand-made sysroot that has everything gets our wrappers and a stamp (adopted). Otherwise
    the sysroot is built with mmdebstrap in a temp dir beside the target, checked, and swapped
    in by rename.
    """
    arch = host_arch()
    if arch not in sysroot.HOST_LAYOUTS:
        raise HostCapabilityError(
            f"provisioning supports x86_64 and aarch64 hosts, this is {arch}; point "
            "--qemu-x86_64/--qemu-aarch64 at your own QEMU >= 11.1 builds"
        )
    root = qemu_root()
    result = {a: provisioned_path(a) for a in ARCHES}
    with _provision_lock(log):
        if _tree_complete(root, arch):
            stamp = read_stamp(root)
            assert stamp is not None
            log(f"QEMU already provisioned in {root} ({_describe(stamp)})")
            return result
        if _sysroot_usable(root, arch):
            stamp = _write_wrappers_and_stamp(root, arch, adopted=True)
            _verify(root, log)
            log(f"adopted the existing sysroot in {root} ({_describe(stamp)})")
            return result
        _build(root, arch, log, install_missing)
    return result


def _describe(stamp: sysroot.Stamp) -> str:
    pkgs = ", ".join(f"{k} {v}" for k, v in sorted(stamp.packages.items()))
    return f"{pkgs}; made {stamp.created}"


def _build(root: Path, arch: str, log: Log, install_missing: bool) -> None:
    if install_missing:
        debian.ensure_installed(log)
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise HostCapabilityError(
            "mmdebstrap is not installed; it builds the Debian sid sysroot that holds "
            f"QEMU 11.1. As root: `testbed qemu provision --install-missing`, or "
            f"{debian.install_hint(['mmdebstrap'])}"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so the final rename stays on one file system.
    build = Path(tempfile.mkdtemp(prefix=".qemu-build-", dir=root.parent))
    swapped = False
    try:
        command = sysroot.mmdebstrap_command(str(build / "sysroot"), mmdebstrap)
        log(f"building the QEMU sysroot ({', '.join(sysroot.PACKAGES)} from Debian "
            f"{sysroot.SUITE}) in {build}")  # fmt: skip
        started = time.monotonic()
        out = build / "mmdebstrap.log"
        try:
            with out.open("wb") as fh:
                done = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    timeout=PROVISION_TIMEOUT,
                    check=False,
                )
        except subprocess.TimeoutExpired as exc:
            raise ProvisionError(f"mmdebstrap did not finish in {PROVISION_TIMEOUT:.0f} s") from exc
        if done.returncode != 0:
            tail = out.read_text(errors="replace").strip()[-1500:]
            raise ProvisionError(
                f"mmdebstrap failed (exit {done.returncode}); check network access to "
                f"Debian's package archive. Command: {' '.join(command)}\n{tail}"
            )
        log(f"sysroot built in {time.monotonic() - started:.1f} s")
        link, target = sysroot.bundle_symlink(arch)
        (build / "sysroot" / link).symlink_to(target)
        out.unlink()
        stamp = _write_wrappers_and_stamp(build, arch, adopted=False)
        _verify(build, log)
        _swap_in(build, root)
        swapped = True
        log(f"QEMU provisioned in {root} ({_describe(stamp)})")
    finally:
        if not swapped:
            remove_tree(build)  # a failed or interrupted build leaves nothing behind


def _verify(root: Path, log: Log) -> None:
    """Each wrapper starts and reports a suitable version, before the tree is used."""
    for arch in ARCHES:
        wrapper = root / "bin" / f"qemu-system-{arch}"
        facts = probe_qemu(wrapper, use_cache=False)
        why = facts.unsuitability()
        if why is not None:
            raise ProvisionError(f"provisioned {wrapper} is not usable: {why}")
        log(f"  {wrapper.name}: QEMU {format_version(facts.version)}, {REQUIRED_DEVICE} present")


def _swap_in(build: Path, root: Path) -> None:
    """Replace ``root`` by ``build``: two renames under the provision lock.

    A directory cannot be os.replace'd over a non-empty one, so the old tree is first renamed
    aside (the gap between the renames is two syscalls) and removed afterwards.
    """
    old = None
    if root.exists() or root.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=".qemu-old-", dir=root.parent))
        os.rename(root, old / "qemu")
    build.chmod(0o755)  # mkdtemp made it 0700; the tree holds only public packages
    os.rename(build, root)
    if old is not None:
        remove_tree(old)
