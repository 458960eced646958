"""The error catalogue and close codes."""

from __future__ import annotations

import re

import pytest

from arqonbus_server.shared import errors
from arqonbus_server.shared.errors import (
    CATALOGUE,
    INVALID_NAME,
    UNAVAILABLE,
    ArqonError,
    CloseCode,
    ErrorCode,
)

DEFINED = [v for v in vars(errors).values() if isinstance(v, ErrorCode)]


def test_every_defined_error_is_in_the_catalogue_under_its_code() -> None:
    assert DEFINED
    for entry in DEFINED:
        assert CATALOGUE[entry.code] is entry
    assert len(CATALOGUE) == len(DEFINED)


def test_codes_are_unique() -> None:
    codes = [entry.code for entry in DEFINED]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize("entry", DEFINED, ids=lambda e: e.code)
def test_entry_has_stable_code_and_message(entry: ErrorCode) -> None:
    assert re.fullmatch(r"[a-z][a-z_]*[a-z]", entry.code)
    assert entry.message.strip()
    assert entry.message.endswith(".")


def test_only_transient_errors_are_retryable() -> None:
    retryable = {code for code, entry in CATALOGUE.items() if entry.retryable}
    # rate_limited: wait retry_after_ms, then send the same frame again.
    assert retryable == {"unavailable", "internal", "no_responders", "timeout", "rate_limited"}


def test_error_message_puts_detail_before_the_catalogue_text() -> None:
    error = ArqonError(INVALID_NAME, "room 'a.b' is not a valid name")
    assert error.code == "invalid_name"
    assert error.message == f"room 'a.b' is not a valid name. {INVALID_NAME.message}"
    assert str(error) == error.message


def test_a_detail_ending_in_its_own_punctuation_gets_no_extra_full_stop() -> None:
    error = ArqonError(INVALID_NAME, "did you mean 'ab'?")
    assert error.message == f"did you mean 'ab'? {INVALID_NAME.message}"


def test_error_without_detail_uses_catalogue_message() -> None:
    error = ArqonError(UNAVAILABLE)
    assert error.message == UNAVAILABLE.message
    assert error.request_id is None


def test_with_request_id_keeps_error_and_detail() -> None:
    original = ArqonError(INVALID_NAME, "detail")
    tagged = original.with_request_id("req-9")
    assert tagged.request_id == "req-9"
    assert (tagged.error, tagged.detail, tagged.message) == (
        original.error,
        original.detail,
        original.message,
    )
    assert original.request_id is None


@pytest.mark.parametrize("code", [1011, 1012, 4001, 4002])
def test_close_codes_that_ask_for_reconnect(code: int) -> None:
    assert CloseCode(code).should_reconnect is True


@pytest.mark.parametrize("code", [1000, 1009])
def test_close_codes_that_do_not_ask_for_reconnect(code: int) -> None:
    assert CloseCode(code).should_reconnect is False
