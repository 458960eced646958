"""``arqonbus admin ...``: the built-in admin commands (docs/protocol.md), from a shell.

Unlike the other admin commands it does not talk to NATS: it connects to a gateway like any
client (``--url``, ``--token``/``--api-key``, or ``ARQONBUS_URL``/``ARQONBUS_TOKEN`` as for
``arq``), sends one command envelope and prints the answer, so the caller's permissions
apply and the gateway audits the action. The server does not depend on the SDK: this is a
plain ``websockets`` client.

Exit codes: 0 ok; 1 the gateway refused (the code and message are printed) or cannot be
reached; 2 usage (the message says what to pass).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from arqonbus_server.shared.settings import Settings

DEFAULT_URL = "ws://127.0.0.1:8765/ws,ws://127.0.0.1:8766/ws"  # the gateways of `arqonbus dev`
DEFAULT_TOKEN = "dev:demo:admin"
DEFAULT_TIMEOUT_S = 10.0
MAX_PAGES = 10_000  # --all reads at most this many pages
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
PROG = "arqonbus admin"
SYSTEM_ROOM = "_system"  # the gateway answers ping and status only here (else: services)


class _UsageError(Exception):
    """Bad arguments: exit 2 with the message."""


class _Refused(Exception):
    """The gateway answered with an error (or could not be reached): exit 1."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True, slots=True)
class Request:
    """One command envelope to send: where, what, with which parameters."""

    room: str
    channel: str
    command: str
    parameters: dict[str, Any] = field(default_factory=dict)


# -- arguments -------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)([smhd]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int | None:
    """``90``, ``90s``, ``30m``, ``2h``, ``7d`` as seconds; ``none`` as None (remove it)."""
    if text.strip().lower() == "none":
        return None
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: write e.g. 3600, 90m, 2h or 7d (or none to remove it)"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


def _bytes(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of bytes (or none)")
    return int(text)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"gateway URL(s), comma-separated (env ARQONBUS_URL; default {DEFAULT_URL})",
    )
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument(
        "--token", default=argparse.SUPPRESS, help="bearer token (env ARQONBUS_TOKEN)"
    )
    auth.add_argument(
        "--api-key", default=argparse.SUPPRESS, help="API key arqk_... (sent as the token)"
    )
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the JSON result"
    )
    parser.add_argument(
        "--timeout", type=float, default=argparse.SUPPRESS, metavar="S", help="default 10"
    )


def _room_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--retention", type=parse_duration, default=argparse.SUPPRESS, metavar="DURATION",
        help="keep the room's events this long, e.g. 2h or 7d (none: the tenant's retention)",
    )  # fmt: skip
    parser.add_argument(
        "--max-message-bytes", type=_bytes, default=argparse.SUPPRESS, metavar="N",
        help="refuse larger events in this room (none: the gateway's limit)",
    )  # fmt: skip
    parser.add_argument(
        "--max-bytes", type=_bytes, default=argparse.SUPPRESS, metavar="N",
        help="keep the room's newest events up to N bytes; older ones go (none: no cap)",
    )  # fmt: skip
    flags = (("presence", "members enter presence by default"), ("private", "joins need --key"))
    for name, text in (*flags, ("invite-only", "only invited principals may join")):
        parser.add_argument(
            f"--{name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
            help=text,
        )  # fmt: skip
    parser.add_argument("--key", default=argparse.SUPPRESS, help="the private room's key")


_PRINCIPAL_COMMANDS = {
    "ban": "room_ban",
    "unban": "room_unban",
    "mute": "room_mute",
    "unmute": "room_unmute",
    "invite": "room_invite",
    "uninvite": "room_uninvite",
}


