"""Per-architecture facts the QEMU command line is built from (pure data, no I/O).

Each profile records what was measured to boot a tiny Debian guest quickly on QEMU 11.1
(see docs/ARCHITECTURE.md and the platform facts): machine type, CPU model per accelerator,
serial console name, and the PCI slots we use on the root bus.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.errors import ConfigError


@dataclass(frozen=True)
class ArchProfile:
    """How to build a VM of one architecture."""

    arch: str
    machine: str
    """-machine type; `memory-backend=mem` is appended by the builder."""
    tcg_cpu: str
    kvm_cpu: str
    console: str
    """Guest serial device for `console=`."""
    root_bus: str
    """Name of the PCIe root bus, where cold-plugged devices go."""
    # Slots on the root bus. Explicit addresses keep BDFs stable across runs so that
    # captured dumps, logs and scenario expectations line up.
    net_slot: int = 0x02
    rng_slot: int = 0x03
    first_root_port_slot: int = 0x08
    first_device_slot: int = 0x10
    max_device_slot: int = 0x1E
    """q35 keeps 0x1f for the ICH9 LPC/SATA/SMBus functions."""
    ram_base: int = 0
    """Guest-physical address where RAM starts (q35: 0; virt: 1 GiB)."""
    native_pcie_hotplug: bool = False
    """Root ports use native PCIe hot-plug (pciehp, attention button) rather than ACPI."""
    tcg_kernel_args: tuple[str, ...] = ()
    """Kernel arguments added under TCG only: they skip boot work that costs real time
    when every instruction is emulated and nothing under KVM."""


PROFILES: dict[str, ArchProfile] = {
    # x86_64: q35 with direct PVH boot of the decompressed vmlinux (no bzImage
    # decompression under TCG). `max` was measured against `qemu64`: see the report.
    "x86_64": ArchProfile(
        arch="x86_64",
        machine="q35",
        tcg_cpu="max",
        kvm_cpu="host",
        console="ttyS0",
        root_bus="pcie.0",
        # Measured under TCG on 6.1 (printk times, -smp 1), each is boot work the test bed
        # does not need and KVM does not pay:
        # - noapictimer: the LAPIC timer calibration waits 100 ms of wall-clock ticks (TCG
        #   has no TSC-deadline timer to skip it); HPET serves as the clock event instead.
        #   MSI/MSI-X delivery through the local APIC is untouched.
        # - noreplace-smp: a 1-CPU kernel rewrites its ~40k LOCK prefixes with one
        #   text_poke (temporary mm, TLB flush) each, ~0.15 s of TCG; the prefixes stay.
        tcg_kernel_args=("noapictimer", "noreplace-smp"),
    ),
    # aarch64: no pointer authentication under TCG. The architected QARMA made boots 3-4x
    # slower (8-10 s); pauth-impdef=on still cost ~1.1 s of QEMU CPU per boot over
    # pauth=off (median of 5: 3.9 s vs 2.8 s), since every kernel function signs and
    # authenticates its return address. The guest then sees a CPU without FEAT_PAuth,
    # which does not matter for PCI/virtio tests.
    "aarch64": ArchProfile(
        arch="aarch64",
        machine="virt",
        tcg_cpu="max,pauth=off",
        kvm_cpu="host",
        console="ttyAMA0",
        root_bus="pcie.0",
        ram_base=0x4000_0000,
        native_pcie_hotplug=True,
    ),
}


ARCHES: tuple[str, ...] = tuple(PROFILES)
"""Every guest architecture the test bed knows, in the order reports list them."""


def profile_for(arch: str) -> ArchProfile:
    """The profile of `arch`, or ConfigError naming the supported ones."""
    try:
        return PROFILES[arch]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ConfigError(f"unknown architecture {arch!r}: use one of {known}") from None
