"""Built-in command names and their parameters, validated as plain data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.errors import INVALID_PARAMETERS, UNKNOWN_COMMAND, ArqonError

JOIN_CHANNEL = "join_channel"
LEAVE_CHANNEL = "leave_channel"
HISTORY = "history"
BUILTIN_COMMANDS = (JOIN_CHANNEL, LEAVE_CHANNEL, HISTORY)

HISTORY_DEFAULT_LIMIT = 100
HISTORY_MAX_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class JoinParams:
    since_seq: int | None


@dataclass(frozen=True, slots=True)
class HistoryParams:
    since_seq: int
    limit: int


def _seq(parameters: dict[str, Any], name: str) -> int | None:
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArqonError(INVALID_PARAMETERS, f"parameter {name!r} must be an integer >= 0")
    return value


def require_builtin(name: str) -> str:
    if name not in BUILTIN_COMMANDS:
        raise ArqonError(UNKNOWN_COMMAND, f"command {name[:64]!r} is not known")
    return name


def join_params(parameters: dict[str, Any]) -> JoinParams:
    return JoinParams(_seq(parameters, "since_seq"))


def history_params(parameters: dict[str, Any], max_limit: int = HISTORY_MAX_LIMIT) -> HistoryParams:
    since = _seq(parameters, "since_seq") or 0
    limit = _seq(parameters, "limit")
    if limit is None:
        limit = min(HISTORY_DEFAULT_LIMIT, max_limit)
    if not 1 <= limit <= max_limit:
        raise ArqonError(INVALID_PARAMETERS, f"parameter 'limit' must be between 1 and {max_limit}")
    return HistoryParams(since, limit)
