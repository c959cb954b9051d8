"""Guest images built from Debian packages (no root): kernel, initramfs, SSH keys.

from testbed.images import ensure_image
image = ensure_image("x86_64")      # cached after the first build
image.kernel, image.initrd, image.cmdline, image.client_key, image.host_key_line
"""

from testbed.images.builder import (
    FAILED_MARK,
    GuestImage,
    build_image,
    ensure_image,
    image_summary,
    images_root,
    load_image,
)

__all__ = [
    "FAILED_MARK",
    "GuestImage",
    "build_image",
    "ensure_image",
    "image_summary",
    "images_root",
    "load_image",
]