def add_parser(sub: Any) -> None:
    """``arqonbus admin <command>``: one subparser per built-in admin command."""
    admin = sub.add_parser(
        "admin",
        help="run built-in admin commands through a gateway (rooms, kick, ban, status)",
        description="Send one built-in admin command to a gateway, as a client with your "
        "token: the gateway checks your permissions and audits the action.",
    )
    _common(admin)
    commands = admin.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, help=text, description=text)
        _common(parser)
        return parser

    add("ping", "check that a gateway answers")
    add("status", "this gateway and the mesh: version, uptime, connections, live gateways")
    for name, what in (("list-rooms", "the tenant's rooms"), ("list-channels", "ROOM's channels")):
        parser = add(name, f"list {what} with message counts and last seq")
        if name == "list-channels":
            parser.add_argument("room", metavar="ROOM")
        parser.add_argument("--cursor", help="start after this name (a page's next cursor)")
        parser.add_argument("--limit", type=int, help="at most N per page (1-1000, default 100)")
        parser.add_argument("--all", action="store_true", help="read every page")
    add("channel-info", "a channel's seqs, size, retention and occupancy").add_argument(
        "target", metavar="ROOM/CHANNEL"
    )
    add("room-info", "a room's settings").add_argument("room", metavar="ROOM")
    for name, text in (
        ("create-room", "configure a new room (room_exists if it is configured already)"),
        ("configure-room", "change some of a room's settings"),
    ):
        parser = add(name, text)
        parser.add_argument("room", metavar="ROOM")
        _room_settings(parser)
    delete = add("delete-room", "delete a room's events, settings and presence")
    delete.add_argument("room", metavar="ROOM")
    delete.add_argument("--confirm", required=True, metavar="ROOM", help="the room's name again")
    kick = add("kick", "remove a principal's sessions from a room (they may join again)")
    kick.add_argument("room", metavar="ROOM")
    kick.add_argument("principal", metavar="PRINCIPAL")
    kick.add_argument("--reason", help="shown to the kicked sessions (at most 200 characters)")
    for name, command in _PRINCIPAL_COMMANDS.items():
        parser = add(name, f"{command} PRINCIPAL in ROOM")
        parser.add_argument("room", metavar="ROOM")
        parser.add_argument("principal", metavar="PRINCIPAL")
        if name in ("ban", "mute"):
            parser.add_argument("--duration", type=parse_duration, help="e.g. 1h; default: no end")
            parser.add_argument("--reason", help="why (at most 200 characters)")


def build_request(args: argparse.Namespace) -> Request:
    """The command envelope an ``admin`` invocation sends. Raises _UsageError."""
    name: str = args.admin_command
    if name in ("ping", "status"):
        return Request(SYSTEM_ROOM, "admin", name)
    if name in ("list-rooms", "list-channels"):
        return _list_request(args)
    if name == "channel-info":
        room, channel = split_target(args.target)
        return Request(room, channel, "channel_info")
    if name == "room-info":
        return Request(args.room, "admin", "room_info")
    if name in ("create-room", "configure-room"):
        return Request(args.room, "admin", name.replace("-", "_"), _settings_params(args))
    if name == "delete-room":
        if args.confirm != args.room:
            raise _UsageError(
                f"--confirm {args.confirm!r} does not match the room: to delete every event "
                f"of {args.room!r}, pass --confirm {args.room}"
            )
        return Request(args.room, "admin", "delete_room", {"confirm": args.confirm})
    params: dict[str, Any] = {"principal": args.principal}
    if getattr(args, "reason", None) is not None:
        params["reason"] = args.reason
    if getattr(args, "duration", None) is not None:
        params["duration_s"] = args.duration
    command = "kick" if name == "kick" else _PRINCIPAL_COMMANDS[name]
    return Request(args.room, "admin", command, params)


def split_target(target: str) -> tuple[str, str]:
    room, sep, channel = target.partition("/")
    if not sep or not room or not channel or "/" in channel:
        raise _UsageError(f"{target!r} is not ROOM/CHANNEL: write it like science/general")
    return room, channel


def _list_request(args: argparse.Namespace) -> Request:
    if args.limit is not None and not 1 <= args.limit <= 1000:
        raise _UsageError("--limit must be from 1 to 1000")
    params: dict[str, Any] = {}
    if args.cursor is not None:
        params["cursor"] = args.cursor
    if args.limit is not None:
        params["limit"] = args.limit
    if args.admin_command == "list-rooms":
        return Request(SYSTEM_ROOM, "admin", "list_rooms", params)
    return Request(args.room, "admin", "list_channels", params)


def _settings_params(args: argparse.Namespace) -> dict[str, Any]:
    names = {"retention": "retention_s", "max_message_bytes": "max_message_bytes"}
    names |= {"max_bytes": "max_bytes"}
    names |= {"presence": "presence", "private": "private", "invite_only": "invite_only"}
    params = {wire: getattr(args, arg) for arg, wire in names.items() if hasattr(args, arg)}
    if hasattr(args, "key"):
        params["key"] = args.key
    if args.admin_command == "configure-room" and not params:
        raise _UsageError(
            "configure-room needs at least one setting: --retention, --max-message-bytes, --max-bytes, "
            "--presence, --private/--key, --invite-only (or their --no- forms)"
        )
    if args.admin_command == "create-room" and params.get("private") and "key" not in params:
        raise _UsageError("--private needs --key K: members join with that key")
    return params


