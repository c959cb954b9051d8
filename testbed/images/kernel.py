"""Turning Debian's compressed kernels into what QEMU boots fastest.

x86_64: the bzImage's payload is decompressed to the ELF vmlinux, which QEMU boots directly
through its PVH entry point (Debian sets CONFIG_PVH=y) -- no real-mode setup, no in-guest
decompression, which under TCG is most of the boot time. aarch64: Debian's vmlinuz is the
arm64 Image gzip-compressed; QEMU's -kernel wants it decompressed for speed.

Payload formats are detected by magic: XZ and gzip decode with the standard library;
zstd (Debian sid's x86 kernels) uses the `zstandard` module when installed, else the
host's `zstd` tool.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess
import zlib

from testbed.errors import HostCapabilityError, ProvisionError

XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def bzimage_payload(data: bytes) -> bytes:
    """The compressed kernel inside an x86 bzImage (boot protocol >= 2.08 header fields)."""
    if data[0x202:0x206] != b"HdrS":
        raise ProvisionError("not an x86 bzImage: no 'HdrS' boot header at 0x202")
    (version,) = struct.unpack_from("<H", data, 0x206)
    if version < 0x208:
        raise ProvisionError(f"bzImage boot protocol {version:#x} has no payload fields")
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start : start + length]
    if len(payload) != length:
        raise ProvisionError("bzImage payload runs past the end of the file")
    return payload


def _zstd(data: bytes) -> bytes:
    try:
        import zstandard
    except ImportError:
        pass
    else:
        out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        return out
    try:
        proc = subprocess.run(
            ["zstd", "-dcq"], input=data, capture_output=True, timeout=120, check=False
        )
    except FileNotFoundError as exc:
        raise HostCapabilityError(
            "the kernel is zstd-compressed: install the zstd tool (apt-get install zstd) "
            "or the Python package zstandard"
        ) from exc
    if proc.returncode != 0:
        raise ProvisionError(f"zstd could not decompress the kernel: {proc.stderr.decode()}")
    return proc.stdout


def decompress_kernel_payload(payload: bytes) -> bytes:
    """Decompress a kernel payload. The kernel build appends the uncompressed size (le32);
    it is checked when present, because a short output would boot into garbage."""
    if payload.startswith(ZSTD_MAGIC):
        out = _zstd(payload[:-4])
    elif payload.startswith(XZ_MAGIC):
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        out = dec.decompress(payload)
        if not dec.eof:
            raise ProvisionError("truncated XZ kernel payload")
    elif payload.startswith(GZIP_MAGIC):
        dec_gz = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = dec_gz.decompress(payload)
        if not dec_gz.eof:
            raise ProvisionError("truncated gzip kernel payload")
    else:
        raise ProvisionError(
            f"unknown kernel payload compression (magic {payload[:6].hex()}); "
            "supported: zstd, xz, gzip"
        )
    (size,) = struct.unpack("<I", payload[-4:])
    if size != len(out) & 0xFFFFFFFF:
        raise ProvisionError(
            f"kernel payload decompressed to {len(out)} bytes, the image says {size}"
        )
    return out


def x86_vmlinux(bzimage: bytes) -> bytes:
    """The ELF vmlinux inside a bzImage, for QEMU's direct PVH boot."""
    out = decompress_kernel_payload(bzimage_payload(bzimage))
    if out[:4] != b"\x7fELF":
        raise ProvisionError("the bzImage payload is not an ELF vmlinux")
    return out


ARM64_IMAGE_MAGIC = b"ARM\x64"


def arm64_image(vmlinuz: bytes) -> bytes:
    """Debian's arm64 vmlinuz (gzip of Image) -> the Image; a raw Image is returned as is."""
    data = gzip.decompress(vmlinuz) if vmlinuz.startswith(GZIP_MAGIC) else vmlinuz
    if data[0x38:0x3C] != ARM64_IMAGE_MAGIC:
        raise ProvisionError("not an arm64 kernel Image (no 'ARM\\x64' magic at 0x38)")
    return data


def guest_kernel(arch: str, vmlinuz: bytes) -> bytes:
    """What -kernel gets for `arch`."""
    if arch == "x86_64":
        return x86_vmlinux(vmlinuz)
    if arch == "aarch64":
        return arm64_image(vmlinuz)
    raise ProvisionError(f"no kernel conversion for architecture {arch!r}")
