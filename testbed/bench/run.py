"""`testbed bench`: measure, then write bench.json, the table and the chart.

Order matters for fair ratios: the floor and the test bed boot alternate run by run on each
architecture, so a burst of load from someone else's job hits both sides alike. Every
sample records the 1-minute load average (the machine is shared).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed.bench import dax, measure, pmem
from testbed.bench.chart import draw_phases
from testbed.bench.report import (
    Figure,
    Report,
    Sample,
    Target,
    boot_phases,
    evaluate_targets,
    parse_loadavg,
    render_table,
)
from testbed.errors import ConfigError, TestbedError
from testbed.host.accel import choose_accel
from testbed.host.qemu import resolve_qemu
from testbed.images import DEFAULT_KERNEL, ensure_image, kernel_names
from testbed.machine.profiles import ARCHES
from testbed.profile import PROFILE_FILE, RESTORED
from testbed.profile import render as render_profile

E2E_TIMEOUT = 1800.0
SETUP_TIMEOUT = 600.0

TARGETS = (
    Target("boot-to-SSH x86_64 vs floor", "boot_vs_floor.x86_64", 1.2, "x"),
    Target("boot-to-SSH aarch64 vs floor", "boot_vs_floor.aarch64", 1.2, "x"),
    Target("boot-to-SSH x86_64", "boot_to_ssh.x86_64", 2.0, "s"),
    Target("boot-to-SSH aarch64", "boot_to_ssh.aarch64", 3.5, "s"),
    Target("restore-to-SSH x86_64 vs boot", "restore_vs_boot.x86_64", 0.5, "x"),
    Target("restore-to-SSH aarch64 vs boot", "restore_vs_boot.aarch64", 0.5, "x"),
    Target("cold-plug x86_64 vs floor", "coldplug_vs_floor.x86_64", 1.5, "x"),
    Target("cold-plug aarch64 vs floor", "coldplug_vs_floor.aarch64", 1.5, "x"),
    Target("hot-plug cycle x86_64", "hotplug_cycle.x86_64", 2.0, "s"),
    Target("hot-plug cycle aarch64", "hotplug_cycle.aarch64", 2.0, "s"),
    Target("make e2e, 2 workers, in x86_64 floors", "e2e_vs_floor.x86_64", 30.0, "x"),
    Target("restored scenario's median vs floor", "restored_median_vs_floor.x86_64", 0.5, "x"),
    Target("cached make setup", "setup.make_cached", 5.0, "s"),
)

Say = Callable[[str], None]

PHASE_NOTE = (
    "phases: 'firmware' runs from QMP cont to the kernel's printk time 0, so it also holds "
    "the kernel's own start-up before its clock runs (aarch64 virt has no firmware with "
    "-kernel); guest-clock points are tied to the host by a /dev/kmsg marker written by the "
    "first SSH command, accurate to about its round trip"
)


@dataclass(frozen=True)
class BenchOptions:
    output: Path
    runs: int = 5
    quick: bool = False
    """Skip the slow, network-bound parts: the e2e suite and the fresh builds."""
    arches: tuple[str, ...] = ARCHES
    accel: str = "auto"


def _load() -> float | None:
    try:
        return parse_loadavg(measure.read_loadavg())
    except (OSError, TestbedError):
        return None


class Collector:
    """Samples per figure name; failures become 'not measured' with the error."""

    def __init__(self, report: Report, say: Say) -> None:
        self.report = report
        self.say = say
        self.samples: dict[str, list[Sample]] = {}
        self.what: dict[str, str] = {}

    def take(self, name: str, what: str, action: Callable[[], float]) -> float | None:
        self.what[name] = what
        load = _load()
        try:
            seconds = action()
        except TestbedError as exc:
            self.report.skip(name, f"not measured: {exc}")
            self.say(f"  {name}: FAILED: {exc}")
            return None
        self.samples.setdefault(name, []).append(Sample(seconds, load))
        self.say(f"  {name}: {seconds:.2f} s (load {load})")
        return seconds

    def finish(self, notes: dict[str, str] | None = None) -> None:
        for name, samples in self.samples.items():
            note = (notes or {}).get(name, "")
            self.report.add(Figure(name, tuple(samples), self.what.get(name, ""), note))
        self.samples.clear()


def _inputs(arch: str, accel: str, kernel: str | None = None) -> measure.BootInputs:
    """What the floor boots for ``arch`` with ``kernel``'s image (None: the default)."""
    qemu = resolve_qemu(arch)
    choice = choose_accel(accel, arch, qemu.path)
    image = ensure_image(arch, log=None, kernel=kernel)
    return measure.BootInputs(
        arch,
        qemu.path,
        choice.name,
        Path(image.kernel),
        Path(image.initrd) if image.initrd else None,
        image.cmdline,
        image.ready_line,
    )


