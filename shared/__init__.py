"""ArqonBus sans-I/O core: envelope, names and subjects, errors, settings.

Nothing in this package performs I/O or imports asyncio, nats or websockets.
"""
