"""The asyncio shell: WebSocket + HTTP endpoints, sessions, node-local fan-out."""