# -- talking to a gateway --------------------------------------------------------------------


def connection_options(args: argparse.Namespace, environ: dict[str, str]) -> tuple[list[str], str]:
    """The gateway URLs and the token: flags first, then ARQONBUS_URL/ARQONBUS_TOKEN."""
    raw = getattr(args, "url", None) or environ.get("ARQONBUS_URL") or DEFAULT_URL
    urls = [u.strip() for u in raw.split(",") if u.strip()]
    if not urls:
        raise _UsageError("no gateway URL: pass --url ws://HOST:PORT/ws or set ARQONBUS_URL")
    token, api_key = getattr(args, "token", None), getattr(args, "api_key", None)
    if token and api_key:
        raise _UsageError("pass --token or --api-key, not both")
    return urls, token or api_key or environ.get("ARQONBUS_TOKEN") or DEFAULT_TOKEN


class AdminConnection:
    """One WebSocket connection to a gateway that sends commands and awaits their answers."""

    def __init__(self, conn: ClientConnection, url: str, timeout: float) -> None:
        self._conn, self.url, self._timeout = conn, url, timeout

    @classmethod
    async def open(cls, urls: Sequence[str], token: str, timeout: float) -> AdminConnection:
        """Connect to the first gateway that lets us in (after its welcome). Raises _Refused."""
        reasons = []
        for url in urls:
            try:
                conn = await connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {token}"},
                    open_timeout=timeout,
                    close_timeout=2.0,
                )
            except InvalidStatus as exc:
                refusal = _refusal(exc)
                if exc.response.status_code in (401, 403):
                    raise _Refused("unauthorized", f"{url} refused the token: {refusal}") from None
                reasons.append(f"{url}: HTTP {exc.response.status_code} {refusal}".rstrip())
                continue
            except (OSError, TimeoutError, WebSocketException) as exc:
                reasons.append(f"{url}: {_reason(exc)}")
                continue
            admin = cls(conn, url, timeout)
            await admin._welcome()
            return admin
        raise _Refused(
            "unreachable",
            f"cannot reach a gateway ({'; '.join(reasons)}). Is the mesh running (arqonbus "
            "dev)? Pass --url ws://HOST:PORT/ws or set ARQONBUS_URL",
        )

    async def _welcome(self) -> None:
        message = await self._receive()
        if message.get("type") != "welcome":
            await self.close()
            raise _Refused("unexpected", f"{self.url} sent {message.get('type')!r}, not a welcome")

    async def _receive(self) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._conn.recv()
        except TimeoutError:
            raise _Refused(
                "timeout", f"{self.url} did not answer within {self._timeout:g}s"
            ) from None
        except WebSocketException as exc:
            raise _Refused("connection_lost", f"{self.url} closed the connection ({exc})") from None
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return {}
        return message if isinstance(message, dict) else {}

    async def call(self, request: Request) -> dict[str, Any]:
        """Send ``request``; its result, or _Refused with the gateway's error code."""
        request_id = f"{request.command[:20]}_{uuid.uuid4().hex}"
        payload = {"command": request.command, "parameters": request.parameters}
        envelope: dict[str, Any] = {"version": "1.0", "id": request_id, "type": "command"}
        envelope |= {"room": request.room, "channel": request.channel, "payload": payload}
        await self._conn.send(orjson.dumps(envelope).decode())
        try:
            async with asyncio.timeout(self._timeout):
                return await self._answer(request_id)
        except TimeoutError:
            raise _Refused(
                "timeout", f"no answer to {request.command} from {self.url} within "
                f"{self._timeout:g}s; it may or may not have taken effect",
            ) from None  # fmt: skip

    async def _answer(self, request_id: str) -> dict[str, Any]:
        while True:  # bounded by call()'s timeout; frames meant for others are skipped
            message = await self._receive()
            body = message.get("payload")
            if not isinstance(body, dict) or body.get("request_id") != request_id:
                continue
            if message.get("type") == "error":
                raise _refused_by(body)
            if body.get("status") == "success":
                result = body.get("result")
                return result if isinstance(result, dict) else {}
            raise _refused_by(body.get("error"))

    async def close(self) -> None:
        await self._conn.close()


