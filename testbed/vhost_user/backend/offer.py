"""What the device offers QEMU: feature bits and the shared-memory layout (the body of the
GET_SHMEM_CONFIG reply), each bent by the run's faults. Pure.

The device model adds its own virtio feature bits (QEMU's vhost-user-base passes the
back-end's device features to the guest as they are) and, with a config space, protocol
feature CONFIG: QEMU's test device with config_size > 0 refuses a back-end without it (and
drops the bit when config_size is 0).

``shmem_config_body`` is the one encoder of a GET_SHMEM_CONFIG reply body (through
protocol.ShMemConfig): our back-end's handler, the relay's injection and the fuzzer's
player all call it; whoever sends a malformed one bends its output (``bend_shmem_config``)
instead of encoding its own."""

from __future__ import annotations

import struct

from testbed.device import ShmemLayout
from testbed.vhost_user.codes import ProtocolFeature, VhostUserFeature
from testbed.vhost_user.faults import Faults
from testbed.vhost_user.protocol import ShMemConfig

DEVICE_FEATURES = VhostUserFeature.VERSION_1 | VhostUserFeature.PROTOCOL_FEATURES
# What we offer besides SHMEM. Not CONFIGURE_MEM_SLOTS: with it QEMU switches to
# ADD/REM_MEM_REG, and the measured SET_MEM_TABLE-after-MAP behaviour is what we test.
BASE_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.BACKEND_SEND_FD
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
)
MAX_MEM_SLOTS = 32


def device_features(model_features: int = 0) -> int:
    """GET_FEATURES: VERSION_1 and PROTOCOL_FEATURES, plus the device model's bits."""
    return int(DEVICE_FEATURES) | model_features


def protocol_features(faults: Faults, *, config: bool = False) -> int:
    features = int(BASE_PROTOCOL_FEATURES) | faults.extra_features
    if config:
        features |= ProtocolFeature.CONFIG
    if not faults.no_shmem:
        features |= 1 << faults.shmem_bit
    return features & ~faults.withhold_features


def shmem_config_body(layout: ShmemLayout, faults: Faults) -> bytes:
    """The whole GET_SHMEM_CONFIG reply body (before any truncation fault)."""
    config = ShMemConfig.from_regions(dict(layout.regions))
    if faults.shmem_raw_sizes is not None:
        config = ShMemConfig.from_regions(faults.shmem_raw_sizes)
    if faults.shmem_nregions is not None:
        config = ShMemConfig(faults.shmem_nregions, config.sizes)
    return config.pack()


_U32 = struct.Struct("<I")
_NREGIONS_AT = 0  # ShMemConfig's <II256Q: nregions, padding, sizes
_PADDING_AT = 4


def bend_shmem_config(
    body: bytes,
    *,
    nregions: int | None = None,
    padding: int | None = None,
    truncate: int | None = None,
    extra: int = 0,
) -> bytes:
    """An encoded GET_SHMEM_CONFIG body bent on purpose: nregions and the padding word
    overwritten (each cut to 32 bits, as the wire holds them), then the body cut to
    ``truncate`` bytes, then ``extra`` zero bytes appended."""
    out = bytearray(body)
    if nregions is not None:
        _U32.pack_into(out, _NREGIONS_AT, nregions & 0xFFFFFFFF)
    if padding is not None:
        _U32.pack_into(out, _PADDING_AT, padding & 0xFFFFFFFF)
    if truncate is not None:
        del out[truncate:]
    return bytes(out) + bytes(extra)