def _host_info(arches: Sequence[str], accel: str) -> tuple[dict[str, object], dict]:

    info: dict[str, object] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": measure.read_loadavg().strip(),
    }
    inputs = {}
    for arch in arches:
        qemu = resolve_qemu(arch)
        choice = choose_accel(accel, arch, qemu.path)
        image = ensure_image(arch, log=None)
        inputs[arch] = _inputs(arch, accel)
        info[arch] = {
            "qemu": str(qemu.path),
            "qemu_version": ".".join(map(str, qemu.version)),
            "accel": choice.name,
            "accel_reason": choice.reason,
            "image": image.content_hash,
            "cmdline": image.cmdline,
        }
    return info, inputs


def _boots(opts: BenchOptions, col: Collector, inputs: dict, logdir: Path) -> None:
    col.say("the snapshots restores start from (made now if missing, not timed)")
    for arch in opts.arches:
        measure.measure_restore(arch, inputs[arch].accel)
    col.say(f"floor vs test bed boot vs restore, {opts.runs} runs, alternating")
    for run in range(opts.runs):
        for arch in opts.arches:
            col.say(f" run {run + 1}/{opts.runs} {arch}")
            col.take(
                f"floor.{arch}",
                "bare QEMU (scripts/floor.py), Popen to the ready line",
                functools.partial(measure.measure_floor, inputs[arch], logdir),
            )
            col.take(
                f"boot_to_ssh.{arch}",
                "GuestVM start to the first SSH command's answer",
                functools.partial(measure.measure_boot, arch, inputs[arch].accel),
            )
            col.take(
                f"restore_to_ssh.{arch}",
                "GuestVM(restore=True) start (a fresh QEMU loading the snapshot of a booted "
                "guest with one root port) to the first SSH command's answer",
                functools.partial(measure.measure_restore, arch, inputs[arch].accel),
            )


def _other_kernels(opts: BenchOptions, col: Collector, logdir: Path) -> None:
    """Floor and boot to SSH with every kernel but the default (whose figures are the plain
    ``floor.ARCH`` / ``boot_to_ssh.ARCH``): each against the floor with the same kernel,
    so that which kernel is the default is decided by measurement (DEFAULT_KERNEL)."""
    for arch in opts.arches:
        for kernel in (k for k in kernel_names(arch) if k != DEFAULT_KERNEL):
            col.say(f"floor vs boot with kernel {kernel}, {arch}, {opts.runs} runs")
            inputs = _inputs(arch, opts.accel, kernel)
            for _ in range(opts.runs):
                col.take(
                    f"floor.{arch}.{kernel}",
                    f"bare QEMU to the ready line, kernel {kernel}",
                    functools.partial(measure.measure_floor, inputs, logdir),
                )
                col.take(
                    f"boot_to_ssh.{arch}.{kernel}",
                    f"GuestVM start to the first SSH command's answer, kernel {kernel}",
                    functools.partial(measure.measure_boot, arch, inputs.accel, kernel),
                )


