"""Optional guest modules: where the image carries them and the command that loads them.

The recipe's ``optional_modules`` (e.g. virtiofs, virtio_blk) go under /extra, not into the
boot list, so a device they would bind stays unbound unless a scenario asks for the driver
(GuestVM.load_modules). Not under /lib: an initramfs entry for a directory named lib would
replace the image's lib -> usr/lib link and break every module load. Pure.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

from testbed.errors import ConfigError

EXTRA_DIR = "extra"
MODULES_DIR = f"{EXTRA_DIR}/modules"
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _checked(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"module name {name!r}: use letters, digits, '-' and '_'")
    return name.replace("-", "_")


MODULE_SUFFIX = ".ko.gz"
"""The optional modules are gzip'ed: they are in the initramfs the kernel copies at every
boot but loaded only on demand, where busybox insmod inflates them. Measured on 6.12 x86_64
(ext4, nvdimm and the rest): 3.7 MB as plain ELF, 0.86 MB gzip'ed; xz would be 0.6 MB
but inflates several times slower under TCG."""


def module_path(name: str) -> str:
    """The module file inside the image (relative to /)."""
    return f"{MODULES_DIR}/{_checked(name)}{MODULE_SUFFIX}"


def order_path(name: str) -> str:
    """The load order for ``name`` (itself last, after what it needs), one per line."""
    return f"{MODULES_DIR}/{_checked(name)}.order"


def load_command(names: Iterable[str], params: dict[str, str] | None = None) -> str:
    """A guest shell command that insmods each module of ``names`` with what it needs, in
    order, skipping what is already loaded; fails naming a module the image lacks.

    ``params``: module name -> parameters for its insmod (e.g. {"virtiofs": "dyndbg=+p"}).
    A module built into the kernel (its order lists nothing to load, e.g. virtiofs on
    6.12) is there already; only its dynamic debug can still be set, at run time through
    /proc/dynamic_debug/control: its other parameters are a ConfigError here.
    """
    params = params or {}
    steps: list[str] = []
    for name in names:
        mod = _checked(name)
        order = "/" + order_path(mod)
        steps.append(
            f"[ -f {order} ] || {{ echo 'no optional module {mod} in this image "
            f"(recipe optional_modules)' >&2; exit 1; }}"
        )
        flags, others = _split_params(params.get(mod, ""))
        builtin = []
        if others:
            builtin.append(
                f"echo 'module {mod} is built into this kernel: {shlex.quote(others)} cannot "
                "reach it (only dyndbg=FLAGS can, at run time)' >&2; exit 1"
            )
        if flags:
            builtin.append(f"echo 'module {mod} {flags}' > /proc/dynamic_debug/control")
        if builtin:
            steps.append(f"grep -qx {mod} {order} || {{ {'; '.join(builtin)}; }}")
        ko = f"/{MODULES_DIR}/$m{MODULE_SUFFIX}"
        with_params = f"insmod {ko} {shlex.quote(params[mod])}" if mod in params else f"insmod {ko}"
        steps.append(
            f"for m in $(cat {order}); do "
            f'grep -q "^$m " /proc/modules && continue; '
            f'if [ "$m" = {mod} ]; then {with_params}; else insmod {ko}; fi; done'
        )
    return "set -e; " + "; ".join(steps)


def _split_params(params: str) -> tuple[str, str]:
    """A module's parameters as (its dyndbg flags, the others); what a built-in module can
    still be given at run time is the first. Pure."""
    words = shlex.split(params)
    flags = [w.partition("=")[2] for w in words if w.startswith("dyndbg=")]
    others = " ".join(w for w in words if not w.startswith("dyndbg="))
    return (flags[-1] if flags else ""), others
