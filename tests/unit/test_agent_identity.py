"""Agent tokens: the canonical message, signing, parsing and verification (pure)."""

from __future__ import annotations

import base64
import time

import pytest

from arqonbus_server.gateway.auth.agent import RegistrationError, new_record, revoked_agent_id
from arqonbus_server.gateway.auth.base import AGENT_TOKEN_PREFIX, token_method
from arqonbus_server.shared import agent_identity as ai
from arqonbus_server.shared.envelope import parse_auth_frame
from arqonbus_server.shared.errors import ArqonError

KEY = ai.generate_private_key()
AGENT = "9d6b1f2e-4c3a-4b8e-9f10-2a3b4c5d6e7f"  # fixed: xdist workers collect the same ids
NONCE = "x2APLlaWOb4pJ6Akba_jCna3waneSbjm_NT1HkyZ0R4"


def test_prefix_matches_the_gateways_and_picks_the_agent_method() -> None:
    assert ai.TOKEN_PREFIX == AGENT_TOKEN_PREFIX
    assert token_method(ai.sign_token(KEY, AGENT, NONCE)) == "agent"


def test_signed_message_is_the_documented_bytes() -> None:
    assert ai.signed_message(AGENT, NONCE, 1700000000) == (
        b"arqonbus-agent-auth-v1\n" + AGENT.encode() + b"\n" + NONCE.encode() + b"\n1700000000"
    )


def test_sign_parse_verify_round_trip() -> None:
    token = ai.sign_token(KEY, AGENT, NONCE, 1700000000)
    parsed = ai.parse_token(token)
    assert (parsed.agent_id, parsed.nonce, parsed.timestamp) == (AGENT, NONCE, 1700000000)
    assert ai.verify(ai.public_key_bytes(KEY), parsed)
    assert token.rsplit(":", 1)[1] == ai.b64url(KEY.sign(parsed.message))


def test_wrong_key_and_tampered_fields_fail_verification() -> None:
    parsed = ai.parse_token(ai.sign_token(KEY, AGENT, NONCE, 1700000000))
    other = ai.generate_private_key()
    assert not ai.verify(ai.public_key_bytes(other), parsed)
    for changed in (
        ai.AgentToken(ai.new_agent_id(), parsed.nonce, parsed.timestamp, parsed.signature),
        ai.AgentToken(parsed.agent_id, ai.new_nonce(), parsed.timestamp, parsed.signature),
        ai.AgentToken(parsed.agent_id, parsed.nonce, parsed.timestamp + 1, parsed.signature),
    ):
        assert not ai.verify(ai.public_key_bytes(KEY), changed)


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("ed25519:x", "expected"),
        (f"ed25519:not-a-uuid:{NONCE}:1:{'A' * 86}", "UUID"),
        (f"ed25519:{AGENT}:short:1:{'A' * 86}", "nonce"),
        (f"ed25519:{AGENT}:{NONCE}:-5:{'A' * 86}", "timestamp"),
        (f"ed25519:{AGENT}:{NONCE}:12.5:{'A' * 86}", "timestamp"),
        (f"ed25519:{AGENT}:{NONCE}:1:AAAA", "64 bytes"),
        (f"ed25519:{AGENT}:{NONCE}:1:***", "base64url"),
        ("jwt.like.token", "starts with"),
    ],
)
def test_malformed_tokens_say_which_part_is_wrong(token: str, problem: str) -> None:
    with pytest.raises(ai.AgentIdentityError, match=problem):
        ai.parse_token(token)


def test_public_key_forms() -> None:
    raw = ai.public_key_bytes(KEY)
    from cryptography.hazmat.primitives import serialization

    pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert ai.parse_public_key(ai.public_key_b64(KEY)) == raw
    assert ai.parse_public_key(base64.b64encode(raw).decode()) == raw  # padded standard base64
    assert ai.parse_public_key(pem) == raw
    with pytest.raises(ai.AgentIdentityError, match="32 raw bytes"):
        ai.parse_public_key(ai.b64url(raw[:31]))
    assert ai.public_key_bytes(ai.load_private_key(ai.private_key_pem(KEY))) == raw


def test_record_round_trip_and_registration_checks() -> None:
    record = new_record("t1", "bot", ai.public_key_b64(KEY), "member", ["r:*:publish"])
    assert ai.is_agent_id(record.agent_id)
    assert ai.AgentRecord.from_json(record.to_json()) == record
    assert record.public_key_bytes == ai.public_key_bytes(KEY)
    with pytest.raises(RegistrationError, match="already registered"):
        new_record("t1", "bot2", ai.public_key_b64(KEY), existing=[record])
    new_record("t2", "bot2", ai.public_key_b64(KEY), existing=[record])  # other tenant: fine
    with pytest.raises(RegistrationError, match="unknown role"):
        new_record("t1", "bot", ai.public_key_b64(ai.generate_private_key()), "god")
    with pytest.raises(RegistrationError, match="grant"):
        new_record("t1", "bot", ai.public_key_b64(ai.generate_private_key()), grants=["bad"])
    assert revoked_agent_id(record.agent_id, record.to_json()) is None
    revoked = ai.AgentRecord.from_json(
        record.to_json().replace(b'"revoked_at":null', b'"revoked_at":1.0')
    )
    assert revoked_agent_id(record.agent_id, revoked.to_json()) == record.agent_id
    assert revoked_agent_id(record.agent_id, None) == record.agent_id


def test_sign_token_defaults_to_now() -> None:
    before = int(time.time())
    assert before <= ai.parse_token(ai.sign_token(KEY, AGENT, NONCE)).timestamp <= before + 2


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (b"nope", "JSON"),
        (b"[]", "object"),
        (b'{"type":"event","payload":{}}', "type 'auth'"),
        (b'{"type":"auth","payload":[]}', "payload"),
        (b'{"type":"auth","payload":{"token":""}}', "payload.token"),
        (b'{"type":"auth","version":"2","payload":{"token":"x"}}', "version"),
    ],
)
def test_auth_frame_errors(frame: bytes, problem: str) -> None:
    with pytest.raises(ArqonError, match=problem):
        parse_auth_frame(frame, 65536)


def test_auth_frame_token() -> None:
    assert parse_auth_frame(b'{"type":"auth","payload":{"token":"dev:t:p"}}', 65536) == "dev:t:p"