def _pmem(opts: BenchOptions, col: Collector) -> None:
    """Guest sequential write and read of /dev/pmem0: ours, and QEMU's virtio-pmem-pci
    (x86_64) as the anchor; seconds for the same transfer, so ratio < 1 = ours faster."""
    col.say(f"pmem: sequential write and read of {pmem.CHUNK_MIB * pmem.REPEAT} MiB, "
            f"{opts.runs} runs")  # fmt: skip
    sides = [("", pmem.measure_ours)]
    if "x86_64" in opts.arches:
        sides.append((".qemu", pmem.measure_qemu_pmem))
    for arch in opts.arches:
        for suffix, fn in sides if arch == "x86_64" else sides[:1]:
            what = "our back-end's pmem" if not suffix else "QEMU's virtio-pmem-pci"
            done: list[pmem.PmemRun] = []

            def one(a: str = arch, f: Callable[[str, str], pmem.PmemRun] = fn,
                    done: list[pmem.PmemRun] = done) -> float:  # fmt: skip
                done.append(f(a, opts.accel))
                return done[-1].write_s

            def read(done: list[pmem.PmemRun] = done) -> float:
                return done[-1].read_s

            for _ in range(opts.runs):
                if col.take(f"pmem_write.{arch}{suffix}", f"{what}: dd write, O_DIRECT", one):
                    col.take(f"pmem_read.{arch}{suffix}", f"{what}: dd read, O_DIRECT", read)


def _coldplug(opts: BenchOptions, col: Collector, inputs: dict) -> None:

    col.say(f"cold-plug scenario ('two' regions), {opts.runs} runs")
    for arch in opts.arches:
        runs: list[measure.ColdplugRun] = []

        def one(a: str = arch, runs: list[measure.ColdplugRun] = runs) -> float:
            result = measure.measure_coldplug(a, inputs[a].accel)
            runs.append(result)
            if result.verdict:
                col.report.notes.append(f"coldplug.{a}: guest view mismatch: {result.verdict}")
            return result.seconds

        for _ in range(opts.runs):
            col.take(f"coldplug.{arch}", "GuestVM + inspect_pci + compare_layout + teardown", one)
        if runs:
            # The phases of the median run, so the chart shows a typical boot.
            typical = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
            try:
                col.report.phases[arch] = boot_phases(typical.observation)
                if PHASE_NOTE not in col.report.notes:
                    col.report.notes.append(PHASE_NOTE)
            except TestbedError as exc:
                col.report.skip(f"phases.{arch}", f"not measured: {exc}")


def _setup_steps(opts: BenchOptions, col: Collector, logdir: Path) -> None:
    runs = max(1, min(opts.runs, 3))
    col.say(f"set-up steps, cached ({runs} runs)")
    for _ in range(runs):
        col.take(
            "images.cached",
            "testbed images build --arch all, everything cached",
            lambda: measure.measure_command(
                measure.testbed_command("images", "build", "--arch", "all"),
                logdir / "images-cached.log",
                SETUP_TIMEOUT,
            ),
        )
        col.take(
            "qemu.cached",
            "testbed qemu provision, already provisioned",
            lambda: measure.measure_command(
                measure.testbed_command("qemu", "provision"),
                logdir / "qemu-cached.log",
                SETUP_TIMEOUT,
            ),
        )
        col.take(
            "setup.make_cached",
            "make setup with everything in place",
            lambda: measure.measure_command(
                ["make", "setup"], logdir / "make-setup.log", SETUP_TIMEOUT
            ),
        )
    if opts.quick:
        for name in ("images.fresh", "qemu.fresh"):
            col.report.skip(name, "not measured: --quick skips the fresh builds")
        return
    col.say("set-up steps, fresh (1 run each: network-bound)")
    with measure.FreshCache(reuse_debs=True) as fresh:
        col.take(
            "images.fresh",
            "testbed images build --arch all into a new cache (downloaded .debs hard-linked "
            "in; apt-get update and everything else fresh)",
            lambda: measure.measure_command(
                measure.testbed_command("images", "build", "--arch", "all"),
                logdir / "images-fresh.log",
                SETUP_TIMEOUT,
                env=fresh.env(),
            ),
        )
    with measure.FreshCache(reuse_debs=False) as fresh:
        col.take(
            "qemu.fresh",
            "testbed qemu provision into a new cache (mmdebstrap of the sid sysroot)",
            lambda: measure.measure_command(
                measure.testbed_command("qemu", "provision"),
                logdir / "qemu-fresh.log",
                SETUP_TIMEOUT,
                env=fresh.env(),
            ),
        )


