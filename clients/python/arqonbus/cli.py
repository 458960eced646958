"""``arq``: publish, tail, read history, call service commands and list presence from a shell.

Every subcommand prints JSON lines on stdout (``presence``: a table, JSON lines with
``--json``). Errors are one line on stderr that says what
went wrong and what to do. Exit codes: 0 success, 1 the gateway answered with an error,
2 bad usage or input, 3 no connection (unreachable, refused token, lost), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import orjson

from arqonbus.client import Client, Subscription
from arqonbus.errors import (
    ArqonBusError,
    AuthenticationError,
    ClientClosed,
    ConnectionFailed,
    ConnectionLost,
    ConnectionRejected,
)
from arqonbus.models import Event, Gap
from arqonbus.presence import Member, Occupancy, PresenceChange, PresenceEvent

DEFAULT_URL = "ws://127.0.0.1:8765/ws,ws://127.0.0.1:8766/ws"  # the gateways of make run
DEFAULT_TOKEN = "dev:demo:arq"
DEFAULT_CONNECT_TIMEOUT = 5.0
CLI_MAX_BACKOFF = 2.0

EXIT_OK = 0
EXIT_SERVER = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad arguments or input: exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``arq`` argument parser."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--url",
        action="append",
        default=argparse.SUPPRESS,
        help=f"gateway URL, repeatable or comma-separated (env ARQONBUS_URL; default {DEFAULT_URL})",
    )
    common.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help=f"token dev:<tenant>:<principal> (env ARQONBUS_TOKEN; default {DEFAULT_TOKEN})",
    )
    common.add_argument(
        "--connect-timeout",
        type=float,
        default=argparse.SUPPRESS,
        metavar="S",
        help=f"give up connecting after S seconds (default {DEFAULT_CONNECT_TIMEOUT:g})",
    )
    parser = _Parser(
        prog="arq",
        description="ArqonBus command line: publish, subscribe, history, service commands.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    pub = commands.add_parser(
        "pub",
        parents=[common],
        help="publish events; prints one ack per line",
        description="Publish one JSON object, or '-' to publish one JSON object per stdin line.",
    )
    pub.add_argument("room")
    pub.add_argument("channel")
    pub.add_argument("payload", metavar="JSON|-", help="a JSON object, or - for stdin")
    pub.add_argument("--id", help="event id (idempotency key) of a single event")
    pub.add_argument("--timeout", type=float, default=10.0, metavar="S", help="ack timeout")

    sub = commands.add_parser(
        "sub",
        parents=[common],
        help="tail a channel as JSON lines; survives gateway restarts",
        description="Print each event of a channel as a JSON line (the delivered envelope).",
    )
    sub.add_argument("room")
    sub.add_argument("channel")
    sub.add_argument("--since", type=int, metavar="SEQ", help="replay events after SEQ first")
    sub.add_argument(
        "--resume-file",
        metavar="F",
        help="start after the seq stored in F (if it exists); store each printed seq in F",
    )
    sub.add_argument("--count", type=int, metavar="N", help="exit after N events")

    history = commands.add_parser(
        "history",
        parents=[common],
        help="print stored events as JSON lines",
        description="Print the stored events of a channel with seq > SEQ, oldest first.",
    )
    history.add_argument("room")
    history.add_argument("channel")
    history.add_argument("--since", type=int, default=0, metavar="SEQ")
    history.add_argument("--limit", type=int, default=100, metavar="N", help="0 = no limit")

    cmd = commands.add_parser(
        "cmd",
        parents=[common],
        help="call a service command; prints its result",
        description="Call a service command and print the handler's result as JSON.",
    )
    cmd.add_argument("room")
    cmd.add_argument("channel")
    cmd.add_argument("command")
    cmd.add_argument("params", nargs="?", metavar="JSON", help="parameters, a JSON object")
    cmd.add_argument("--timeout", type=float, default=5.0, metavar="S")

    presence = commands.add_parser(
        "presence",
        parents=[common],
        help="list a channel's present members; --watch prints each change",
        description="Print the members present in ROOM/CHANNEL (every page), one JSON line "
        "each, or with --watch join with presence events and print each change until Ctrl-C. "
        "Needs the presence permission.",
    )
    presence.add_argument("target", metavar="ROOM/CHANNEL")
    presence.add_argument("--state", choices=("online", "idle"), help="only members in STATE")
    presence.add_argument(
        "--watch", action="store_true", help="print each change (join, update, leave)"
    )
    presence.add_argument("--json", action="store_true", help="print JSON lines, not a table")
    return parser


# -- helpers --------------------------------------------------------------------------------


def _urls(args: argparse.Namespace) -> list[str]:
    given: list[str] | None = getattr(args, "url", None)
    raw = given if given else [os.environ.get("ARQONBUS_URL") or DEFAULT_URL]
    urls = [u.strip() for value in raw for u in value.split(",") if u.strip()]
    if not urls:
        raise UsageError("no gateway URL: pass --url ws://HOST:PORT/ws or set ARQONBUS_URL")
    return urls


def _token(args: argparse.Namespace) -> str:
    token: str | None = getattr(args, "token", None)
    return token or os.environ.get("ARQONBUS_TOKEN") or DEFAULT_TOKEN


def _json_object(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON ({exc}); pass one JSON object") from None
    if not isinstance(value, dict):
        raise UsageError(f'{what} must be a JSON object like \'{{"key": "value"}}\'')
    return value


def _emit(obj: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
    sys.stdout.buffer.flush()


def _write_resume_file(path: Path, seq: int) -> None:
    """Store ``seq`` atomically: a reader sees the old or the new value, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"{seq}\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(
            f"cannot write the resume file {path}: {exc.strerror or exc}; check the path"
        ) from None


