"""The Debian packages the host needs, checked with dpkg-query and installed with apt-get.

The list is scripts/debian-packages.txt (also read by scripts/setup.sh, before any venv
exists): one place names the packages. `testbed qemu provision --install-missing` installs the
missing ones as root; other users are told the command to run. `testbed doctor` reports them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import HostCapabilityError, ProvisionError
from testbed.paths import PROJECT_ROOT

PACKAGE_LIST = PROJECT_ROOT / "scripts" / "debian-packages.txt"
APT_LISTS = Path("/var/lib/apt/lists")
INSTALL_TIMEOUT = 900.0


@dataclass(frozen=True)
class HostPackage:
    name: str
    why: str


def parse_package_list(text: str) -> list[HostPackage]:
    """'name   # why' lines; blank lines and whole-line comments skipped."""
    packages = []
    for line in text.splitlines():
        body, _, comment = line.partition("#")
        name = body.strip()
        if name:
            packages.append(HostPackage(name.split()[0], comment.strip()))
    return packages


def required_packages() -> list[HostPackage]:
    try:
        return parse_package_list(PACKAGE_LIST.read_text())
    except OSError as exc:
        raise HostCapabilityError(
            f"cannot read the host package list {PACKAGE_LIST}: {exc}; run from a testbed checkout"
        ) from exc


def parse_dpkg_query(output: str) -> set[str]:
    """Installed package names from `dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n'`."""
    installed = set()
    for line in output.splitlines():
        parts = line.split()
        # Status-Abbrev "ii" = desired install, currently installed.
        if len(parts) >= 2 and parts[1] == "ii":
            installed.add(parts[0].split(":")[0])
    return installed


def installed_packages(names: Sequence[str]) -> set[str]:
    if not names:
        return set()
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *names],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,  # exit 1 when some package is unknown: still prints the known ones
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostCapabilityError(
            f"dpkg-query failed ({exc}); this host layer knows Debian and derivatives only"
        ) from exc
    return parse_dpkg_query(out.stdout)


def missing_packages() -> list[HostPackage]:
    wanted = required_packages()
    have = installed_packages([p.name for p in wanted])
    return [p for p in wanted if p.name not in have]


def lists_present() -> bool:
    """Whether apt has package lists; a fresh machine has none and needs apt-get update."""
    try:
        return any(p.name.endswith("_Packages") for p in APT_LISTS.iterdir())
    except OSError:
        return False


def install_commands(names: Sequence[str], have_lists: bool) -> list[list[str]]:
    """apt-get commands that install ``names`` (pure)."""
    commands = [] if have_lists else [["apt-get", "update", "-q"]]
    commands.append(["apt-get", "install", "-y", "-q", "--no-install-recommends", *names])
    return commands


def install_hint(names: Sequence[str]) -> str:
    return "apt-get update && apt-get install -y --no-install-recommends " + " ".join(names)


def install(
    names: Sequence[str], log: Callable[[str], None] = print, *, is_root: bool | None = None
) -> None:
    """Install Debian packages as root (apt-get update first when lists are missing).

    Not root: raises HostCapabilityError with the command to run.
    """
    if not names:
        return
    root = os.geteuid() == 0 if is_root is None else is_root
    if not root:
        raise HostCapabilityError(
            f"missing Debian packages {', '.join(names)}; as root run: {install_hint(names)}"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in install_commands(names, lists_present()):
        log("running: " + " ".join(command))
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=env,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ProvisionError(f"{' '.join(command)} took over {INSTALL_TIMEOUT:.0f} s") from exc
        if done.returncode != 0:
            raise ProvisionError(
                f"{' '.join(command)} failed (exit {done.returncode}):\n"
                f"{(done.stderr or done.stdout).strip()[-1500:]}"
            )


def ensure_installed(log: Callable[[str], None] = print) -> list[str]:
    """Install whatever the package list names and the host lacks; returns what was installed."""
    missing = [p.name for p in missing_packages()]
    if missing:
        log(f"missing Debian packages: {', '.join(missing)}")
        install(missing, log=log)
    return missing
