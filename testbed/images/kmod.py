"""Kernel module selection and load order from each module's .modinfo `depends=` (pure).

Debian's modules package carries no modules.dep (depmod runs at install time), so the
order is computed here: a module comes after everything it depends on, and after what its
softdep= "pre:" names (ext4 and jbd2 name crypto-crc32c, which they look up through the
crypto API when they mount: the guest has no modprobe to load it then). Built-in modules
(listed in modules.builtin) need no loading and are dropped from the list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from testbed.errors import ProvisionError
from testbed.images import elf


def module_name(path_or_name: str) -> str:
    """'kernel/drivers/char/hw_random/virtio-rng.ko.xz' -> 'virtio_rng' (kernel's spelling)."""
    base = path_or_name.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def parse_builtin(text: str) -> set[str]:
    """modules.builtin (one path per line) -> the set of built-in module names."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def parse_depends(value: str) -> list[str]:
    """A .modinfo depends= value ('a,b-c' or '') -> ['a', 'b_c']."""
    return [module_name(x) for x in value.split(",") if x.strip()]


def parse_softdep_pre(value: str) -> list[str]:
    """A .modinfo softdep= value ('pre: crypto-crc32c post: x') -> the names to load
    first, as written (module names or aliases)."""
    names: list[str] = []
    current = ""
    for word in value.split():
        if word.endswith(":"):
            current = word[:-1]
        elif current == "pre":
            names.append(word)
    return names


def parse_builtin_aliases(data: bytes) -> set[str]:
    """modules.builtin.modinfo (NUL-separated 'module.key=value') -> every alias that a
    built-in module provides, plus the built-in modules' own names."""
    aliases: set[str] = set()
    for item in data.split(b"\0"):
        head, sep, value = item.decode(errors="replace").partition("=")
        module, dot, key = head.partition(".")
        if sep and dot:
            aliases.add(module_name(module))
            if key == "alias":
                aliases.add(value)
    return aliases


def softdep_candidates(name: str) -> list[str]:
    """Modules that may provide softdep ``name``, most likely first. Debian ships no
    modules.alias (depmod runs at install time) and reading every module's aliases would
    mean decompressing ~4000 of them, so only these are checked: the name itself, without
    a crypto- prefix, and the generic implementation ('crypto-crc32c' -> crc32c,
    crc32c_generic)."""
    base = module_name(name.removeprefix("crypto-"))
    return list(dict.fromkeys([module_name(name), base, f"{base}_generic"]))


def load_order(
    wanted: Sequence[str], depends: Mapping[str, Sequence[str]], builtin: Iterable[str] = ()
) -> list[str]:
    """Modules to insmod, dependencies first, for `wanted` and everything they need.

    `depends` maps each available (loadable) module to its depends= list. A wanted or needed
    module that is neither available nor built in is an error naming who needed it.
    """
    builtins = {module_name(b) for b in builtin}
    order: list[str] = []
    done: set[str] = set()
    active: list[str] = []

    def visit(name: str, needed_by: str) -> None:
        if name in done or name in builtins:
            return
        if name in active:
            cycle = " -> ".join([*active[active.index(name) :], name])
            raise ProvisionError(f"kernel module dependency cycle: {cycle}")
        if name not in depends:
            raise ProvisionError(
                f"kernel module {name!r} (needed by {needed_by}) is neither in the kernel's "
                "modules package nor built in; fix the recipe's module list"
            )
        active.append(name)
        for dep in depends[name]:
            visit(module_name(dep), name)
        active.pop()
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(module_name(name), "the recipe")
    return order


SIGNATURE_MAGIC = b"~Module signature appended~\n"
_SIGNATURE_INFO_SIZE = 12
"""struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], sig_len."""


def strip_signature(data: bytes, where: str = "module") -> bytes:
    """A module without its appended PKCS#7 signature (unchanged when it has none).

    Why: a signed module costs the guest an RSA verification per insmod, ~5 ms each under
    TCG (~45 ms for the boot modules). The kernel does not enforce signatures here
    (module.sig_enforce is off); it loads the module and marks itself tainted ('E')."""
    if not data.endswith(SIGNATURE_MAGIC):
        return data
    info_end = len(data) - len(SIGNATURE_MAGIC)
    info = data[info_end - _SIGNATURE_INFO_SIZE : info_end]
    sig_len = int.from_bytes(info[8:12], "big")
    start = info_end - _SIGNATURE_INFO_SIZE - sig_len
    if len(info) != _SIGNATURE_INFO_SIZE or start < 0 or not data.startswith(b"\x7fELF"):
        raise ProvisionError(f"{where}: malformed module signature (sig_len {sig_len})")
    return data[:start]


def hide_btf(data: bytes, where: str = "module") -> bytes:
    """A module whose .BTF section the kernel finds empty, so it does not load it.

    Why: the kernel parses its own BTF (~5 MB) the first time anything needs it, and a
    module's BTF does (~60 ms of TCG per boot). The image's command line also blacklists
    the built-in kfunc registrations that would parse it at boot; with both, no boot parses
    it. The guest runs no BPF."""
    return elf.empty_section(data, ".BTF", where)
