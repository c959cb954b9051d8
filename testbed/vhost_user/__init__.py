"""The vhost-user back-end: wire format, connection, shared-memory layout, trace, device."""
