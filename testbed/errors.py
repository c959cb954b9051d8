"""The one exception tree of the test bed.

Callers catch by meaning; every error's message says what is wrong and, where it can,
what to do about it. Leaves keep the evidence (bytes, exit status, last console lines).

    TestbedError
    ├── ConfigError              bad input from the user (options, layouts, paths)
    ├── HostCapabilityError      this host cannot do what was asked (no KVM, no QEMU 11.1, ...)
    ├── ProvisionError           provisioning QEMU or building a guest image failed
    ├── ProtocolError            a vhost-user message is malformed (see vhost_user.protocol)
    │   └── FuseProtocolError    a FUSE request or reply is malformed (see fuse.wire, fuse.codec)
    ├── GuestMemoryError         an address range is not inside one region of the memory table
    ├── RingError                a virtqueue holds what the virtio spec forbids (rule, detail)
    ├── ParseError               guest output (config space, sysfs, lspci) cannot be parsed
    ├── PeerClosed               the vhost-user peer closed the connection
    ├── StateError               an object was used in the wrong state
    ├── QemuExited               QEMU exited (or was killed) when it should have been running
    ├── ConsoleFailure           the guest console showed a failure pattern (panic, ...)
    ├── QmpCommandFailed         QEMU refused a QMP command (keeps class and description)
    ├── WaitTimeout              a condition did not come true before its deadline
    └── GuestCommandFailed       a command in the guest exited non-zero when success was required
"""

from __future__ import annotations


class TestbedError(Exception):
    """Root of every error raised on purpose by the test bed."""

    __test__ = False  # not a pytest test class, despite the name


class ConfigError(TestbedError):
    """Bad input: an option, a layout, a path. The message names it and how to fix it."""


class HostCapabilityError(TestbedError):
    """The host lacks a capability (KVM, a QEMU with the feature, a tool)."""


class ProvisionError(TestbedError):
    """Provisioning QEMU or building a guest image failed."""


class ProtocolError(TestbedError):
    """A vhost-user message is malformed. ``data`` keeps the offending bytes."""

    def __init__(self, message: str, data: bytes | None = None) -> None:
        super().__init__(message)
        self.data = data

    def __str__(self) -> str:
        base = super().__str__()
        if self.data is None:
            return base
        shown = self.data[:64].hex()
        more = "..." if len(self.data) > 64 else ""
        return f"{base} (got {len(self.data)} bytes: {shown}{more})"


class FuseProtocolError(ProtocolError):
    """A FUSE request (or reply) is malformed: a size that does not add up, a name without its
    NUL, an argument list that does not fit its opcode. ``data`` keeps the offending bytes."""


class GuestMemoryError(TestbedError):
    """A guest-physical (or QEMU user) address range lies outside every region of the
    memory table, or crosses from one region into another; or a region cannot be mapped."""


class RingError(TestbedError):
    """A virtqueue holds what the virtio spec forbids, or a request the device cannot parse.

    ``rule`` names the broken rule ("vring-desc-range", "vring-loop", "vring-direction",
    "vring-indirect", "vring-index", "vring-addr", "vring-num", "device-request"); ``head``
    is the chain's head index when one chain is concerned (it is then completed with used
    length 0); ``broken``: the ring itself cannot be served any more.
    """

    def __init__(
        self, rule: str, detail: str, *, head: int | None = None, broken: bool = False
    ) -> None:
        self.rule = rule
        self.detail = detail
        self.head = head
        self.broken = broken
        where = "" if head is None else f"chain at head {head}: "
        super().__init__(f"{rule}: {where}{detail}")


class ParseError(TestbedError):
    """Guest output (PCI config space, sysfs resource, lspci) is not in the expected form."""


class PeerClosed(TestbedError):
    """The vhost-user peer closed the connection."""


class StateError(TestbedError):
    """An object was used in a state that does not allow the call."""

    def __init__(self, actual: object, required: object, what: str = "") -> None:
        self.actual = actual
        self.required = required
        prefix = f"{what}: " if what else ""
        super().__init__(f"{prefix}state is {actual}, needs {required}")


class QemuExited(TestbedError):
    """QEMU exited or was killed while it should have been running.

    ``returncode`` is the exit status (negative: killed by that signal); ``stderr_tail`` and
    ``console_tail`` hold the last lines QEMU and the guest printed.
    """

    def __init__(
        self,
        message: str,
        returncode: int | None = None,
        stderr_tail: str = "",
        console_tail: str = "",
    ) -> None:
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.console_tail = console_tail
        parts = [message]
        if returncode is not None:
            parts.append(f"exit status {describe_returncode(returncode)}")
        if stderr_tail:
            parts.append("QEMU stderr:\n" + stderr_tail)
        if console_tail:
            parts.append("last console lines:\n" + console_tail)
        super().__init__("\n".join(parts))


class ConsoleFailure(TestbedError):
    """The guest console printed a failure pattern (kernel panic, ...)."""


class QmpCommandFailed(TestbedError):
    """QEMU answered a QMP command with an error (``error_class``, ``desc``)."""

    def __init__(self, command: str, arguments: object, error_class: str, desc: str) -> None:
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command} {arguments!r} failed: {error_class}: {desc}")


class WaitTimeout(TestbedError):
    """A condition did not come true before its deadline."""


class GuestCommandFailed(TestbedError):
    """A command run in the guest exited with a non-zero status."""

    def __init__(self, command: str, returncode: int, stdout: bytes, stderr: bytes) -> None:
        self.command = command
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        err = stderr.decode(errors="replace").strip()[-2000:]
        super().__init__(f"guest command {command!r} exited {returncode}: {err}")


def describe_returncode(returncode: int) -> str:
    """'0', '1', or 'killed by SIGSEGV (-11)' for a Popen returncode."""
    if returncode >= 0:
        return str(returncode)
    import signal

    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name} ({returncode})"
