"""Fetch Debian packages for any architecture without root: a private apt state per arch.

apt-get runs with its own lists, cache, sources.list and an empty dpkg status
(Dir::State::status=/dev/null), so neither the host's apt state nor `dpkg --add-architecture`
is touched, and an unprivileged user can do it. The mirror is the one the host's own apt
configuration names for Debian (never a host name of ours).

Downloaded .debs are kept by name_version_arch and never fetched twice.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import HostCapabilityError, ProvisionError

DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
HOST_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))

Log = Callable[[str], None]


@dataclass(frozen=True)
class PackageInfo:
    """One package as the private apt state sees it (the candidate version)."""

    name: str
    version: str
    arch: str
    depends: str

    @property
    def deb_name(self) -> str:
        # apt-get download names files like this, with ':' in epochs escaped
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def debian_arch(arch: str) -> str:
    try:
        return DEBIAN_ARCH[arch]
    except KeyError:
        raise ProvisionError(
            f"unknown guest architecture {arch!r}; use one of {', '.join(DEBIAN_ARCH)}"
        ) from None


# ---- pure parsing ----------------------------------------------------------------------


def parse_one_line_sources(text: str) -> list[str]:
    """Mirror URIs from classic `deb URI suite comp...` lines (options in [] skipped)."""
    uris = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)
        parts = line.split()
        if len(parts) >= 2:
            uris.append(parts[1])
    return uris


def parse_deb822_sources(text: str) -> list[str]:
    """Mirror URIs from deb822 stanzas with `Types: deb` that are not disabled."""
    uris: list[str] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        uris.extend(fields.get("uris", "").split())
    return uris


def pick_debian_mirror(uris: Sequence[str]) -> str:
    """The first URI that serves the main Debian archive (path ending in /debian)."""
    for uri in uris:
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    raise HostCapabilityError(
        "the host's apt sources name no Debian archive (a URI ending in /debian); "
        "add one to /etc/apt/sources.list(.d) so guest packages can be fetched"
    )


def parse_show(text: str) -> dict[str, PackageInfo]:
    """`apt-cache show --no-all-versions` output -> name -> PackageInfo (first stanza wins)."""
    found: dict[str, PackageInfo] = {}
    for stanza in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line[:1].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        name = fields.get("Package")
        if name and name not in found and "Version" in fields:
            found[name] = PackageInfo(
                name=name,
                version=fields["Version"],
                arch=fields.get("Architecture", ""),
                depends=fields.get("Depends", ""),
            )
    return found


def depends_names(depends: str) -> list[str]:
    """Package names in a Depends field (first alternative of each, no versions)."""
    names = []
    for clause in depends.split(","):
        first = clause.split("|")[0].strip()
        if first:
            names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return names


# ---- I/O --------------------------------------------------------------------------------


def host_debian_mirror() -> str:
    """The Debian mirror the host's apt uses, read from its sources files."""
    uris: list[str] = []
    files: list[Path] = []
    if HOST_SOURCES[0].is_file():
        files.append(HOST_SOURCES[0])
    if HOST_SOURCES[1].is_dir():
        files.extend(sorted(HOST_SOURCES[1].iterdir()))
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.name.endswith(".sources"):
            uris.extend(parse_deb822_sources(text))
        elif path.name.endswith(".list"):
            uris.extend(parse_one_line_sources(text))
    return pick_debian_mirror(uris)


