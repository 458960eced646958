"""One WebSocket connection: the session loop over the protocol core, and the transport under it."""
