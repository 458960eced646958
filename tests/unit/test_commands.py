"""Built-in command names and parameter validation."""

from __future__ import annotations

from typing import Any

import pytest

from arqonbus_server.shared.commands import (
    BUILTIN_COMMANDS,
    COMMAND_ALIASES,
    HISTORY_DEFAULT_LIMIT,
    HISTORY_MAX_LIMIT,
    HistoryParams,
    JoinParams,
    builtin_suggestion,
    gateway_answers,
    handler_params,
    history_params,
    is_builtin,
    join_params,
    misspelt_builtin,
    require_service_name,
    service_timeout_ms,
)
from arqonbus_server.shared.errors import ArqonError

BAD_SEQS: list[Any] = [True, False, -1, 1.0, 1.5, "3", [3], {"n": 3}]


def params_error(call: Any, *args: Any, **kwargs: Any) -> ArqonError:
    with pytest.raises(ArqonError) as info:
        call(*args, **kwargs)
    assert info.value.code == "invalid_parameters"
    return info.value


# -- command names ----------------------------------------------------------------


def test_builtin_commands_are_the_documented_ones() -> None:
    assert set(BUILTIN_COMMANDS) == {
        "join_channel",
        "leave_channel",
        "history",
        "register_handler",
        "unregister_handler",
        "limits",
        "room_configure",
        "room_invite",
        "room_uninvite",
        "room_ban",
        "room_unban",
        "room_mute",
        "room_unmute",
        "room_info",
        "register_agent",
        "refresh_token",
        "presence",
        "occupancy",
        "set_presence",
        "ping",
        "status",
        "list_rooms",
        "list_channels",
        "channel_info",
        "create_room",
        "configure_room",
        "delete_room",
        "kick",
    }
    assert all(is_builtin(name) for name in BUILTIN_COMMANDS)


@pytest.mark.parametrize("name", ["health", "JOIN_CHANNEL", "get-pool_2", "x" * 64])
def test_other_valid_names_are_service_commands(name: str) -> None:
    assert not is_builtin(name)
    assert require_service_name(name) == name


@pytest.mark.parametrize("name", ["join_channel ", "a.b", "a*", ">", "x" * 65, "é", "a b"])
def test_a_service_name_that_cannot_be_a_subject_token_is_unknown_command(name: str) -> None:
    with pytest.raises(ArqonError) as info:
        require_service_name(name)
    assert info.value.code == "unknown_command"
    assert len(info.value.message) < 400


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("subscribe", "join_channel"),
        ("Subscribe", "join_channel"),
        ("unsubscribe", "leave_channel"),
        ("join", "join_channel"),
        ("leave", "leave_channel"),
        ("JOIN_CHANNEL", "join_channel"),
        ("join-channel", "join_channel"),
        ("join.channel", "join_channel"),
        ("join_channel ", "join_channel"),
        ("joinchannel", "join_channel"),
        ("join_chanel", "join_channel"),
        ("histroy", "history"),
        ("limit", "limits"),
        ("room_ben", "room_ban"),
        ("room_mutee", "room_mute"),
        ("room_config", "room_configure"),
        ("register_agents", "register_agent"),
        ("refresh_tokens", "refresh_token"),
    ],
)
def test_a_name_close_to_a_built_in_suggests_it(name: str, meant: str) -> None:
    assert builtin_suggestion(name) == meant
    error = misspelt_builtin(name)
    assert error is not None
    assert (error.code, error.error.retryable) == ("unknown_command", False)
    assert error.message.startswith(f"unknown command {name!r}; did you mean {meant}? ")


# Names services use in the tests and examples, and names close to several built-ins.
@pytest.mark.parametrize(
    "name",
    [
        "restart",
        "explode",
        "svc",
        "echo",
        "search",
        "one",
        "register",
        "unregister",
        "refresh",
        "hist",
        "get_history",
        "room",
        "x" * 64,
        "",
        "_",
    ],
)
def test_a_name_far_from_every_built_in_suggests_nothing(name: str) -> None:
    assert builtin_suggestion(name) is None
    assert misspelt_builtin(name) is None


def test_aliases_name_built_ins() -> None:
    assert set(COMMAND_ALIASES.values()) <= set(BUILTIN_COMMANDS)
    assert not set(COMMAND_ALIASES) & set(BUILTIN_COMMANDS)