def _read_resume_file(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"cannot read the resume file {path}: {exc.strerror}") from None
    if not text.isdigit():
        raise UsageError(
            f"the resume file {path} does not hold a seq (got {text[:40]!r}); fix or delete it"
        )
    return int(text)


async def _stdin_lines() -> AsyncIterator[bytes]:
    """Lines of stdin, read by a daemon thread so that Ctrl-C never waits for a read."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)

    def put(item: bytes | None) -> None:
        asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

    def read() -> None:
        try:
            for line in sys.stdin.buffer:
                put(line)
        except (RuntimeError, ValueError, OSError):
            return  # the loop or stdin closed: nothing left to do
        with contextlib.suppress(RuntimeError):
            put(None)

    threading.Thread(target=read, name="arq-stdin", daemon=True).start()
    while (line := await queue.get()) is not None:
        yield line


# -- subcommands ----------------------------------------------------------------------------


async def _pub(client: Client, args: argparse.Namespace) -> int:
    if args.payload != "-":
        payload = _json_object(args.payload, "the payload")
        ack = await client.publish(args.room, args.channel, payload, args.id, timeout=args.timeout)
        _emit({"request_id": ack.request_id, "seq": ack.seq, "duplicate": ack.duplicate})
        return EXIT_OK
    if args.id is not None:
        raise UsageError("--id applies to a single event, not to stdin ('-')")
    number = 0
    async for line in _stdin_lines():
        number += 1
        if not line.strip():
            continue
        payload = _json_object(line, f"line {number} of stdin")
        ack = await client.publish(args.room, args.channel, payload, timeout=args.timeout)
        _emit({"request_id": ack.request_id, "seq": ack.seq, "duplicate": ack.duplicate})
    return EXIT_OK


async def _sub(client: Client, args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    if args.since is not None and args.since < 0:
        raise UsageError("--since must be a seq >= 0")
    resume_file = Path(args.resume_file) if args.resume_file else None
    since: int | None = args.since
    if resume_file is not None:
        stored = _read_resume_file(resume_file)
        if stored is not None:
            since = stored
    sub = client.subscribe(args.room, args.channel, since_seq=since)
    try:
        await sub.start()
        saved = sub.last_seq
        if resume_file is not None and saved is not None:
            _write_resume_file(resume_file, saved)
        printed = 0
        async for item in sub:
            if isinstance(item, Gap):
                _emit(
                    {
                        "type": "gap",
                        "room": item.room,
                        "channel": item.channel,
                        "after_seq": item.after_seq,
                        "first_available_seq": item.first_available_seq,
                    }
                )
                print(
                    f"arq: warning: events of {item.room}/{item.channel} after seq "
                    f"{item.after_seq} were removed by retention; delivery continues with the "
                    f"oldest stored event (seq >= {item.first_available_seq})",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            assert isinstance(item, Event)
            _emit(item.raw)
            if resume_file is not None:
                _write_resume_file(resume_file, item.seq)
            printed += 1
            if args.count is not None and printed >= args.count:
                break
    finally:
        await sub.close()
    return EXIT_OK


async def _history(client: Client, args: argparse.Namespace) -> int:
    if args.since < 0:
        raise UsageError("--since must be a seq >= 0")
    if args.limit < 0:
        raise UsageError("--limit must be >= 0 (0 = no limit)")
    async for event in client.history(
        args.room, args.channel, since_seq=args.since, limit=args.limit or None
    ):
        _emit(event.raw)
    return EXIT_OK


async def _cmd(client: Client, args: argparse.Namespace) -> int:
    params = _json_object(args.params, "the parameters") if args.params is not None else None
    if args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    result = await client.command(
        args.room, args.channel, args.command, params, timeout=args.timeout
    )
    _emit(result)
    return EXIT_OK


def _room_channel(target: str) -> tuple[str, str]:
    room, sep, channel = target.partition("/")
    if not sep or not room or not channel or "/" in channel:
        raise UsageError(f"{target!r} is not ROOM/CHANNEL: write it like science/general")
    return room, channel


def _member_json(member: Member) -> dict[str, Any]:
    return {
        "principal": member.principal,
        "state": member.state,
        "metadata": member.metadata,
        "joined_at": member.joined_at,
        "connections": member.connection_count,
    }


def _member_line(member: Member) -> str:
    meta = orjson.dumps(member.metadata).decode() if member.metadata else ""
    count = member.connection_count
    sessions = f"{count} connection{'s' if count != 1 else ''}"
    return f"{member.principal:<24} {member.state:<7} {sessions:<14} {meta}".rstrip()


def _change_line(room: str, channel: str, change: PresenceChange) -> str:
    if change.action == "leave":
        return f"{room}/{channel}: {change.principal} left"
    what = "joined" if change.action == "join" else "is now"
    meta = f" {orjson.dumps(change.metadata).decode()}" if change.metadata else ""
    return f"{room}/{channel}: {change.principal} {what} {change.state}{meta}"


async def _presence(client: Client, args: argparse.Namespace) -> int:
    room, channel = _room_channel(args.target)
    as_json: bool = args.json
    if args.watch:
        return await _watch_presence(client, room, channel, args.state, as_json)
    members = await client.presence(room, channel, state=args.state)
    for member in members:
        if as_json:
            _emit(_member_json(member))
        else:
            print(_member_line(member), flush=True)
    if not as_json:
        print(f"{len(members)} member(s) in {room}/{channel}", file=sys.stderr, flush=True)
    return EXIT_OK


async def _watch_presence(
    client: Client, room: str, channel: str, state: str | None, as_json: bool
) -> int:
    """Join with presence events only (not entering presence) and print every change."""
    sub = client.subscribe(room, channel, presence=False, presence_events=True)
    # The channel's events are taken and dropped: a full queue would pause the subscription.
    drain: asyncio.Task[None] | None = None
    try:
        await sub.start()
        drain = asyncio.create_task(_discard(sub))
        print(f"watching {room}/{channel}; Ctrl-C to stop", file=sys.stderr, flush=True)
        async for event in sub.presence():
            _print_presence(event, state, as_json)
    finally:
        if drain is not None:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
        await sub.close()
    return EXIT_OK


async def _discard(sub: Subscription) -> None:
    with contextlib.suppress(ArqonBusError):
        async for _ in sub:
            pass


def _print_presence(event: PresenceEvent, state: str | None, as_json: bool) -> None:
    if event.overflow:
        counts = event.occupancy or Occupancy()
        if as_json:
            _emit({"overflow": True, "position": event.position, "occupancy": asdict(counts)})
        else:
            print(
                f"{event.room}/{event.channel}: many changes at once; now {counts.members} "
                f"member(s), {counts.online} online, {counts.idle} idle (run arq presence "
                "for the list)",
                flush=True,
            )
        return
    for change in event.changes:
        if state is not None and change.action != "leave" and change.state != state:
            continue
        if as_json:
            _emit({"room": event.room, "channel": event.channel, **asdict(change)})
        else:
            print(_change_line(event.room, event.channel, change), flush=True)


_SUBCOMMANDS = {
    "pub": _pub,
    "sub": _sub,
    "history": _history,
    "cmd": _cmd,
    "presence": _presence,
}


async def run(args: argparse.Namespace) -> int:
    """Run one parsed ``arq`` invocation; returns the exit code (errors are raised)."""
    urls = _urls(args)
    try:
        client = Client(
            urls,
            _token(args),
            connect_timeout=getattr(args, "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
            max_backoff=CLI_MAX_BACKOFF,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        await client.connect()
        return await _SUBCOMMANDS[args.subcommand](client, args)
    finally:
        await client.close()


def describe_error(exc: BaseException, urls: Sequence[str]) -> tuple[str, int]:
    """The one line to print for an error, and the exit code."""
    where = ", ".join(urls)
    if isinstance(exc, UsageError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, ConnectionFailed):
        reason = exc.message.removeprefix("cannot reach any gateway ")
        if any(refusal.status == 503 for refusal in exc.refusals.values()):
            # The gateway is up and said why it cannot take connections (starting, draining,
            # cut off from NATS): the reason is in the message; the mesh is running.
            hint = "Retry shortly, or pass --url with another gateway."
        else:
            hint = "Is the mesh running? Start one with make run, or pass --url."
        return f"cannot reach any gateway {reason}. {hint}", EXIT_CONNECTION
    if isinstance(exc, AuthenticationError):
        return (
            f"the gateway refused the token: {exc.message}. Pass --token "
            "dev:<tenant>:<principal> or set ARQONBUS_TOKEN.",
            EXIT_CONNECTION,
        )
    if isinstance(exc, ConnectionRejected):
        return f"{exc.message}. Do not retry as is; report it.", EXIT_CONNECTION
    if isinstance(exc, ConnectionLost | ClientClosed):
        return (
            f"the connection to {where} was lost before the reply ({exc.message}); the request "
            "may or may not have taken effect. Retry if it is safe to repeat.",
            EXIT_CONNECTION,
        )
    if isinstance(exc, ArqonBusError):
        retry = " (retryable)" if exc.retryable else ""
        return f"{exc.code}: {exc.message or 'no message'}{retry}", EXIT_SERVER
    return f"unexpected error: {type(exc).__name__}: {exc}", EXIT_SERVER


class _NoErrors(logging.Filter):
    """Show the SDK's warnings (reconnects); errors are reported once by the CLI itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("arq: %(levelname)s: %(message)s"))
    handler.addFilter(_NoErrors())
    logger = logging.getLogger("arqonbus")
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``arq`` console script."""
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `arq sub ... | head -1`): stop quietly.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        try:
            urls = _urls(args)
        except UsageError:
            urls = []
        line, code = describe_error(exc, urls)
        print(f"arq: {line}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
