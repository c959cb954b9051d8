"""Pure pieces of QEMU provisioning: the mmdebstrap command, the wrapper scripts, the stamp.

QEMU 11.1 (the first with vhost-user shared memory) needs a newer libc than Debian 12 has, so
it lives in a Debian sid sysroot and runs through that sysroot's own dynamic loader; see
/work/shared/notes/platform-facts.md. Nothing here does I/O; testbed.host.qemu runs it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

SUITE = "sid"
PACKAGES = ("qemu-system-x86", "qemu-system-arm", "qemu-utils")
# Wrapper name in bin/ -> binary in the sysroot's usr/bin.
WRAPPED = {
    "qemu-system-x86_64": "qemu-system-x86_64",
    "qemu-system-aarch64": "qemu-system-aarch64",
    "qemu-img": "qemu-img",
}
STAMP_FORMAT = 1


@dataclass(frozen=True)
class HostLayout:
    """Where a host architecture's loader and libraries live in a Debian sysroot."""

    triplet: str
    loader: str  # relative to the sysroot


# The sysroot is of the host's architecture (QEMU runs on the host), so the loader follows it.
HOST_LAYOUTS = {
    "x86_64": HostLayout("x86_64-linux-gnu", "usr/lib64/ld-linux-x86-64.so.2"),
    "aarch64": HostLayout("aarch64-linux-gnu", "usr/lib/ld-linux-aarch64.so.1"),
}


def host_layout(host_arch: str) -> HostLayout:
    try:
        return HOST_LAYOUTS[host_arch]
    except KeyError:
        raise ValueError(
            f"no sysroot layout for host architecture {host_arch!r} "
            f"(known: {', '.join(HOST_LAYOUTS)})"
        ) from None


def mmdebstrap_command(target: str, mmdebstrap: str = "mmdebstrap") -> list[str]:
    """The mmdebstrap run that makes the sysroot.

    variant=extract unpacks the packages without running maintainer scripts (no chroot, no
    root-only steps). The two aptopts are needed because sid's Release file reads as expired
    against some hosts' clocks. No mirror argument: mmdebstrap then uses Debian's default.
    """
    return [
        mmdebstrap,
        "--variant=extract",
        "--include=" + ",".join(PACKAGES),
        "--components=main",
        '--aptopt=Acquire::Check-Valid-Until "false"',
        '--aptopt=Acquire::Check-Date "false"',
        SUITE,
        target,
    ]


def bundle_symlink(host_arch: str) -> tuple[str, str]:
    """(link path relative to the sysroot, link target).

    QEMU finds its data and modules relative to its exec dir, which is the loader's dir when
    run through the loader; without this link it loads the host's modules (another build) and
    aborts with "Only modules from the same build can be loaded".
    """
    return (f"usr/lib/{host_layout(host_arch).triplet}/qemu-bundle", "../../..")


def wrapper_script(binary: str, host_arch: str) -> str:
    """A /bin/sh wrapper that runs sysroot/usr/bin/<binary> through the sysroot's loader.

    It finds the sysroot relative to itself (readlink -f), so the tree can be built in a temp
    dir and renamed into place.
    """
    layout = host_layout(host_arch)
    return (
        "#!/bin/sh\n"
        "# Provisioned by testbed: QEMU from a Debian sid sysroot, run through the sysroot's"
        " own loader.\n"
        'R=$(dirname "$(readlink -f "$0")")/../sysroot\n'
        f'exec "$R/{layout.loader}" --library-path "$R/usr/lib/{layout.triplet}"'
        f' "$R/usr/bin/{binary}" "$@"\n'
    )


_CHANGELOG_HEAD = re.compile(r"^\S+ \(([^)\s]+)\)")


def version_from_changelog(first_line: str) -> str | None:
    """'qemu (1:11.1.3+ds-1) unstable; urgency=medium' -> '1:11.1.3+ds-1'.

    variant=extract leaves dpkg's status empty, so the package's Debian changelog is where the
    sysroot records which version it holds.
    """
    match = _CHANGELOG_HEAD.match(first_line)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Stamp:
    """What a provisioned tree holds; written last, so its presence means 'complete'."""

    created: str  # ISO 8601, UTC
    host_arch: str
    suite: str = SUITE
    packages: dict[str, str] = field(default_factory=dict)  # package -> version
    adopted: bool = False  # made for a tree built by hand rather than by provision()
    format: int = STAMP_FORMAT

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": self.format,
                "created": self.created,
                "host_arch": self.host_arch,
                "suite": self.suite,
                "packages": self.packages,
                "adopted": self.adopted,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Stamp:
        """Parse a stamp; ValueError when it is not one we wrote (then re-provision)."""
        try:
            data = json.loads(text)
            if data.get("format") != STAMP_FORMAT:
                raise ValueError(
                    f"not a testbed QEMU stamp: format {data.get('format')!r}, need {STAMP_FORMAT}"
                )
            return cls(
                created=str(data["created"]),
                host_arch=str(data["host_arch"]),
                suite=str(data["suite"]),
                packages={str(k): str(v) for k, v in dict(data["packages"]).items()},
                adopted=bool(data.get("adopted", False)),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a testbed QEMU stamp: {exc}") from exc
