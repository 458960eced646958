"""Built-in command names and parameter validation."""

from __future__ import annotations

from typing import Any

import pytest

from shared.commands import (
    BUILTIN_COMMANDS,
    HISTORY_DEFAULT_LIMIT,
    HISTORY_MAX_LIMIT,
    HistoryParams,
    JoinParams,
    history_params,
    join_params,
    require_builtin,
)
from shared.errors import ArqonError

BAD_SEQS: list[Any] = [True, False, -1, 1.0, 1.5, "3", [3], {"n": 3}]


def params_error(call: Any, *args: Any, **kwargs: Any) -> ArqonError:
    with pytest.raises(ArqonError) as info:
        call(*args, **kwargs)
    assert info.value.code == "invalid_parameters"
    return info.value


# -- command names ----------------------------------------------------------------


def test_builtin_commands_are_the_documented_three() -> None:
    assert set(BUILTIN_COMMANDS) == {"join_channel", "leave_channel", "history"}


@pytest.mark.parametrize("name", BUILTIN_COMMANDS)
def test_builtin_commands_are_accepted(name: str) -> None:
    assert require_builtin(name) == name


@pytest.mark.parametrize("name", ["status", "JOIN_CHANNEL", "join_channel ", "", "x" * 500])
def test_unknown_command_is_unknown_command(name: str) -> None:
    with pytest.raises(ArqonError) as info:
        require_builtin(name)
    assert info.value.code == "unknown_command"
    assert len(info.value.message) < 300


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