def _suite(opts: BenchOptions, col: Collector, logdir: Path) -> dict[str, str]:
    notes: dict[str, str] = {}
    if opts.quick:
        for name in ("e2e.workers1", "e2e.workers2"):
            col.report.skip(name, "not measured: --quick skips the e2e suite")
        return notes
    for workers in (1, 2):
        name = f"e2e.workers{workers}"
        col.say(f"make e2e with {workers} worker(s): pytest scenarios -n {workers}")
        summary: list[str] = []

        def one(w: int = workers, summary: list[str] = summary) -> float:
            seconds, line = measure.measure_suite(w, opts.output, logdir, E2E_TIMEOUT)
            summary.append(line)
            return seconds

        col.take(name, f"pytest scenarios -n {workers} (what make e2e runs), both arches", one)
        if summary:
            notes[name] = f"1 run (minutes each); pytest: {summary[0]}"
    _suite_profile(col, opts.output / "bench-e2e-n2" / PROFILE_FILE)
    return notes


def _suite_profile(col: Collector, path: Path) -> None:
    """Where the 2-worker suite's scenario time went (its results/profile.json): the
    restored scenarios' median as a figure, the totals by phase as notes."""
    try:
        summary = json.loads(path.read_text())["summary"]
    except (OSError, ValueError, KeyError) as exc:
        col.report.skip("e2e.restored_median", f"not measured: no suite profile ({exc})")
        return
    restored = summary.get("by_start", {}).get(RESTORED)
    if restored:
        col.take(
            "e2e.restored_median",
            f"the median restored scenario of the 2-worker suite ({restored['runs']} runs): "
            "restore, SSH, its plug, its work and its teardown",
            lambda: float(restored["median"]),
        )
    col.report.notes.extend(f"suite profile: {line}" for line in render_profile(summary))


def _samples(col: Collector, name: str, what: str, action: Callable[[], list[float]]) -> None:
    """Several samples from one boot (cycles on one guest): all or none are recorded."""
    col.what[name] = what
    load = _load()
    try:
        values = action()
    except TestbedError as exc:
        col.report.skip(name, f"not measured: {exc}")
        col.say(f"  {name}: FAILED: {exc}")
        return
    col.samples.setdefault(name, []).extend(Sample(v, load) for v in values)
    col.say(f"  {name}: {', '.join(f'{v:.2f}' for v in values)} s (load {load})")


def _hotplug_and_datapath(opts: BenchOptions, col: Collector) -> None:
    col.say(f"hot-plug/unplug cycles and map/unmap round trips, {opts.runs} in one boot")
    for arch in opts.arches:
        _samples(
            col,
            f"hotplug_cycle.{arch}",
            "one root port, {0: 4M}: plug until the guest binds it, unplug until the guest "
            "drops it and the back-end sees the close (cycles in one boot)",
            functools.partial(measure.measure_hotplug_cycles, arch, opts.accel, opts.runs),
        )
    if "x86_64" in opts.arches:
        _samples(
            col,
            "map_unmap.x86_64",
            "SHMEM_MAP, guest reads it via BAR 4, SHMEM_UNMAP, guest reads it empty "
            "(rounds in one boot, device at DRIVER_OK)",
            functools.partial(measure.measure_map_unmap, "x86_64", opts.accel, opts.runs),
        )
    col.report.notes.append(
        "hot-plug cycles run on a restored guest; on aarch64 (native pciehp) the guest "
        "ejects the device itself after device_del (slot power-off), the path an OS takes "
        "for a software eject; scenarios/test_hotplug.py::test_unplug_by_attention_button "
        "keeps pciehp's 5 s attention-button path covered"
    )


DAX_WHAT = {
    "ours_dax": "our virtio-fs back-end, -o dax=always (64 MiB window): SETUPMAPPING -> "
    "SHMEM_MAP, then the guest copies from the window",
    "ours_nodax": "our virtio-fs back-end without a window: FUSE_READ requests",
    "virtiofsd": "virtiofsd (Debian sid) behind the relay, no window: FUSE_READ requests",
}


