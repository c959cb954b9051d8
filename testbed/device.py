"""The device model: one typed description of a vhost-user device (pure, no I/O).

A scenario (or a CLI option) names a device once, with what serves it (``backend``: our
back-end with its faults, or one we did not write); the same object then travels whole to
QEMU's command line or QMP's chardev-add/device_add, to the back-end, to the verdict's
expectation and to reproduce.sh. Where it sits (chardev id, socket, bus) is filled in by
the VM that plugs it (``placed``). A layout is parsed and checked here, at the edge, against
QEMU's limits (testbed.limits), and travels as one immutable ShmemLayout from then on.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from testbed import limits
from testbed.errors import ConfigError
from testbed.vhost_user.faults import NO_FAULTS, Faults

DEVICE_TYPE = "vhost-user-test-device-pci"
# The test device needs a virtio-id from QEMU's own name table; ids outside it abort QEMU
# 11.1.3 with an assertion. 26 (virtio-fs) is known good, and no guest driver binds to it
# unless a scenario loads one.
DEFAULT_VIRTIO_ID = 26


@dataclass(frozen=True)
class BaseDevice:
    """A QEMU device built on vhost-user-base that asks the back-end for shared memory
    (GET_SHMEM_CONFIG): its fixed queue count, whether it refuses a back-end without
    PROTOCOL_F_CONFIG, and whether the guest sees the regions (only the test device puts
    them in a BAR; the others keep them inside QEMU). Measured on QEMU 11.1.3."""

    type: str
    queues: int
    needs_config: bool = False
    shmem_bar: bool = False


VHOST_USER_BASE_DEVICES: dict[str, BaseDevice] = {
    d.type: d
    for d in (
        BaseDevice(DEVICE_TYPE, 1, shmem_bar=True),
        BaseDevice("vhost-user-rng-pci", 1),
        BaseDevice("vhost-user-gpio-pci", 2, needs_config=True),
        BaseDevice("vhost-user-i2c-pci", 1),
        BaseDevice("vhost-user-input-pci", 2, needs_config=True),
        BaseDevice("vhost-user-snd-pci", 4, needs_config=True),
        BaseDevice("vhost-user-spi-pci", 1, needs_config=True),
        BaseDevice("vhost-user-rtc-pci", 2),
    )
}
"""Every device QEMU 11.1 builds on vhost-user-base with shared-memory support (`--device`
takes these; vhost-user-scmi, -vsock, -blk, -gpu and -fs are not built on it and never
ask). Whether a given QEMU binary has each is testbed.machine.probe's question."""


def base_devices_in(types: set[str]) -> list[str]:
    """The vhost-user-base devices with shared memory among QEMU's ``types``, in table order."""
    return [name for name in VHOST_USER_BASE_DEVICES if name in types]


def base_device(device_type: str) -> BaseDevice:
    try:
        return VHOST_USER_BASE_DEVICES[device_type]
    except KeyError:
        known = ", ".join(VHOST_USER_BASE_DEVICES)
        raise ConfigError(f"device {device_type!r}: use one of {known}") from None


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64K', '4M', '2G', '1T' (binary units; 'MiB'/'MB' accepted) or plain bytes -> bytes."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(
            f"size {text!r} is not understood: write bytes or a number with K, M, G or T "
            "(binary units), e.g. 4M"
        )
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_region(text: str) -> tuple[int, int]:
    """'SHMID=SIZE' (e.g. '1=4M') -> (1, 4194304). Checks the shmid range, not the layout."""
    shmid_text, sep, size_text = text.partition("=")
    if not sep:
        raise ConfigError(f"region {text!r}: expected SHMID=SIZE, e.g. 0=4M")
    try:
        shmid = int(shmid_text.strip(), 0)
    except ValueError:
        raise ConfigError(f"region {text!r}: shmid {shmid_text!r} is not a number") from None
    if not 0 <= shmid < limits.MAX_SHMEM_REGIONS:
        raise ConfigError(f"region {text!r}: shmid {shmid} out of range 0..255")
    return shmid, parse_size(size_text)


