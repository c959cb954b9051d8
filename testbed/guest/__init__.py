"""The guest side: SSH session, PCI config space and lspci parsers, inspection over SSH."""
