"""pytest plugin for the end-to-end scenarios: options, the arch matrix, artifacts, the table.

Loaded by scenarios/conftest.py. What it adds:

- ``--arch x86_64,aarch64`` and ``--accel auto|kvm|tcg``: the matrix. Every test that takes
  the ``arch`` fixture runs once per architecture; a test id ends in ``[x86_64]``.
- ``artifacts``: a directory per test under ``results/artifacts/<test id>/``, kept when the
  test fails (or is an expected failure, whose artifacts document a QEMU bug) and removed
  when it passes, unless ``--keep-artifacts``. Its path is printed with the failure.
- ``run_dir``: a private 0700 scratch directory (sockets, keys) removed after the test.
- A pass/fail table by scenario x architecture at the end of the run, and JUnit XML under
  results/junit.xml where every test case carries the inputs it ran with as properties:
  ``arch``, ``accel`` (and why), ``qemu-version``, ``qemu-binary``, ``image-hash``,
  ``kernel`` (its name and release). ``--kernel NAME`` picks the guest kernel.
- Spec conformance from the back-end's side: requests QEMU sent without the feature that
  allows them (Backend.violations) fail the test, listed in its report and in the
  ``vhost-user-violations`` property, unless the test marks them expected with
  ``@pytest.mark.expect_violations``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from testbed import paths
from testbed.artifacts import write_script
from testbed.bugs.rerun import reproduce_script
from testbed.device import (
    BackendChoice,
    ForeignCommand,
    OurBackend,
    VhostUserDevice,
    backend_choice,
    parse_device_options,
)
from testbed.errors import ConfigError, HostCapabilityError
from testbed.machine.profiles import ARCHES
from testbed.plugging import PluggedDevice
from testbed.shared_boot import SharedGroup, SharedPool
from testbed.vm import GuestOptions, GuestVM

pytest_plugins = ("testbed.bugs.marks", "testbed.run_report")

_ARTIFACTS_KEY = pytest.StashKey[Path]()
_KEEP_KEY = pytest.StashKey[bool]()
_FAILED_KEY = pytest.StashKey[bool]()
_POOL_KEY = pytest.StashKey[SharedPool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("testbed", "testbed end-to-end scenarios")
    group.addoption(
        "--arch",
        default=os.environ.get("TESTBED_ARCH", ",".join(ARCHES)),
        help="comma-separated guest architectures (default: x86_64,aarch64; env TESTBED_ARCH)",
    )
    group.addoption(
        "--accel",
        default=os.environ.get("TESTBED_ACCEL", "auto"),
        choices=("auto", "kvm", "tcg"),
        help="accelerator (default: auto = KVM only where it really works; env TESTBED_ACCEL)",
    )
    group.addoption(
        "--kernel",
        default=os.environ.get("TESTBED_KERNEL"),
        metavar="NAME",
        help="the guest kernel (a recipe kernel: 6.1, 6.12; default: the images' default; "
        "a scenario that needs a given kernel names it itself; env TESTBED_KERNEL)",
    )
    group.addoption(
        "--backend-cmd",
        default=os.environ.get("TESTBED_BACKEND_CMD"),
        metavar="'PROGRAM ARGS... {socket}'",
        help="run the scenarios that make sense for it against your back-end (started by us, "
        "behind the relay); the others are deselected. {share} and {tag} in it become a "
        "virtio-fs scenario's share and tag (env TESTBED_BACKEND_CMD)",
    )
    group.addoption(
        "--backend-socket",
        default=os.environ.get("TESTBED_BACKEND_SOCKET"),
        metavar="PATH",
        help="the same with a back-end already listening on PATH (env TESTBED_BACKEND_SOCKET)",
    )
    group.addoption(
        "--backend-device",
        default=os.environ.get("TESTBED_BACKEND_DEVICE", ""),
        metavar="virtio_id=N,num_vqs=N,vq_size=N,config_size=N",
        help="what the device must look like for your back-end (env TESTBED_BACKEND_DEVICE)",
    )
    group.addoption(
        "--fresh-boot",
        action="store_true",
        default=os.environ.get("TESTBED_FRESH_BOOT", "") not in ("", "0"),
        help="boot every guest; by default a scenario without a cold-plugged device starts "
        "from a saved, booted guest (testbed.snapshot) and hot-plugs its device (env "
        "TESTBED_FRESH_BOOT=1)",
    )
    group.addoption(
        "--isolated-boots",
        action="store_true",
        default=os.environ.get("TESTBED_ISOLATED_BOOTS", "") not in ("", "0"),
        help="boot every cold-plug layout in a guest of its own; by default layouts of one "
        "shared group (@pytest.mark.shared_boot) share one boot (env TESTBED_ISOLATED_BOOTS=1)",
    )
    group.addoption(
        "--keep-artifacts",
        action="store_true",
        default=bool(os.environ.get("TESTBED_KEEP_ARTIFACTS")),
        help="keep every test's artifacts, not only those of failures",
    )


def selected_arches(config: pytest.Config) -> list[str]:
    value = str(config.getoption("--arch"))
    arches = [a.strip() for a in value.split(",") if a.strip()]
    unknown = [a for a in arches if a not in ARCHES]
    if unknown or not arches:
        raise pytest.UsageError(
            f"--arch {value!r}: unknown architecture {unknown}; choose from {', '.join(ARCHES)}"
        )
    return arches


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_POOL_KEY] = SharedPool()
    results = paths.results_dir()
    # A --collect-only (the nightly's listing) must not replace the last run's report.
    collecting = config.option.collectonly
    if not config.option.xmlpath and not hasattr(config, "workerinput") and not collecting:
        results.mkdir(parents=True, exist_ok=True)
        config.option.xmlpath = str(results / "junit.xml")
    config.addinivalue_line("markers", "arches(*names): run only on these architectures")
    config.addinivalue_line(
        "markers",
        "foreign_backend: makes sense for a back-end we did not write (no fault injection, "
        "nothing asked of our back-end's internals); run with --backend-cmd/--backend-socket",
    )
    config.addinivalue_line(
        "markers", "expect_violations: QEMU is meant to break a vhost-user rule in this test"
    )
    config.addinivalue_line(
        "markers",
        "kernel_arches({kernel: arches}): run with each guest kernel on the architectures "
        "named for it (the test takes `kernel`)",
    )
    config.addinivalue_line(
        "markers",
        "shared_boot(group): a cold-plug layout that may share one boot with its group "
        "(the `shared` fixture); --isolated-boots boots each alone",
    )


@dataclass(frozen=True)
class UserBackend:
    """The user's own back-end (--backend-cmd/--backend-socket, --backend-device): it
    stands where ours would for every device a scenario plugs."""

    choice: BackendChoice
    options: dict[str, int]

    def serve(self, device: VhostUserDevice) -> VhostUserDevice:
        """``device`` served by the user's back-end; a command template's ``{share}``,
        ``{tag}`` (virtio-fs) or ``{backing}`` (pmem) become what our back-end would have
        served for it (the scenario's own share: its files are the ones it checks)."""
        choice = self.choice
        ours = device.backend
        if isinstance(choice, ForeignCommand) and isinstance(ours, OurBackend) and ours.model:
            choice = choice.filled(ours.model.template_values())
        return dataclasses.replace(device, backend=choice, **self.options)  # type: ignore[arg-type]


def user_backend(config: pytest.Config) -> UserBackend | None:
    """The user's own back-end, or None when none was given (a usage error names what is
    wrong with the options)."""
    try:
        choice = backend_choice(
            config.getoption("--backend-cmd"), config.getoption("--backend-socket")
        )
        options = parse_device_options(str(config.getoption("--backend-device") or ""))
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    if isinstance(choice, OurBackend):
        if options:
            raise pytest.UsageError("--backend-device describes your back-end's device: "
                                    "give --backend-cmd or --backend-socket too")  # fmt: skip
        return None
    return UserBackend(choice, options)


def shared_key(item: pytest.Item) -> tuple[str, str] | None:
    """(group, arch) of a test marked shared_boot(group); None for any other test."""
    marker = item.get_closest_marker("shared_boot")
    callspec = getattr(item, "callspec", None)
    if marker is None or callspec is None:
        return None
    return str(marker.args[0]), str(callspec.params.get("arch", "-"))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks we add
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A shared boot's tests run back to back on one xdist worker (with --dist loadgroup):
    one boot for the group. With a foreign back-end, only the scenarios marked
    foreign_backend make sense."""
    # Each group's tests together, where its first one was: its boot closes after its last.
    order: dict[tuple[str, str] | None, int] = {}
    for index, item in enumerate(items):
        key = shared_key(item)
        order.setdefault(key, index)
        if key is not None:
            item.add_marker(pytest.mark.xdist_group(f"shared-{key[0]}-{key[1]}"))
    ranked = {id(item): (order[k] if (k := shared_key(item)) is not None else i, i)
              for i, item in enumerate(items)}  # fmt: skip
    items.sort(key=lambda item: ranked[id(item)])
    if user_backend(config) is None:
        return
    keep = [i for i in items if i.get_closest_marker("foreign_backend") is not None]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "arch" not in metafunc.fixturenames:
        return
    arches = selected_arches(metafunc.config)
    marker = metafunc.definition.get_closest_marker("arches")
    if marker is not None:
        arches = [a for a in arches if a in marker.args]
    kernels = metafunc.definition.get_closest_marker("kernel_arches")
    if kernels is None:
        metafunc.parametrize("arch", arches)
        return
    # Only the (arch, kernel) pairs that exist: no item for a pair that cannot run.
    pairs = [(a, k) for k, on in kernels.args[0].items() for a in arches if a in on]
    metafunc.parametrize(("arch", "kernel"), pairs, ids=[f"{a}-{k}" for a, k in pairs])


@pytest.fixture
def accel(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--accel"))


class Boot(Protocol):
    def __call__(
        self,
        *devices: VhostUserDevice,
        plug: str = "cold",
        restore: bool | None = None,
        **options: Any,
    ) -> GuestVM: ...


@pytest.fixture
def boot(
    request: pytest.FixtureRequest, arch: str, accel: str, artifacts: Path
) -> Generator[Boot, None, None]:
    """``boot(*devices, plug="cold", restore=None, **GuestOptions) -> GuestVM``: a started
    guest with ``devices``, torn down after the test.

    Artifacts go to the test's artifacts dir (one sub-dir per VM when a test boots several).
    With --backend-cmd/--backend-socket every device is served by the user's back-end. A KVM
    that this host cannot run (kvm_pvm, foreign arch, no /dev/kvm) skips the test with the
    reason: a missing host capability, not a missing feature.
    """
    vms: list[GuestVM] = []
    theirs = user_backend(request.config)
    fresh = bool(request.config.getoption("--fresh-boot"))
    kernel = request.config.getoption("--kernel")

    def _boot(
        *devices: VhostUserDevice, plug: str = "cold", restore: bool | None = None, **options: Any
    ) -> GuestVM:
        logdir = artifacts if not vms else artifacts / f"vm{len(vms)}"
        if theirs is not None:
            devices = tuple(theirs.serve(d) for d in devices)
        options.setdefault("kernel", kernel)
        # Boot once, restore many: a guest without a cold-plugged device is restored from
        # its snapshot (restore=None: GuestVM decides) unless the scenario or the user asks
        # for a real boot.
        vm = GuestVM(
            arch,
            *devices,
            plug=plug,
            options=GuestOptions(**options),
            accel=accel,
            artifacts_dir=logdir,
            restore=False if fresh else restore,
        )
        vms.append(vm)
        try:
            vm.start()
        except HostCapabilityError as exc:
            if accel == "kvm":
                pytest.skip(f"host capability missing: {exc}")
            raise
        finally:
            record_run_inputs(request.node, vm)
        return vm

    yield _boot
    failed = request.node.stash.get(_FAILED_KEY, False)
    for vm in reversed(vms):
        vm.close(failed=failed)
    violations = [
        f"{v.request}: {v.rule}: {v.detail}"
        for vm in vms
        for backend in vm.served_by  # cold- and hot-plugged, ours and relays, restarted too
        for v in backend.violations
    ]
    if violations:
        request.node.user_properties.append(("vhost-user-violations", "; ".join(violations)))
        if request.node.get_closest_marker("expect_violations") is None and not failed:
            pytest.fail(
                "vhost-user spec violations (front-end or back-end side, see the trace):\n  "
                + "\n  ".join(violations),
                pytrace=False,
            )


@dataclass
class Shared:
    """``shared.boot(group, name) -> (vm, plugged)``: the guest with ``group``'s device
    ``name`` cold-plugged, in the group's shared boot or alone (--isolated-boots, or when
    the shared boot failed: the failure is then pinned to the layout that causes it)."""

    request: pytest.FixtureRequest
    arch: str
    accel: str
    alone: Boot
    artifacts: Path
    pool: SharedPool
    used: list[tuple[GuestVM, PluggedDevice]] = field(default_factory=list)

    def boot(self, group: SharedGroup, name: str) -> tuple[GuestVM, PluggedDevice]:
        config = self.request.config
        theirs = user_backend(config)
        options = {"kernel": config.getoption("--kernel"), **group.options}
        live = None
        if not config.getoption("--isolated-boots"):
            # One directory per xdist worker: should a group ever be split across workers
            # (see pyproject's pytest pin), two shared boots must not share logs.
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            logdir = (
                paths.results_dir()
                / "shared"
                / paths.sanitize(f"{group.name}-{self.arch}-{worker}")
            )

            def start(devices: tuple[VhostUserDevice, ...], where: Path) -> GuestVM:
                if theirs is not None:
                    devices = tuple(theirs.serve(d) for d in devices)
                shutil.rmtree(where, ignore_errors=True)
                vm = GuestVM(self.arch, *devices, options=GuestOptions(**options),
                             accel=self.accel, artifacts_dir=where)  # fmt: skip
                return vm.start()

            live = self.pool.get(group, self.arch, logdir, start)
        node = self.request.node
        if live is None:
            why = self.pool.broken.get((group.name, self.arch), "--isolated-boots")
            node.user_properties.append(("boot", f"alone ({why})"))
            vm = self.alone(group.device(name), **options)
            return vm, vm.plugged[0]
        node.user_properties.append(
            ("boot", f"shared by {len(live.by_name)} layouts of {group.name}: {live.vm.logdir}")
        )
        record_run_inputs(node, live.vm)
        self.used.append((live.vm, live.by_name[name]))
        return live.vm, live.by_name[name]

    def finish(self) -> list[str]:
        """Each test's own share of the shared boot: its logs in its artifacts dir, and the
        rules its own device's back-end saw broken."""
        violations = []
        for vm, plugged in self.used:
            if vm.logdir is not None:
                shutil.copytree(vm.logdir, self.artifacts / "shared-boot", dirs_exist_ok=True)
            violations += [
                f"{v.request}: {v.rule}: {v.detail}" for v in plugged.endpoint.violations
            ]
        return violations


