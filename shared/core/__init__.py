"""The sans-I/O connection core: ``Connection.receive(frame, now) -> effects``.

``connection`` holds the decisions, ``effects`` what the shell is asked to do, ``rates``
the token buckets of rate admission, ``rooms`` the room rules. Nothing here does I/O: the
time comes in as :class:`Now`, ids and timestamps from the functions the shell passes.
"""

from arqonbus_server.shared.core.connection import Connection
from arqonbus_server.shared.core.effects import Effect, Now
from arqonbus_server.shared.core.state import ConnectionConfig, Failure

__all__ = ["Connection", "ConnectionConfig", "Effect", "Failure", "Now"]