def _refused_by(error: Any) -> _Refused:
    error = error if isinstance(error, dict) else {}
    code, message = error.get("code"), error.get("message")
    return _Refused(code if isinstance(code, str) else "internal", str(message or "no message"))


def _refusal(exc: InvalidStatus) -> str:
    try:
        body = orjson.loads(exc.response.body or b"")
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(body, dict):
        return ""
    return " ".join(str(body[k]) for k in ("error", "message") if isinstance(body.get(k), str))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


async def call_pages(admin: AdminConnection, request: Request, key: str) -> dict[str, Any]:
    """Follow ``next_cursor`` to the last page; one result with every page's ``key`` items."""
    items: list[Any] = []
    result: dict[str, Any] = {}
    for _ in range(MAX_PAGES):
        result = await admin.call(request)
        page = result.get(key)
        items.extend(page if isinstance(page, list) else [])
        cursor = result.get("next_cursor")
        if not isinstance(cursor, str) or not cursor or cursor == request.parameters.get("cursor"):
            break
        request = Request(request.room, request.channel, request.command, {
            **request.parameters, "cursor": cursor})  # fmt: skip
    return {**result, key: items, "next_cursor": None}


# -- output ----------------------------------------------------------------------------------

_TABLES = {
    "list_rooms": ("rooms", ("room", "channels", "messages", "last_seq", "configured")),
    "list_channels": ("channels", ("channel", "messages", "last_seq")),
}


def render(request: Request, result: dict[str, Any]) -> str:
    """The human form of a result: a table for lists, a sentence or ``key: value`` lines."""
    if request.command in _TABLES:
        key, columns = _TABLES[request.command]
        rows = result.get(key)
        text = table(rows if isinstance(rows, list) else [], columns)
        cursor = result.get("next_cursor")
        more = f"\nmore: pass --cursor {cursor} (or --all)" if cursor else ""
        return text + more
    sentence = _SENTENCES.get(request.command)
    if sentence is not None:
        return sentence(request, result)
    return "\n".join(f"{k}: {_cell(v)}" for k, v in result.items())


def table(rows: list[Any], columns: Sequence[str]) -> str:
    """Aligned columns, one header line; "(none)" for no rows."""
    if not rows:
        return "(none)"
    cells = [[_cell(row.get(c)) if isinstance(row, dict) else "" for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [[c.upper() for c in columns], *cells]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)  # fmt: skip


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None or value == "":
        return "-"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def _pong(request: Request, result: dict[str, Any]) -> str:
    return f"pong from gateway {result.get('gateway', '?')} (time {result.get('time', '?')})"


def _deleted(request: Request, result: dict[str, Any]) -> str:
    return (
        f"deleted room {result.get('room', request.room)}: removed "
        f"{result.get('events_removed', 0)} event(s), "
        f"{result.get('presence_removed', 0)} presence entry(s)"
    )


def _kicked(request: Request, result: dict[str, Any]) -> str:
    return (
        f"kicked {request.parameters['principal']} from room {request.room}: its sessions left "
        "the room's channels (they may join again; use ban to keep them out)"
    )


_SENTENCES: dict[str, Callable[[Request, dict[str, Any]], str]] = {
    "ping": _pong,
    "delete_room": _deleted,
    "kick": _kicked,
}


# -- the command -----------------------------------------------------------------------------


async def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``arqonbus admin`` invocation; the exit code (0, 1 refused, 2 usage)."""
    del settings  # a client of a gateway: the gateway's settings do not apply here
    try:
        request = build_request(args)
        urls, token = connection_options(args, dict(os.environ))
        timeout = getattr(args, "timeout", DEFAULT_TIMEOUT_S)
        if timeout <= 0:
            raise _UsageError("--timeout must be more than 0 seconds")
    except _UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = await _send(request, urls, token, timeout, getattr(args, "all", False))
    except _Refused as exc:
        print(f"{PROG}: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    if getattr(args, "json", False):
        print(orjson.dumps(result).decode(), flush=True)
    else:
        print(render(request, result), flush=True)
    return EXIT_OK


async def _send(
    request: Request, urls: Sequence[str], token: str, timeout: float, every_page: bool
) -> dict[str, Any]:
    admin = await AdminConnection.open(urls, token, timeout)
    try:
        if every_page and request.command in _TABLES:
            return await call_pages(admin, request, _TABLES[request.command][0])
        return await admin.call(request)
    finally:
        await admin.close()
