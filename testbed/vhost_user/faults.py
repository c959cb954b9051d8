"""Fault injection for the back-end, chosen once per run.

Each field bends one thing the back-end does, so a scenario can show how QEMU reacts to a
back-end that is wrong in that one way. The default instance injects nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.errors import ConfigError
from testbed.limits import MAX_SHMEM_REGIONS
from testbed.vhost_user.codes import F_SHMEM, Request
from testbed.vhost_user.protocol import FLAG_REPLY, SHMEM_CONFIG_SIZE, VERSION


@dataclass(frozen=True)
class Faults:
    # Leave VHOST_USER_PROTOCOL_F_SHMEM out of GET_PROTOCOL_FEATURES.
    no_shmem: bool = False
    # Advertise SHMEM at this bit instead (e.g. 20 or 21 from older postings).
    shmem_bit: int = F_SHMEM
    # Header flags of the GET_SHMEM_CONFIG reply (QEMU insists on VERSION|REPLY = 0x5).
    shmem_reply_flags: int | None = None
    # Send only this many payload bytes of the GET_SHMEM_CONFIG reply (header size matches).
    shmem_truncate: int | None = None
    # nregions in the GET_SHMEM_CONFIG reply, whatever the sizes say.
    shmem_nregions: int | None = None
    # Raw sizes by shmid, bypassing layout validation (not page multiples, total not a
    # power of two, ...). Replaces the layout's sizes in the reply.
    shmem_raw_sizes: dict[int, int] | None = None
    # Close the connection instead of answering this request (the first time it arrives).
    disconnect_at: Request | None = None
    # Delay the reply to this request by ``delay_seconds``.
    delay_request: Request | None = None
    delay_seconds: float = 0.0
    # Close the main connection as soon as QEMU closes its end of the back-end channel
    # (SET_BACKEND_REQ_FD), as the relay did before 9d0b7d2: QEMU's unrealize closes the
    # channel first, so this hangs up under QEMU's device_del cleanup.
    hang_up_on_channel_close: bool = False
    # Answer GET_QUEUE_NUM with this many queues instead of the device's count.
    queue_num: int | None = None
    # Extra protocol feature bits to offer (or withhold with ``withhold_features``).
    extra_features: int = 0
    withhold_features: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.shmem_bit < 64:
            raise ConfigError(f"shmem bit {self.shmem_bit} out of range 0..63")
        if self.shmem_truncate is not None and not 0 <= self.shmem_truncate < SHMEM_CONFIG_SIZE:
            raise ConfigError(
                f"shmem_truncate {self.shmem_truncate}: expected 0..{SHMEM_CONFIG_SIZE - 1} bytes"
            )
        if self.queue_num is not None and not 0 <= self.queue_num < 1 << 64:
            raise ConfigError(f"queue_num {self.queue_num}: a u64")
        if self.delay_seconds < 0:
            raise ConfigError(f"delay_seconds {self.delay_seconds} must be >= 0")
        if self.delay_request is not None and self.delay_seconds == 0:
            raise ConfigError("delay_request given without delay_seconds")
        if self.shmem_raw_sizes is not None:
            for shmid, size in self.shmem_raw_sizes.items():
                if not 0 <= shmid < MAX_SHMEM_REGIONS or not 0 <= size < 1 << 64:
                    raise ConfigError(
                        f"raw size {shmid}={size}: shmid 0..{MAX_SHMEM_REGIONS - 1}, size a u64"
                    )

    @property
    def shmem_flags(self) -> int:
        default = VERSION | FLAG_REPLY
        return default if self.shmem_reply_flags is None else self.shmem_reply_flags

    @property
    def active(self) -> bool:
        return self != Faults()


NO_FAULTS = Faults()