def test_an_invalid_service_name_close_to_a_built_in_suggests_it() -> None:
    with pytest.raises(ArqonError) as info:
        require_service_name("join_channel ")
    assert info.value.code == "unknown_command"
    assert "did you mean join_channel? " in info.value.message
    with pytest.raises(ArqonError) as info:
        require_service_name("a.b")
    assert "did you mean" not in info.value.message


@pytest.mark.parametrize(
    "params", [{}, {"command": None}, {"command": ""}, {"command": "a.b"}, {"command": 7}]
)
def test_handler_params_need_a_valid_command_name(params: dict[str, object]) -> None:
    with pytest.raises(ArqonError) as info:
        handler_params(params)
    assert info.value.code == "invalid_parameters"
    assert "'command'" in info.value.message


@pytest.mark.parametrize("name", sorted(set(BUILTIN_COMMANDS) - {"ping", "status"}))
def test_builtin_commands_cannot_be_handled(name: str) -> None:
    with pytest.raises(ArqonError) as info:
        handler_params({"command": name})
    assert info.value.code == "invalid_parameters"


def test_handler_params_return_the_name() -> None:
    assert handler_params({"command": "status", "other": 1}) == "status"


@pytest.mark.parametrize(("value", "expected"), [(None, 5000), (1, 1), (60000, 60000)])
def test_service_timeout_defaults_and_bounds(value: object, expected: int) -> None:
    assert service_timeout_ms(value, 5000, 60000) == expected


@pytest.mark.parametrize("value", [0, -1, 60001, 1.5, "100", True])
def test_service_timeout_rejects_out_of_range(value: object) -> None:
    with pytest.raises(ArqonError) as info:
        service_timeout_ms(value, 5000, 60000)
    assert info.value.code == "invalid_parameters"
    assert "timeout_ms" in info.value.message


# -- join_channel -------------------------------------------------------------------


def test_join_defaults_to_no_resume() -> None:
    assert join_params({}) == JoinParams(since_seq=None)
    assert join_params({"since_seq": None}) == JoinParams(since_seq=None)


@pytest.mark.parametrize("seq", [0, 1, 2**63])
def test_join_accepts_non_negative_since_seq(seq: int) -> None:
    assert join_params({"since_seq": seq}).since_seq == seq


@pytest.mark.parametrize("seq", BAD_SEQS)
def test_join_rejects_bad_since_seq(seq: Any) -> None:
    error = params_error(join_params, {"since_seq": seq})
    assert "since_seq" in error.message


def test_join_ignores_unrelated_parameters() -> None:
    assert join_params({"since_seq": 4, "other": "x"}) == JoinParams(since_seq=4)


# -- history --------------------------------------------------------------------------


def test_history_defaults() -> None:
    assert history_params({}) == HistoryParams(since_seq=0, limit=HISTORY_DEFAULT_LIMIT)
    assert history_params({"since_seq": None, "limit": None}) == HistoryParams(
        0, HISTORY_DEFAULT_LIMIT
    )


def test_history_default_limit_never_exceeds_max_limit() -> None:
    assert history_params({}, max_limit=10).limit == 10


@pytest.mark.parametrize("limit", [1, 50, HISTORY_MAX_LIMIT])
def test_history_accepts_limit_within_bounds(limit: int) -> None:
    assert history_params({"since_seq": 7, "limit": limit}) == HistoryParams(7, limit)


@pytest.mark.parametrize("limit", [0, HISTORY_MAX_LIMIT + 1, -1, *BAD_SEQS])
def test_history_rejects_bad_limit(limit: Any) -> None:
    error = params_error(history_params, {"limit": limit})
    assert "limit" in error.message


def test_history_limit_bound_follows_max_limit() -> None:
    assert history_params({"limit": 20}, max_limit=20).limit == 20
    error = params_error(history_params, {"limit": 21}, max_limit=20)
    assert "20" in error.message


@pytest.mark.parametrize("seq", BAD_SEQS)
def test_history_rejects_bad_since_seq(seq: Any) -> None:
    error = params_error(history_params, {"since_seq": seq})
    assert "since_seq" in error.message


def test_ping_and_status_are_the_gateways_only_in_its_own_room() -> None:
    for name in ("ping", "status"):
        assert is_builtin(name)
        assert gateway_answers(name, "_system")
        assert not gateway_answers(name, "services")  # the seed's "status" service
        assert handler_params({"command": name}) == name
    assert gateway_answers("list_rooms", "any") and not gateway_answers("svc", "_system")
    assert "'kick' is built-in and cannot be handled" in (
        params_error(handler_params, {"command": "kick"}).message
    )
