"""Guest images built from Debian packages (no root): kernel, initramfs, SSH keys.

from testbed.images import ensure_image
image = ensure_image("x86_64")                  # the default kernel; cached after a build
image = ensure_image("aarch64", kernel="6.12")  # a named kernel of images/aarch64.json
image.kernel, image.initrd, image.cmdline, image.client_key, image.host_key_line
image.kernel_name, image.kernel_version, image.kernel_release   # "6.12", "6.12.117-1", uname -r
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
from testbed.images.recipe import DEFAULT_KERNEL, kernel_names

__all__ = [
    "DEFAULT_KERNEL",
    "FAILED_MARK",
    "GuestImage",
    "build_image",
    "ensure_image",
    "image_summary",
    "images_root",
    "kernel_names",
    "load_image",
]