@dataclass(frozen=True)
class ShmemLayout:
    """Shared-memory regions by shmid, as a back-end serves them. Immutable; checked on
    construction against what QEMU accepts; empty is valid (no BAR 4)."""

    regions: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A sorted, read-only copy: a caller's dict cannot change the layout afterwards.
        frozen = MappingProxyType(dict(sorted(dict(self.regions).items())))
        object.__setattr__(self, "regions", frozen)
        problems = limits.region_problems(frozen)
        if problems:
            raise ConfigError(f"layout {self.describe()}: " + "; ".join(problems))

    @classmethod
    def of(cls, layout: ShmemLayout | Mapping[int, int] | None) -> ShmemLayout:
        """A layout from a scenario's {shmid: size} (or a layout: returned as it is)."""
        if isinstance(layout, ShmemLayout):
            return layout
        return cls(dict(layout or {}))

    @classmethod
    def parse(cls, specs: Iterable[str]) -> ShmemLayout:
        """From ['0=4M', '3=8M'] (the --region options); a repeated shmid is an error."""
        regions: dict[int, int] = {}
        for spec in specs:
            shmid, size = parse_region(spec)
            if shmid in regions:
                raise ConfigError(f"region {spec!r}: shmid {shmid} given twice")
            regions[shmid] = size
        return cls(regions)

    @property
    def total(self) -> int:
        """The BAR 4 size: the sum of the region sizes."""
        return sum(self.regions.values())

    def packed(self) -> list[limits.PackedRegion]:
        """Where each region sits in BAR 4 (testbed.limits.pack)."""
        return limits.pack(self.regions)

    def offsets(self) -> dict[int, int]:
        """shmid -> offset of the region in BAR 4."""
        return {p.shmid: p.offset for p in self.packed()}

    def describe(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.regions.items()) or "(none)"

    def region_args(self) -> list[str]:
        """The same layout as `testbed backend` options: ['--region', '0=4194304', ...]."""
        return [w for shmid, size in self.regions.items() for w in ("--region", f"{shmid}={size}")]

    def __bool__(self) -> bool:
        return bool(self.regions)

    def __hash__(self) -> int:  # the dataclass's would hash the unhashable mapping proxy
        return hash(tuple(self.regions.items()))


# -- what serves a device -------------------------------------------------------------------


class ModelSpec(Protocol):
    """A device model's description (testbed.vhost_user.devices.spec: virtio-pmem,
    virtio-fs): what QEMU's device must look like for it, and ``build()``, which makes the
    model where the back-end runs."""

    @property
    def layout(self) -> ShmemLayout: ...
    @property
    def virtio_id(self) -> int: ...
    @property
    def num_vqs(self) -> int: ...
    @property
    def config_size(self) -> int: ...
    def build(self) -> Any: ...
    def template_values(self) -> dict[str, str]:
        """What a user's back-end command may name as ``{key}`` to serve this same device
        (virtio-fs: ``{share}``, ``{tag}``): ForeignCommand.filled."""
        ...


@dataclass(frozen=True)
class OurBackend:
    """Our back-end (testbed.vhost_user.backend) serves the device, with the device's
    faults; ``model`` the device model behind it (None: the plain test device, which
    serves its layout and never a request)."""

    model: ModelSpec | None = None


@dataclass(frozen=True)
class ForeignCommand:
    """A back-end we did not write, started from a command template ('PROGRAM ARGS...
    {socket}': split like a shell would, never run by one) and stopped at the end; QEMU
    reaches it through the relay, which injects the device's layout when it has one."""

    template: tuple[str, ...]
    ready_timeout: float = 15.0

    @classmethod
    def of(cls, template: str | Sequence[str], ready_timeout: float = 15.0) -> ForeignCommand:
        words = shlex.split(template) if isinstance(template, str) else list(template)
        if not words:
            raise ConfigError("empty back-end command: give 'PROGRAM ARGS... {socket}'")
        return cls(tuple(words), ready_timeout)

    def filled(self, values: Mapping[str, str]) -> ForeignCommand:
        """The template with ``{key}`` replaced by ``values[key]`` in every word (the
        device model's ModelSpec.template_values: a scenario's share and tag); ``{socket}``
        stays for the back-end's start."""
        words = list(self.template)
        for key, value in values.items():
            words = [w.replace(f"{{{key}}}", value) for w in words]
        return dataclasses.replace(self, template=tuple(words))


@dataclass(frozen=True)
class ForeignSocket:
    """A back-end we did not write, already listening on ``path`` (neither started nor
    stopped by us); QEMU reaches it through the relay."""

    path: Path