@pytest.fixture
def shared(
    request: pytest.FixtureRequest,
    arch: str,
    accel: str,
    boot: Boot,
    artifacts: Path,
) -> Iterator[Shared]:
    handle = Shared(request, arch, accel, boot, artifacts, request.config.stash[_POOL_KEY])
    yield handle
    violations = handle.finish()
    failed = request.node.stash.get(_FAILED_KEY, False)
    if violations and not failed:
        pytest.fail("vhost-user spec violations:\n  " + "\n  ".join(violations), pytrace=False)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """pytest-xdist's loadgroup appends '@group' to each grouped test's node id so that its
    scheduler sees the groups. Once the worker has sent its collection (xdist's own
    collection_finish, before this one), the ids go back to what pytest knows: reports,
    the result table, JUnit and reproduce.sh name the test as `pytest NODEID` accepts it."""
    if not hasattr(session.config, "workerinput"):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") is not None:
            plain = item._nodeid.rsplit("@", 1)[0] if "@" in item._nodeid else item._nodeid
            item._nodeid = plain


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """A shared boot ends with the last of its group's tests on this worker (after the
    test's own fixtures: trylast)."""
    key = shared_key(item)
    if key is not None and (nextitem is None or shared_key(nextitem) != key):
        item.config.stash[_POOL_KEY].close(failed=item.stash.get(_FAILED_KEY, False))


