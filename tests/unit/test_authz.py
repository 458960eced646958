"""Authorization: roles x actions x patterns, grants, bad grant strings, unknown roles."""

from __future__ import annotations

import pytest

from arqonbus_server.gateway.auth.base import AuthError, Credentials, DevAuthenticator
from arqonbus_server.shared import authz
from arqonbus_server.shared.authz import (
    ACTION_PERMISSIONS,
    ALL_PERMISSIONS,
    Capability,
    Decision,
    GrantError,
    Permission,
    decide,
    parse_grant,
    permission_for_command,
    policy_for,
)
from arqonbus_server.shared.commands import BUILTIN_COMMANDS

P = Permission
READ = {P.SUBSCRIBE, P.HISTORY, P.PRESENCE}
MEMBER = ALL_PERMISSIONS - {P.ADMIN}
ROLE_PERMISSIONS = {
    "owner": set(ALL_PERMISSIONS),
    "admin": set(ALL_PERMISSIONS),
    "member": set(MEMBER),
    "read-only": READ,
}


@pytest.mark.parametrize("role", sorted(ROLE_PERMISSIONS))
@pytest.mark.parametrize("permission", list(Permission), ids=str)
@pytest.mark.parametrize(("room", "channel"), [("science", "general"), ("ops", "alerts")])
def test_roles_times_permissions_on_any_channel(role, permission, room, channel) -> None:
    decision = decide(role, (), permission, room, channel)
    assert decision.allowed is (permission in ROLE_PERMISSIONS[role]), decision
    if not decision.allowed:
        # The reason names the missing permission and where.
        assert repr(permission.value) in decision.reason
        assert "'science'" in decision.reason or "'ops'" in decision.reason


# Client action -> permission, as documented in shared/authz.py and docs/protocol.md.
ACTIONS = [
    ("event", P.PUBLISH),
    ("join_channel", P.SUBSCRIBE),
    ("history", P.HISTORY),
    ("leave_channel", None),
    ("register_handler", P.HANDLE),
    ("unregister_handler", P.HANDLE),
]


@pytest.mark.parametrize(("action", "permission"), ACTIONS)
def test_action_mapping(action, permission) -> None:
    assert ACTION_PERMISSIONS[action] is permission
    if action != "event":
        assert permission_for_command(action) is permission


def test_every_builtin_command_is_mapped_and_other_commands_need_command() -> None:
    assert set(BUILTIN_COMMANDS) <= set(ACTION_PERMISSIONS)
    for service in ("query_db", "resize", "history2"):
        assert permission_for_command(service) is P.COMMAND


@pytest.mark.parametrize(
    ("role", "action", "allowed"),
    [
        ("read-only", "event", False),
        ("read-only", "join_channel", True),
        ("read-only", "history", True),
        ("read-only", "leave_channel", True),
        ("read-only", "register_handler", False),
        ("read-only", "unregister_handler", False),
        ("read-only", "command", False),
        ("member", "event", True),
        ("member", "register_handler", True),
        ("member", "command", True),
        ("member", "admin", False),
        ("owner", "admin", True),
        ("admin", "admin", True),
    ],
)
def test_decide_accepts_client_action_names(role, action, allowed) -> None:
    assert decide(role, (), action, "science", "general").allowed is allowed


def test_decide_rejects_an_unknown_action_name() -> None:
    with pytest.raises(ValueError, match="unknown action 'query_db'"):
        decide("owner", (), "query_db", "r", "c")


@pytest.mark.parametrize(
    ("grants", "action", "room", "channel", "allowed"),
    [
        # grants add to read-only ...
        (["science:general:publish"], "publish", "science", "general", True),
        (["science:general:publish"], "publish", "science", "other", False),
        (["science:general:publish"], "publish", "other", "general", False),
        (["science:*:publish"], "publish", "science", "anything", True),
        (["science:*:publish"], "publish", "sciences", "general", False),
        (["*:alerts:publish"], "publish", "ops", "alerts", True),
        (["*:alerts:publish"], "publish", "ops", "general", False),
        (["*:*:publish"], "publish", "x", "y", True),
        # ... only the named permissions ...
        (["science:*:publish"], "command", "science", "general", False),
        (["science:*:publish,handle"], "handle", "science", "general", True),
        (["science:*:publish, handle"], "handle", "science", "general", True),
        (["science:*:*"], "admin", "science", "general", True),
        (["science:*:*"], "admin", "other", "general", False),
        # ... several grants combine; the role's own permissions stay ...
        (["a:b:publish", "c:d:command"], "command", "c", "d", True),
        (["a:b:publish", "c:d:command"], "command", "a", "b", False),
        (["a:b:publish"], "subscribe", "z", "z", True),
        # names are exact (case-sensitive)
        (["Science:*:publish"], "publish", "science", "general", False),
    ],
)
def test_grants_add_to_read_only(grants, action, room, channel, allowed) -> None:
    decision = decide("read-only", grants, action, room, channel)
    assert decision.allowed is allowed, decision
    if allowed and action != "subscribe":
        assert "grant" in decision.reason


