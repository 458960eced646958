"""The HTTP side of the listener: admission at accept and handshake, the Origin allowlist."""
