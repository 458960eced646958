"""``arqonbus admin``: arguments to command envelopes, results to text, usage errors to exit 2.

The gateway side runs in tests/sdk/test_admin_sdk.py (a real mesh)."""

from __future__ import annotations

import argparse
import socket

import orjson
import pytest

from arqonbus_server.gateway.admin import cli
from arqonbus_server.gateway.admin.rooms import (
    DEFAULT_TOKEN,
    Request,
    build_request,
    connection_options,
    parse_duration,
    render,
    table,
)
from arqonbus_server.gateway.admin.rooms import (
    _UsageError as UsageError,
)


def parse(*argv: str) -> argparse.Namespace:
    return cli._parser().parse_args(["admin", *argv])


def request_of(*argv: str) -> Request:
    return build_request(parse(*argv))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["ping"], Request("_system", "admin", "ping")),
        (["status"], Request("_system", "admin", "status")),
        (["list-rooms", "--limit", "5"], Request("_system", "admin", "list_rooms", {"limit": 5})),
        (
            ["list-channels", "ops", "--cursor", "c1"],
            Request("ops", "admin", "list_channels", {"cursor": "c1"}),
        ),
        (["channel-info", "ops/alerts"], Request("ops", "alerts", "channel_info")),
        (["room-info", "ops"], Request("ops", "admin", "room_info")),
        (
            ["create-room", "ops", "--retention", "2h", "--presence", "--max-message-bytes", "512"],
            Request(
                "ops",
                "admin",
                "create_room",
                {"retention_s": 7200, "presence": True, "max_message_bytes": 512},
            ),
        ),
        (
            ["configure-room", "ops", "--retention", "none", "--no-invite-only"],
            Request("ops", "admin", "configure_room", {"retention_s": None, "invite_only": False}),
        ),
        (
            ["create-room", "vault", "--private", "--key", "s3cret-key"],
            Request("vault", "admin", "create_room", {"private": True, "key": "s3cret-key"}),
        ),
        (
            ["delete-room", "ops", "--confirm", "ops"],
            Request("ops", "admin", "delete_room", {"confirm": "ops"}),
        ),
        (
            ["kick", "ops", "mallory", "--reason", "spam"],
            Request("ops", "admin", "kick", {"principal": "mallory", "reason": "spam"}),
        ),
        (
            ["ban", "ops", "mallory", "--duration", "1d"],
            Request("ops", "admin", "room_ban", {"principal": "mallory", "duration_s": 86400}),
        ),
        (["unmute", "ops", "bob"], Request("ops", "admin", "room_unmute", {"principal": "bob"})),
        (["invite", "ops", "bob"], Request("ops", "admin", "room_invite", {"principal": "bob"})),
    ],
)
def test_each_command_becomes_its_envelope(argv: list[str], expected: Request) -> None:
    assert request_of(*argv) == expected


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        (["delete-room", "ops", "--confirm", "opz"], "pass --confirm ops"),
        (["configure-room", "ops"], "needs at least one setting"),
        (["create-room", "vault", "--private"], "--private needs --key"),
        (["channel-info", "ops"], "write it like science/general"),
        (["list-rooms", "--limit", "0"], "--limit must be from 1 to 1000"),
    ],
)
def test_bad_arguments_say_what_to_pass(argv: list[str], fix: str) -> None:
    with pytest.raises(UsageError, match=fix):
        request_of(*argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["delete-room", "ops"], "--confirm"),
        (["create-room", "ops", "--retention", "soon"], "not a duration"),
        (["kick", "ops"], "PRINCIPAL"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_argparse_refusals_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse(*argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_a_usage_error_exits_2_before_connecting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARQONBUS_URL", "ws://127.0.0.1:9/ws")  # never dialled
    code = cli.main(["admin", "delete-room", "ops", "--confirm", "nope"])
    assert code == 2
    assert "pass --confirm ops" in capsys.readouterr().err


def test_an_unreachable_gateway_exits_1_and_names_the_fix(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("ARQONBUS_TOKEN", raising=False)
    code = cli.main(["admin", "ping", "--url", f"ws://127.0.0.1:{port}/ws", "--timeout", "2"])
    err = capsys.readouterr().err
    assert code == 1
    assert "unreachable" in err and "--url" in err and str(port) in err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 604800), ("none", None)],
)
def test_durations(text: str, seconds: int | None) -> None:
    assert parse_duration(text) == seconds


def test_flags_win_over_the_environment_and_defaults_fill_in() -> None:
    env = {"ARQONBUS_URL": "ws://a:1/ws, ws://b:2/ws", "ARQONBUS_TOKEN": "dev:t:env"}
    assert connection_options(parse("ping"), env) == (["ws://a:1/ws", "ws://b:2/ws"], "dev:t:env")
    args = parse("--url", "ws://c:3/ws", "ping", "--api-key", "arqk_x_y")
    assert connection_options(args, env) == (["ws://c:3/ws"], "arqk_x_y")
    assert connection_options(parse("ping"), {})[1] == DEFAULT_TOKEN
    with pytest.raises(UsageError, match="not both"):
        connection_options(parse("--token", "a", "ping", "--api-key", "b"), {})


def test_lists_render_as_tables_with_the_next_cursor() -> None:
    result = {
        "rooms": [
            {"room": "ops", "channels": 2, "messages": 10, "last_seq": 99, "configured": True},
            {"room": "science", "channels": 1, "messages": 3, "last_seq": 7, "configured": False},
        ],
        "next_cursor": "science",
    }
    text = render(Request("admin", "admin", "list_rooms"), result)
    assert text.splitlines() == [
        "ROOM     CHANNELS  MESSAGES  LAST_SEQ  CONFIGURED",
        "ops      2         10        99        yes",
        "science  1         3         7         no",
        "more: pass --cursor science (or --all)",
    ]
    assert table([], ("channel",)) == "(none)"


def test_results_render_as_sentences_or_key_value_lines() -> None:
    deleted = {"room": "ops", "events_removed": 12, "presence_removed": 3}
    assert render(Request("ops", "admin", "delete_room"), deleted).startswith(
        "deleted room ops: removed 12 event(s), 3 presence entry(s)"
    )
    kick = Request("ops", "admin", "kick", {"principal": "mallory"})
    assert "kicked mallory from room ops" in render(kick, {"kicked": True})
    info = {"room": "ops", "retention_s": None, "presence": True, "occupancy": {"members": 2}}
    assert render(Request("ops", "ch", "channel_info"), info).splitlines() == [
        "room: ops",
        "retention_s: -",
        "presence: yes",
        f"occupancy: {orjson.dumps({'members': 2}).decode()}",
    ]