def record_run_inputs(node: pytest.Item, vm: GuestVM) -> None:
    """The inputs a test case ran with, as JUnit properties (once per name)."""
    have = {name for name, _ in node.user_properties}
    found: list[tuple[str, object]] = [("arch", vm.arch)]
    if vm.accel is not None:
        found += [("accel", vm.accel.name), ("accel-reason", vm.accel.reason)]
    if vm.qemu_binary is not None:
        found += [
            ("qemu-version", vm.qemu_binary.version_str),
            ("qemu-binary", str(vm.qemu_binary.path)),
        ]
    if vm.image is not None:
        found.append(("image-hash", vm.image.content_hash))
        found.append(("kernel", f"{vm.image.kernel_name} ({vm.image.kernel_release})"))
    found.append(("guest-start", "restored" if vm.restore else "booted"))
    if vm.snapshot is not None:
        found.append(("snapshot", str(vm.snapshot.state)))
    node.user_properties.extend((k, v) for k, v in found if k not in have)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A private 0700 scratch dir (sockets, keys), always removed after the test."""
    path = paths.make_private_dir("run")
    try:
        yield path
    finally:
        paths.remove_tree(path)


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Iterator[Path]:
    """results/artifacts/<test id>/: kept on failure, removed on success."""
    base = paths.results_dir() / "artifacts"
    path = base / paths.sanitize(request.node.name)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    request.node.stash[_ARTIFACTS_KEY] = path
    yield path
    # The decision to keep happens in pytest_runtest_makereport (it sees the outcome).


# Outermost: it sees the report after testbed.bugs.marks judged a known bug.
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[_FAILED_KEY] = True
    path = item.stash.get(_ARTIFACTS_KEY, None)
    if path is None:
        return report
    interesting = report.failed or hasattr(report, "wasxfail")
    if interesting and path.exists():
        report.sections.append(("testbed artifacts", f"kept in {path}"))
        item.stash[_KEEP_KEY] = True
        if report.when == "call":
            write_reproducer(path, item, report)
    if report.when == "teardown":
        keep = item.stash.get(_KEEP_KEY, False) or item.config.getoption("--keep-artifacts")
        if not keep:
            shutil.rmtree(path, ignore_errors=True)
        elif report.passed and path.exists():
            # Teardown ran after the failure was reported: say it once more at the end.
            report.user_properties.append(("artifacts", str(path)))
    return report


def write_reproducer(path: Path, item: pytest.Item, report: pytest.TestReport) -> None:
    """reproduce.sh beside the evidence: reruns this very scenario (testbed.bugs.rerun)."""
    props = dict(item.user_properties)
    about = [f"QEMU {props.get('qemu-version', '?')} ({props.get('qemu-binary', '?')}), "
             f"{props.get('arch', '?')}, {props.get('accel', '?')}"]  # fmt: skip
    if hasattr(report, "wasxfail"):
        about.append(f"Expected failure: {report.wasxfail}")
    else:
        about.append("Failed: " + str(report.longrepr).strip().splitlines()[-1][:300])
    write_script(path / "reproduce.sh", reproduce_script(item.nodeid, "\n".join(about)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """For the avocado nightly job: exit $TESTBED_EXIT_ON_ALL_SKIPPED when every test skipped.

    Avocado's exec-test runner maps that status to SKIP, so a scenario skipped for a missing
    host capability (no usable KVM) shows as SKIP there, not as a PASS.
    """
    session.config.stash[_POOL_KEY].close()
    code = os.environ.get("TESTBED_EXIT_ON_ALL_SKIPPED")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not code or reporter is None or exitstatus != 0:
        return
    stats = reporter.stats
    ran = sum(len(stats.get(k, [])) for k in ("passed", "failed", "error", "xfailed", "xpassed"))
    if ran == 0 and stats.get("skipped"):
        session.exitstatus = int(code)
