"""virtio-fs's FUSE layer: the wire format (``wire``, ``structs``, ``codec``).

No virtqueues here: the device glue hands the server the device-readable bytes of a chain
and writes the reply into its device-writable buffers.
"""