BackendChoice = OurBackend | ForeignCommand | ForeignSocket


def backend_choice(
    command: str | Sequence[str] | None = None, socket: Path | str | None = None
) -> BackendChoice:
    """What serves a device, from the two ways a user names a back-end we did not write
    (``--backend-cmd`` / ``--backend-socket``); neither: ours. The one place that says
    they exclude each other."""
    if command and socket:
        raise ConfigError("give a back-end command or a back-end socket, not both")
    if command:
        return ForeignCommand.of(command)
    if socket:
        return ForeignSocket(Path(socket))
    return OurBackend()


DEVICE_OPTIONS = ("virtio_id", "num_vqs", "vq_size", "config_size")
"""What a user may say about a device's shape: ``parse_device_options``' keys."""


def parse_device_options(spec: str) -> dict[str, int]:
    """'virtio_id=2,num_vqs=1,config_size=60' -> {...}: the one syntax for device options
    (pytest's --backend-device, the CLI's --device). Values may be hex (0x...)."""
    options: dict[str, int] = {}
    for item in filter(None, (word.strip() for word in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in DEVICE_OPTIONS:
            raise ConfigError(
                f"device option {item!r}: use {', '.join(k + '=N' for k in DEVICE_OPTIONS)}"
            )
        try:
            options[key] = int(value, 0)
        except ValueError:
            raise ConfigError(f"device option {item!r}: {value!r} is not a number") from None
    return options


@dataclass(frozen=True)
class VhostUserDevice:
    """One vhost-user-test-device-pci, the chardev that connects it to its back-end, what
    that back-end serves (``layout``) and what the back-end is (``backend``, ``faults``).
    ``bus`` None is the root bus; a root port's id puts it behind that port (hot-plug)."""

    id: str = "vu0"
    """The chardev's id; the device's is ``<id>-dev``."""
    socket: Path | None = None
    """The back-end listens here; QEMU connects as client. Set when the VM places it."""
    layout: ShmemLayout = field(default_factory=ShmemLayout)
    virtio_id: int = DEFAULT_VIRTIO_ID
    num_vqs: int = 1
    vq_size: int | None = None
    """None: QEMU's default (64)."""
    config_size: int | None = None
    """Bytes of device config space the back-end answers GET_CONFIG for; None: QEMU's 0."""
    bus: str | None = None
    addr: int | None = None
    """PCI slot; None: the next free one (root bus) or 0 (behind a root port)."""
    reconnect_ms: int | None = None
    """The chardev's reconnect-ms: QEMU re-dials a back-end that went away. None: never."""
    allow_overfull: bool = False
    """Let more regions through than fit in config space, to reproduce QEMU's abort."""
    backend: BackendChoice = field(default_factory=OurBackend)
    faults: Faults = NO_FAULTS
    """What our back-end bends on purpose (testbed.vhost_user.faults); ours only."""
    device_type: str = DEVICE_TYPE
    """The QEMU device: the test device, or another built on vhost-user-base
    (``vhost-user-rng-pci``, ...: VHOST_USER_BASE_DEVICES), which has no virtio-id, num_vqs,
    vq_size or config_size properties of its own to set (its type fixes them)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", ShmemLayout.of(self.layout))
        if self.socket is not None:
            object.__setattr__(self, "socket", Path(self.socket))
        if self.faults.active and not isinstance(self.backend, OurBackend):
            raise ConfigError(
                f"device {self.id}: faults are our back-end's; a back-end we did not write "
                "takes none"
            )
        if not re.fullmatch(r"[A-Za-z][\w-]*", self.id):
            raise ConfigError(f"device id {self.id!r}: use letters, digits, '-' and '_'")
        if self.virtio_id <= 0:
            raise ConfigError(f"device {self.id}: virtio-id must be a positive virtio device id")
        if self.num_vqs < 1:
            raise ConfigError(f"device {self.id}: num_vqs {self.num_vqs}: use at least 1")
        if self.vq_size is not None and not limits.is_power_of_2(self.vq_size):
            raise ConfigError(f"device {self.id}: vq_size {self.vq_size}: use a power of two")
        if self.config_size is not None and self.config_size < 0:
            raise ConfigError(f"device {self.id}: config_size {self.config_size} is negative")
        if self.reconnect_ms is not None and self.reconnect_ms <= 0:
            # QEMU reads reconnect-ms=0 as "no reconnect": say so rather than pass it on.
            raise ConfigError(
                f"device {self.id}: reconnect_ms {self.reconnect_ms}: use a positive number "
                "of milliseconds, or None for no reconnect"
            )
        problem = limits.capacity_problem(len(self.layout.regions), self.behind_root_port)
        if problem and not self.allow_overfull:
            raise ConfigError(f"device {self.id}: {problem}")

    @classmethod
    def serving(cls, model: ModelSpec, **fields: Any) -> VhostUserDevice:
        """The device QEMU needs for our back-end serving ``model`` (virtio-pmem,
        virtio-fs, ...): its virtio-id, queues, config space and regions come from it."""
        return cls(
            layout=model.layout,
            virtio_id=model.virtio_id,
            num_vqs=model.num_vqs,
            config_size=model.config_size,
            backend=OurBackend(model),
            **fields,
        )

    @classmethod
    def of(
        cls, regions: ShmemLayout | Mapping[int, int] | None = None, **fields: Any
    ) -> VhostUserDevice:
        """A device serving ``regions`` ({shmid: size}; None: no regions), the other fields
        by name: what a scenario writes, e.g. ``VhostUserDevice.of({0: 4 * M},
        faults=Faults(no_shmem=True))``."""
        return cls(layout=ShmemLayout.of(regions), **fields)

    @property
    def device_id(self) -> str:
        return f"{self.id}-dev"

    @property
    def ours(self) -> bool:
        """Served by our own back-end (else by one we did not write, through the relay)."""
        return isinstance(self.backend, OurBackend)

    @property
    def socket_path(self) -> Path:
        if self.socket is None:
            raise ConfigError(f"device {self.id} has no socket yet: a VM places it first")
        return self.socket

    def placed(self, id: str, socket: Path, bus: str | None = None) -> VhostUserDevice:
        """This device at its place in a VM: chardev ``id``, back-end ``socket``, ``bus``
        (checked again: what fits on the root bus may not fit behind a root port)."""
        return dataclasses.replace(self, id=id, socket=socket, bus=bus)

    @property
    def behind_root_port(self) -> bool:
        return self.bus is not None and not self.bus.startswith("pcie.")

    # -- QEMU's command line ---------------------------------------------------------------

    def chardev_option(self) -> str:
        """The -chardev value."""
        option = f"socket,id={self.id},path={self.socket_path}"
        if self.reconnect_ms is not None:
            option += f",reconnect-ms={self.reconnect_ms}"
        return option

    def _properties(self) -> dict[str, Any]:
        if self.device_type != DEVICE_TYPE:
            return {"id": self.device_id, "chardev": self.id}
        props: dict[str, Any] = {
            "id": self.device_id,
            "chardev": self.id,
            "virtio-id": self.virtio_id,
            "num_vqs": self.num_vqs,
        }
        if self.vq_size is not None:
            props["vq_size"] = self.vq_size
        if self.config_size is not None:
            props["config_size"] = self.config_size
        return props

    def device_option(self, bus: str, addr: int) -> str:
        """The -device value at ``bus``/``addr`` (the command-line builder places it)."""
        props = {**self._properties(), "bus": bus, "addr": f"{addr:#x}"}
        return ",".join([self.device_type, *(f"{k}={v}" for k, v in props.items())])

    # -- QMP -------------------------------------------------------------------------------

    def chardev_add_arguments(self) -> dict[str, Any]:
        """chardev-add's arguments: a UNIX socket client (the back-end listens)."""
        data: dict[str, Any] = {
            "addr": {"type": "unix", "data": {"path": str(self.socket_path)}},
            "server": False,
        }
        if self.reconnect_ms is not None:
            data["reconnect-ms"] = self.reconnect_ms
        return {"id": self.id, "backend": {"type": "socket", "data": data}}

    def device_add_arguments(self) -> dict[str, Any]:
        """device_add's arguments: the device into its bus (a root port, at slot 0)."""
        if self.bus is None:
            raise ConfigError(f"device {self.id}: hot-plug needs a bus (a root port's id)")
        return {
            "driver": self.device_type,
            **self._properties(),
            "bus": self.bus,
            "addr": f"{self.addr or 0:#x}",
        }
