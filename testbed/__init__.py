"""testbed: end-to-end test bed for VIRTIO Shared Memory Regions over vhost-user in QEMU."""

__version__ = "0.1.0"
