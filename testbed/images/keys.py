"""SSH keys for the guest, derived deterministically from a 32-byte seed (pure).

Reproducibility: keys are build inputs, so they must not change between two builds. They are
derived with HMAC-SHA256(seed, label) from one random seed that the builder stores once in
the cache (0600). A recipe-derived seed would also be reproducible but would make the client
key computable by anyone who has the source tree; a per-cache secret seed keeps it private
to this cache while two builds on the same cache give identical bytes.

Encodings written here, byte for byte:
- the client key as an OpenSSH private key file ("openssh-key-v1", unencrypted), which
  paramiko and ssh load; its check integers come from the seed so the file is stable;
- the guest's host key in dropbear's format: SSH string "ssh-ed25519", then SSH string
  seed32||pub32;
- public keys as "ssh-ed25519 AAAA... comment" lines.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from testbed.errors import ProvisionError

KEY_TYPE = b"ssh-ed25519"


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@dataclass(frozen=True)
class Ed25519Pair:
    seed: bytes  # 32-byte private scalar seed
    public: bytes  # 32-byte public key

    @classmethod
    def from_seed(cls, seed: bytes) -> Ed25519Pair:
        if len(seed) != 32:
            raise ProvisionError(f"an ed25519 seed is 32 bytes, got {len(seed)}")
        public = (
            Ed25519PrivateKey.from_private_bytes(seed)
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        return cls(seed, public)

    def public_blob(self) -> bytes:
        """The SSH wire encoding of the public key."""
        return ssh_string(KEY_TYPE) + ssh_string(self.public)

    def public_line(self, comment: str = "") -> str:
        line = f"ssh-ed25519 {base64.b64encode(self.public_blob()).decode()}"
        return f"{line} {comment}" if comment else line


def derive_seed(master: bytes, label: str) -> bytes:
    """A 32-byte key seed for `label` ("client", "host") from the cache's master seed."""
    if len(master) < 16:
        raise ProvisionError("the image key seed is too short (need at least 16 bytes)")
    return hmac.new(master, b"testbed-image-key:" + label.encode(), hashlib.sha256).digest()


def openssh_private_key(pair: Ed25519Pair) -> bytes:
    """An unencrypted OpenSSH private key file ("-----BEGIN OPENSSH PRIVATE KEY-----")."""
    # the two equal check ints only detect a wrong passphrase; derive them so output is stable
    check = hashlib.sha256(b"check" + pair.seed).digest()[:4]
    private = (
        check
        + check
        + ssh_string(KEY_TYPE)
        + ssh_string(pair.public)
        + ssh_string(pair.seed + pair.public)
        + ssh_string(b"testbed")
    )
    private += bytes(range(1, 1 + (-len(private) % 8)))  # padding 1, 2, 3... to the block (8)
    body = (
        b"openssh-key-v1\0"
        + ssh_string(b"none")
        + ssh_string(b"none")
        + ssh_string(b"")
        + struct.pack(">I", 1)
        + ssh_string(pair.public_blob())
        + ssh_string(private)
    )
    text = base64.b64encode(body).decode()
    lines = [text[i : i + 70] for i in range(0, len(text), 70)]
    return (
        "-----BEGIN OPENSSH PRIVATE KEY-----\n"
        + "\n".join(lines)
        + "\n-----END OPENSSH PRIVATE KEY-----\n"
    ).encode()


def dropbear_host_key(pair: Ed25519Pair) -> bytes:
    """dropbear's ed25519 key file: string "ssh-ed25519", string seed32||pub32."""
    return ssh_string(KEY_TYPE) + ssh_string(pair.seed + pair.public)


def parse_dropbear_host_key(data: bytes) -> Ed25519Pair:
    """Inverse of dropbear_host_key, checking that the public half matches the seed."""
    try:
        (n,) = struct.unpack_from(">I", data, 0)
        kind = data[4 : 4 + n]
        (m,) = struct.unpack_from(">I", data, 4 + n)
        blob = data[8 + n : 8 + n + m]
    except struct.error as exc:
        raise ProvisionError("truncated dropbear host key") from exc
    if kind != KEY_TYPE or len(blob) != 64 or 8 + n + m != len(data):
        raise ProvisionError("not a dropbear ed25519 host key")
    pair = Ed25519Pair.from_seed(blob[:32])
    if pair.public != blob[32:]:
        raise ProvisionError("dropbear host key: public half does not match the seed")
    return pair