@pytest.mark.parametrize(
    ("grant", "expected"),
    [
        ("science:general:publish", Capability("science", "general", frozenset({P.PUBLISH}))),
        ("*:*:*", Capability("*", "*", ALL_PERMISSIONS)),
        (" *:x:history,subscribe ", Capability("*", "x", frozenset({P.HISTORY, P.SUBSCRIBE}))),
        ("a-1:b_2:admin", Capability("a-1", "b_2", frozenset({P.ADMIN}))),
    ],
)
def test_parse_grant(grant, expected) -> None:
    assert parse_grant(grant) == expected


@pytest.mark.parametrize(
    ("grant", "problem"),
    [
        ("", "expected 3 parts"),
        ("science", "expected 3 parts"),
        ("science:publish", "expected 3 parts"),
        ("a:b:c:publish", "expected 3 parts separated by ':', found 4"),
        ("sci*:general:publish", "room 'sci*' is neither a name nor '*'"),
        ("science:gen.eral:publish", "channel 'gen.eral' is neither a name nor '*'"),
        (":general:publish", "room '' is neither"),
        ("science:general:", "empty entry"),
        ("science:general:publish,", "empty entry"),
        ("science:general:pub", "unknown permission 'pub'"),
        ("science:general:PUBLISH", "unknown permission 'PUBLISH'"),
        ("science:general:publish,*", "unknown permission '*'"),
    ],
)
def test_bad_grants_say_what_to_fix(grant, problem) -> None:
    with pytest.raises(GrantError) as info:
        parse_grant(grant)
    assert isinstance(info.value, ValueError)
    assert problem in info.value.problem
    assert info.value.grant == grant
    message = str(info.value)
    assert f"invalid grant {grant!r}" in message
    # What to do: the valid permissions are listed.
    assert "publish, subscribe, history, presence, command, handle, admin" in message


def test_a_bad_grant_denies_everything() -> None:
    decision = decide("owner", ["science:general:pub"], "subscribe", "science", "general")
    assert not decision.allowed
    assert "invalid grant" in decision.reason and "unknown permission 'pub'" in decision.reason


@pytest.mark.parametrize("role", ["", "root", "Owner", "read_only", "guest"])
@pytest.mark.parametrize("action", [*Permission, "leave_channel"], ids=str)
def test_unknown_role_denies_everything(role, action) -> None:
    decision = decide(role, ["*:*:*"], action, "science", "general")
    assert not decision.allowed
    assert f"unknown role {role!r}" in decision.reason
    assert "owner, admin, member, read-only" in decision.reason


def test_decision_is_truthy_only_when_allowed() -> None:
    assert Decision(True, "x") and not Decision(False, "x")


def test_parsed_grants_and_policies_are_cached() -> None:
    assert parse_grant("cache:me:publish") is parse_grant("cache:me:publish")
    assert policy_for("member", ("a:b:*",)) is policy_for("member", ("a:b:*",))
    decide("read-only", ["cache:me:publish"], "publish", "cache", "me")
    before = authz.policy_for.cache_info().hits
    decide("read-only", ["cache:me:publish"], "publish", "cache", "me")
    assert authz.policy_for.cache_info().hits == before + 1


# -- dev tokens: dev:<tenant>:<principal>[:<role>] ----------------------------------------


@pytest.fixture(scope="module")
def dev() -> DevAuthenticator:
    return DevAuthenticator()


@pytest.mark.parametrize(
    ("token", "role"),
    [
        ("dev:t:alice", "owner"),
        ("dev:t:alice:owner", "owner"),
        ("dev:t:alice:admin", "admin"),
        ("dev:t:alice:member", "member"),
        ("dev:t:alice:read-only", "read-only"),
    ],
)
def test_dev_token_role(dev, token, role) -> None:
    principal = dev.authenticate(Credentials(token))
    assert (principal.tenant, principal.id, principal.role, principal.grants) == (
        "t",
        "alice",
        role,
        (),
    )


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("dev:t:alice:root", "unknown role in dev token: use one of owner, admin, member"),
        ("dev:t:alice:", "unknown role"),
        ("dev:t:alice:member:extra", "malformed token"),
        ("dev:t", "malformed token"),
    ],
)
def test_dev_token_bad_role_is_refused(dev, token, message) -> None:
    with pytest.raises(AuthError, match=message):
        dev.authenticate(Credentials(token))