def _dax_reads(opts: BenchOptions, col: Collector) -> None:
    col.say(f"virtio-fs: a sequential read of {dax.FILE_SIZE >> 20} MiB after mount, DAX "
            f"vs not, {opts.runs} runs per file server in one boot")  # fmt: skip
    for arch in opts.arches:
        # One boot measures all three; cache() keeps its result for the three figures.
        measured = functools.cache(functools.partial(dax.measure_dax_reads, arch,
                                                     opts.accel, opts.runs))  # fmt: skip
        for server in dax.SERVERS:
            _samples(
                col,
                f"dax_read.{server}.{arch}",
                f"dd bs=1M of a {dax.FILE_SIZE >> 20} MiB file, first read after mount, timed "
                f"by the guest ({dax.KERNEL} kernel): {DAX_WHAT[server]}",
                lambda s=server, m=measured: m()[s],  # type: ignore[misc]
            )


def run_bench(opts: BenchOptions, say: Say = print) -> Report:
    """Measure everything (see the issue), in one run; returns the report."""
    if opts.runs < 1:
        raise ConfigError(f"--runs {opts.runs}: give at least 1 (5 is the default)")
    logdir = opts.output / "bench-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    host, inputs = _host_info(opts.arches, opts.accel)
    report = Report(
        started=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        host=host,
        options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
    )
    col = Collector(report, say)
    try:
        _boots(opts, col, inputs, logdir)
        _other_kernels(opts, col, logdir)
        _coldplug(opts, col, inputs)
        _hotplug_and_datapath(opts, col)
        _pmem(opts, col)
        _dax_reads(opts, col)
        col.finish()
        _setup_steps(opts, col, logdir)
        col.finish()
        col.finish(_suite(opts, col, logdir))
    except BaseException as exc:
        col.finish()
        report.notes.append(f"incomplete: interrupted by {type(exc).__name__}: {exc}")
        raise
    finally:
        for arch in opts.arches:
            report.add_ratio(f"boot_vs_floor.{arch}", f"boot_to_ssh.{arch}", f"floor.{arch}")
            for kernel in (k for k in kernel_names(arch) if k != DEFAULT_KERNEL):
                report.add_ratio(
                    f"boot_vs_floor.{arch}.{kernel}",
                    f"boot_to_ssh.{arch}.{kernel}",
                    f"floor.{arch}.{kernel}",
                )
            report.add_ratio(f"coldplug_vs_floor.{arch}", f"coldplug.{arch}", f"floor.{arch}")
            report.add_ratio(
                f"restore_vs_boot.{arch}", f"restore_to_ssh.{arch}", f"boot_to_ssh.{arch}"
            )
            # Below 1: the read through DAX took that fraction of the other's time.
            for other in ("ours_nodax", "virtiofsd"):
                report.add_ratio(f"dax_vs_{other}.{arch}", f"dax_read.ours_dax.{arch}",
                                 f"dax_read.{other}.{arch}")  # fmt: skip
        for way in ("write", "read"):
            report.add_ratio(
                f"pmem_{way}_vs_qemu.x86_64", f"pmem_{way}.x86_64", f"pmem_{way}.x86_64.qemu"
            )
        # The suite in floors: hosts differ from day to day, the ratio travels.
        report.add_ratio("e2e_vs_floor.x86_64", "e2e.workers2", "floor.x86_64")
        report.add_ratio("restored_median_vs_floor.x86_64", "e2e.restored_median", "floor.x86_64")
        report.add_ratio("e2e.workers1_vs_workers2", "e2e.workers1", "e2e.workers2")
        report.targets = evaluate_targets(TARGETS, report.figures, report.ratios)
        report.host["loadavg_end"] = measure.read_loadavg().strip()
        write_outputs(report, opts.output, say)
    return report


def write_outputs(report: Report, output: Path, say: Say) -> None:
    """bench.json, bench.txt (the table) and bench-boot.png (the phases)."""

    output.mkdir(parents=True, exist_ok=True)
    if report.phases:
        try:
            png = draw_phases(
                report.phases,
                output / "bench-boot.png",
                "Where the time goes in one boot (cold-plug scenario, median run)",
            )
            report.host["chart"] = str(png)
        except TestbedError as exc:
            report.skip("chart", f"not drawn: {exc}")
    (output / "bench.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    table = render_table(report)
    (output / "bench.txt").write_text(table)
    say("")
    say(table.rstrip())
    say(f"\nwrote {output / 'bench.json'}, {output / 'bench.txt'}")
