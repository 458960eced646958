"""A bounded fuzz run of every entry point that turns client bytes into structures.

The strategies and properties live in :mod:`chaos.fuzz`; ``make chaos`` runs the same
targets for minutes (and atheris on raw bytes when it is installed). Here each target
gets a few hundred examples so ``make test`` stays fast.
"""

from __future__ import annotations

from typing import Any

import pytest

from arqonbus_server.shared import envelope
from arqonbus_server.shared.errors import INVALID_NAME, INVALID_PARAMETERS, ArqonError
from chaos import fuzz

# Examples per target: the frame targets draw whole envelopes, the others are cheap.
EXAMPLES = {
    "frame_bytes": 200,
    "frame_fields": 200,
    "frame_nesting": 200,
    "frame_text": 200,
    "frame_roundtrip": 200,
    "command_parameters": 300,
    "service_command": 500,
    "response_error": 500,
}


def test_every_target_has_a_budget() -> None:
    assert {t.name for t in fuzz.TARGETS} == set(EXAMPLES)


@pytest.mark.parametrize("target", fuzz.TARGETS, ids=lambda t: t.name)
def test_target_returns_a_value_or_a_catalogue_error(target: fuzz.Target) -> None:
    fuzz.hypothesis_test(target, EXAMPLES[target.name])()


# -- the harness itself can fail -------------------------------------------------------


def test_a_stray_exception_is_a_failure_with_the_shrunk_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = envelope.parse_client_frame

    def broken(data: bytes | str, max_bytes: int) -> Any:
        if len(data) > 10:
            raise KeyError("id")
        return real(data, max_bytes)

    monkeypatch.setattr(envelope, "parse_client_frame", broken)
    target = next(t for t in fuzz.TARGETS if t.name == "frame_bytes")
    outcome = fuzz.run_hypothesis(target, seconds=0)
    assert outcome.examples > 0
    assert len(outcome.failures) == 1
    assert outcome.failures[0]["error"].startswith("KeyError")
    assert outcome.failures[0]["input"] == repr(b"\x00" * 11)


def test_an_error_with_a_code_the_entry_point_may_not_raise_is_a_failure() -> None:
    with pytest.raises(AssertionError, match="invalid_name"):
        fuzz.check_error(ArqonError(INVALID_NAME, "room"), fuzz.PARAMETER_CODES)


def test_an_error_message_over_the_limit_is_a_failure() -> None:
    with pytest.raises(AssertionError, match="characters"):
        fuzz.check_error(ArqonError(INVALID_PARAMETERS, "x" * 1024), fuzz.PARAMETER_CODES)


def test_a_non_arqon_error_is_raised_again() -> None:
    with pytest.raises(RecursionError):
        fuzz.check_error(RecursionError("deep"), fuzz.FRAME_CODES)


def test_dump_writes_duplicate_keys_and_raw_fragments() -> None:
    pairs = fuzz.Pairs((("id", "a"), ("id", fuzz.Raw(b"NaN"))))
    assert fuzz.dump({"x": [pairs, fuzz.Raw(b"\xff")]}) == b'{"x":[{"id":"a","id":NaN},\xff]}'