class AptState:
    """A private apt configuration for one Debian architecture and suite under `root`.

    Every apt call holds an exclusive flock on root/lock, so parallel builds of the same
    architecture serialise instead of fighting over apt's own lock files.
    """

    def __init__(self, root: Path, arch: str, suite: str) -> None:
        self.root = root
        self.arch = arch
        self.deb_arch = debian_arch(arch)
        self.suite = suite
        self.mirror = host_debian_mirror()
        self.lists = root / "lists"
        self.archives = root / "cache"
        self.sources = root / "sources.list"

    def _prepare(self) -> None:
        (self.lists / "partial").mkdir(parents=True, exist_ok=True)
        (self.archives / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        text = f"deb [arch={self.deb_arch}] {self.mirror} {self.suite} main\n"
        if not self.sources.exists() or self.sources.read_text() != text:
            self.sources.write_text(text)

    def options(self) -> list[str]:
        opts = {
            "APT::Architecture": self.deb_arch,
            "APT::Architectures": self.deb_arch,
            "Dir::State::Lists": str(self.lists),
            "Dir::State::status": "/dev/null",
            "Dir::Cache": str(self.archives),
            "Dir::Etc::sourcelist": str(self.sources),
            "Dir::Etc::sourceparts": "/nonexistent",
            # sid's Release file reads as expired against some machines' clocks
            "Acquire::Check-Valid-Until": "false",
            "Acquire::Check-Date": "false",
            "Acquire::Languages": "none",
            # as root apt drops privileges to _apt, which cannot write a private dir
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
            "Debug::NoLocking": "true",
        }
        out = []
        for key, value in opts.items():
            if value:
                out += ["-o", f"{key}={value}"]
        return out

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _run(self, tool: str, args: Sequence[str], cwd: Path | None = None) -> str:
        command = [tool, *self.options(), *args]
        try:
            proc = subprocess.run(
                command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False
            )
        except FileNotFoundError as exc:
            raise HostCapabilityError(
                f"{tool} not found: guest images are built with apt-get and dpkg-deb "
                "(install apt and dpkg)"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise ProvisionError(f"{tool} {' '.join(args)} took over 600 s") from exc
        if proc.returncode != 0:
            raise ProvisionError(
                f"{tool} {' '.join(args)} failed (exit {proc.returncode}) for "
                f"{self.suite}/{self.deb_arch} from {self.mirror}:\n{proc.stderr.strip()[-2000:]}"
            )
        return proc.stdout

    def has_lists(self) -> bool:
        return self.lists.is_dir() and any(self.lists.glob("*_Packages*"))

    def update(self) -> None:
        """apt-get update into the private lists."""
        with self.locked():
            self._prepare()
            self._run("apt-get", ["-q", "update"])

    def show(self, names: Sequence[str]) -> dict[str, PackageInfo]:
        """Candidate versions of `names`; an error names the packages the suite lacks."""
        with self.locked():
            self._prepare()
            try:
                text = self._run("apt-cache", ["show", "--no-all-versions", *names])
            except ProvisionError as exc:
                raise ProvisionError(
                    f"{exc}\nCheck the package names in the recipe against {self.suite} "
                    f"for {self.deb_arch}."
                ) from exc
        infos = parse_show(text)
        missing = [n for n in names if n not in infos]
        if missing:
            raise ProvisionError(
                f"{self.suite}/{self.deb_arch} has no package {', '.join(missing)}; "
                "fix the recipe or run `testbed images build --refresh`"
            )
        return infos

    def download(self, packages: Sequence[PackageInfo], debs_dir: Path, log: Log) -> list[Path]:
        """The .deb of each package in debs_dir, fetching only those not there yet."""
        debs_dir.mkdir(parents=True, exist_ok=True)
        wanted = [p for p in packages if not (debs_dir / p.deb_name).is_file()]
        if wanted:
            log(f"downloading {len(wanted)} packages: {' '.join(p.name for p in wanted)}")
            with self.locked():
                self._prepare()
                staging = Path(tempfile.mkdtemp(prefix=".download-", dir=debs_dir))
                try:
                    self._run(
                        "apt-get",
                        ["-q", "download", *(f"{p.name}={p.version}" for p in wanted)],
                        cwd=staging,
                    )
                    for p in wanted:
                        got = staging / p.deb_name
                        if not got.is_file():
                            raise ProvisionError(
                                f"apt-get download did not produce {p.deb_name} "
                                f"(got {sorted(x.name for x in staging.iterdir())})"
                            )
                        # atomic: a parallel build sees a whole .deb or none
                        os.replace(got, debs_dir / p.deb_name)
                finally:
                    for leftover in staging.iterdir():
                        leftover.unlink()
                    staging.rmdir()
        return [debs_dir / p.deb_name for p in packages]


def extract_deb(deb: Path, dest: Path) -> None:
    """dpkg-deb -x (no root needed: no chroot, no maintainer scripts)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["dpkg-deb", "-x", str(deb), str(dest)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except FileNotFoundError as exc:
        raise HostCapabilityError("dpkg-deb not found: install dpkg") from exc
    if proc.returncode != 0:
        raise ProvisionError(
            f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()[-1000:]}; "
            f"delete {deb} so it is fetched again"
        )
