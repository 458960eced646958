"""The sockets' flush at a turn's end (gateway/ws/transport.py ``_Flusher``) and the writes
deferred to it (``Socket.before_flush``, the hub's live bursts)."""

from __future__ import annotations

import asyncio

from arqonbus_server.gateway.ws.transport import _Flusher


class Flushed:
    """What the flusher uses of a socket."""

    def __init__(self, log: list[str], name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self.log, self.name = log, name

    def _flush(self) -> None:
        self.log.append(f"flush {self.name}")


async def turn_end() -> None:
    """Returns after the callbacks scheduled before it have run (call_soon is FIFO)."""
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)
    await done


async def test_deferred_writes_run_before_the_flush_in_the_same_callback() -> None:
    log: list[str] = []
    flusher = _Flusher()
    loop = asyncio.get_running_loop()
    a = Flushed(log, "a")

    def write() -> None:
        log.append("write")
        flusher.add(a)  # a socket written by the deferred write: flushed in this callback

    def asks_again() -> None:
        log.append("asks again")
        flusher.before(write, loop)  # asked for while the writes run: runs now too

    def broken() -> None:
        raise RuntimeError("a bug in one writer")

    flusher.before(broken, loop)
    flusher.before(asks_again, loop)
    await turn_end()
    assert log == ["asks again", "write", "flush a"]
    flusher.add(Flushed(log, "b"))  # the next turn is scheduled afresh
    await turn_end()
    assert log[-1] == "flush b"
