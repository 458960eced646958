"""Content policies (shared/inspect.py): built-ins, chain, bounds, config errors, plugins."""

from __future__ import annotations

import importlib
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest

from arqonbus_server.gateway.config import load_settings
from arqonbus_server.gateway.policies import load_plugin, load_policy, policy_for
from arqonbus_server.shared.envelope import ClientEvent, encode_stored_event, with_seq
from arqonbus_server.shared.errors import CATALOGUE, ArqonError
from arqonbus_server.shared.inspect import (
    EMPTY_POLICY,
    ENTRY_POINT_GROUP,
    MESSAGE_MAX,
    REDACTED,
    Inspector,
    PolicyError,
    Verdict,
    parse_policy,
    with_tags,
)
from arqonbus_server.shared.settings import ConfigError

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "examples" / "inspector_plugin"
SSN = r"\b\d{3}-\d{2}-\d{4}\b"
SECRET = "123-45-6789"


def event(payload: dict[str, Any], room: str = "lobby", channel: str = "general") -> ClientEvent:
    return ClientEvent("e1", room, channel, payload)


def policy(*rules: dict[str, Any], tenant: str = "acme") -> Any:
    return parse_policy({"tenants": {tenant: list(rules)}}, "policy", load_plugin)


def refused(pol: Any, payload: dict[str, Any], **where: str) -> ArqonError:
    with pytest.raises(ArqonError) as info:
        pol.check_event(event(payload, **where), "acme", "alice")
    assert info.value.request_id == "e1"
    return info.value


def nested(depth: int, leaf: Any) -> dict[str, Any]:
    value: Any = leaf
    for _ in range(depth - 1):
        value = {"a": value}
    return {"a": value}


# -- no policy ---------------------------------------------------------------------------


def test_no_policy_returns_the_same_event_untouched():
    ev = event({"text": SECRET})
    assert policy_for("") is EMPTY_POLICY and EMPTY_POLICY.empty
    assert EMPTY_POLICY.check_event(ev, "acme", "alice") == (ev, [])
    pol = policy({"kind": "deny", "patterns": [SSN]})
    out, tags = pol.check_event(ev, "other", "alice")  # a tenant the policy does not list
    assert out is ev and tags == []


def test_default_chain_applies_to_unlisted_tenants_only():
    pol = parse_policy({"tenants": {"*": [{"kind": "deny", "patterns": [SSN]}], "free": []}})
    with pytest.raises(ArqonError):
        pol.check_event(event({"t": SECRET}), "acme", "alice")
    ev = event({"t": SECRET})
    assert pol.check_event(ev, "free", "alice") == (ev, [])  # listed with no rules


# -- deny --------------------------------------------------------------------------------


def test_deny_pattern_anywhere_in_the_payload_without_echoing_it():
    pol = policy({"kind": "deny", "name": "no-ssn", "patterns": ["forbidden", SSN]})
    err = refused(pol, {"a": [1, {"b": ["x", f"mine is {SECRET}"]}]})
    assert err.code == "policy_violation" and not err.error.retryable
    assert "no-ssn" in err.message and SECRET not in err.message
    ev = event({"a": [1, {"b": ["123-456-789", 123456789]}], "forbidden_key": "ok"})
    assert pol.check_event(ev, "acme", "alice") == (ev, [])  # keys and numbers not scanned


def test_deny_custom_message_and_scope_by_room_and_channel():
    pol = policy(
        {
            "kind": "deny",
            "patterns": ["(?i)spoiler"],
            "rooms": ["movies"],
            "channels": ["new", "hot"],
            "message": "no spoilers here",
        }
    )
    assert refused(pol, {"t": "SPOILER"}, room="movies", channel="hot").message.startswith(
        "no spoilers here"
    )
    for room, channel in (("movies", "old"), ("books", "hot")):
        ev = event({"t": "spoiler"}, room, channel)
        assert pol.check_event(ev, "acme", "alice") == (ev, [])


# -- schema ------------------------------------------------------------------------------

ORDER_SCHEMA = {
    "type": "object",
    "required": ["qty", "card"],
    "properties": {"qty": {"type": "integer", "minimum": 1}, "card": {"type": "string"}},
}


def test_schema_per_channel_names_the_field_never_the_value():
    pol = policy(
        {"kind": "schema", "name": "orders", "channels": ["orders"], "schema": ORDER_SCHEMA}
    )
    err = refused(pol, {"qty": SECRET, "card": "x"}, channel="orders")
    assert err.code == "invalid_payload"
    assert "payload.qty" in err.message and "'type'" in err.message and "orders" in err.message
    assert SECRET not in err.message
    err = refused(pol, {"card": SECRET}, channel="orders")
    assert "qty" in err.message and "required" in err.message and SECRET not in err.message
    ok = event({"qty": 2, "card": "x"}, channel="orders")
    assert pol.check_event(ok, "acme", "alice") == (ok, [])
    other = event({"qty": "none"}, channel="general")  # the schema is for 'orders' only
    assert pol.check_event(other, "acme", "alice") == (other, [])


def test_schema_per_payload_type_and_message_cap():
    pol = policy({"kind": "schema", "payload_type": "order", "schema": ORDER_SCHEMA})
    chat = event({"type": "chat", "text": "hi"})
    assert pol.check_event(chat, "acme", "alice") == (chat, [])
    long_key = "k" * 5000
    deep = {"type": "order", "qty": 1, "card": {long_key: {long_key: SECRET}}}
    err = refused(pol, deep)
    assert err.code == "invalid_payload" and SECRET not in err.message
    assert len(err.message) <= MESSAGE_MAX + len(CATALOGUE["invalid_payload"].message) + 2


# -- redact ------------------------------------------------------------------------------


def test_redact_fields_and_patterns_in_the_stored_envelope():
    pol = policy(
        {
            "kind": "redact",
            "fields": ["card.number", "users.*.password", "list.1"],
            "patterns": [SSN],
        }
    )
    payload = {
        "card": {"number": 4111111111111111, "brand": "visa"},
        "users": [{"password": "p1", "n": 1}, {"password": "p2"}, {"n": 3}],
        "list": ["a", "b", "c"],
        "note": f"ssn {SECRET} and {SECRET}",
        "missing": {"card": 1},
    }
    original = orjson.dumps(payload)
    out, tags = pol.check_event(event(payload), "acme", "alice")
    assert tags == []
    assert out.payload == {
        "card": {"number": REDACTED, "brand": "visa"},
        "users": [{"password": REDACTED, "n": 1}, {"password": REDACTED}, {"n": 3}],
        "list": ["a", REDACTED, "c"],
        "note": f"ssn {REDACTED} and {REDACTED}",
        "missing": {"card": 1},
    }
    assert orjson.dumps(payload) == original  # the parsed input is not mutated
    stored = encode_stored_event(out, "alice", "2025-01-01T00:00:00.000Z")
    assert SECRET.encode() not in stored and b"p1" not in stored
    ev = event({"nothing": "here"})
    assert pol.check_event(ev, "acme", "alice")[0] is ev  # nothing redacted: same object


def test_rules_run_in_order_redact_before_deny():
    redact = {"kind": "redact", "patterns": [SSN]}
    deny = {"kind": "deny", "patterns": [SSN]}
    out, _ = policy(redact, deny).check_event(event({"t": SECRET}), "acme", "alice")
    assert out.payload == {"t": REDACTED}
    assert refused(policy(deny, redact), {"t": SECRET}).code == "policy_violation"


# -- tag ---------------------------------------------------------------------------------


def test_tag_goes_into_the_stored_envelope():
    pol = policy(
        {"kind": "tag", "tag": "pii", "patterns": [SSN]},
        {"kind": "tag", "tag": "pii", "patterns": ["(?i)passport"]},
        {"kind": "tag", "tag": "travel", "patterns": ["(?i)passport"]},
    )
    ev = event({"a": {"b": [f"passport and {SECRET}"]}})
    out, tags = pol.check_event(ev, "acme", "alice")
    assert out is ev and tags == ["pii", "travel"]
    stored = with_tags(encode_stored_event(out, "alice", "t"), tags)
    delivered = orjson.loads(with_seq(stored, 7))
    assert delivered["tags"] == ["pii", "travel"] and delivered["seq"] == 7
    assert delivered["payload"] == ev.payload
    assert with_tags(b'{"a":1}', []) == b'{"a":1}'
    assert pol.check_event(event({"t": "hello"}), "acme", "alice")[1] == []


# -- bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        {"kind": "deny", "patterns": ["zzz"]},
        {"kind": "tag", "tag": "x", "patterns": ["zzz"]},
        {"kind": "redact", "patterns": ["zzz"]},
    ],
    ids=["deny", "tag", "redact"],
)
def test_payloads_beyond_the_bounds_are_refused_not_let_through(rule: dict[str, Any]):
    pol = policy({**rule, "max_depth": 8, "max_chars": 1000})
    assert pol.check_event(event(nested(8, "ok")), "acme", "alice")[0].payload == nested(8, "ok")
    err = refused(pol, nested(9, "ok"))
    assert err.code == "policy_violation" and "8 levels" in err.message
    err = refused(pol, {"a": ["x" * 600, "y" * 600]})
    assert err.code == "policy_violation" and "1000 characters" in err.message
    # The default bounds hold against the deepest envelope the gateway accepts.
    default = policy(rule)
    assert refused(default, nested(253, "ok")).code == "policy_violation"


class CountingPattern:
    """A compiled pattern that counts the characters it is asked to search."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.chars = 0

    def search(self, text: str) -> re.Match[str] | None:
        self.chars += len(text)
        return self.pattern.search(text)


def test_scan_work_is_bounded_by_max_chars():
    pol = policy({"kind": "deny", "patterns": ["(a|b)*c"], "max_chars": 10_000})
    counting = CountingPattern(re.compile("(a|b)*c"))
    pol.chain_for("acme").rules[0].inspector.patterns = [counting]
    huge = {"t": ["ab" * 1000] * 100_000}  # 200 M characters if scanned in full
    assert refused(pol, huge).code == "policy_violation"
    assert 0 < counting.chars <= 10_000


# -- plugins -----------------------------------------------------------------------------


@pytest.fixture
def plugin_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The example plugin on sys.path, with the entry points its pyproject declares.

    Writes the dist-info that ``pip install examples/inspector_plugin`` would, from the
    example's own pyproject.toml, so the test checks the documented declaration.
    """
    project = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]
    points = project["entry-points"][ENTRY_POINT_GROUP]
    info = tmp_path / "arqonbus_inspector_example-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: arqonbus-inspector-example\nVersion: 0.1.0\n"
    )
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    importlib.invalidate_caches()
    yield tmp_path
    sys.modules.pop("arqonbus_inspector_example", None)


@pytest.mark.parametrize(
    "reference",
    [{"entry_point": "example-max-length"}, {"object": "arqonbus_inspector_example:MaxLength"}],
    ids=["entry_point", "object"],
)
def test_example_plugin_loads_and_inspects(plugin_path: Path, reference: dict[str, str]):
    pol = policy({"kind": "plugin", "name": "short", **reference, "options": {"max": 5}})
    ev = event({"text": "hello"})
    assert pol.check_event(ev, "acme", "alice") == (ev, [])
    err = refused(pol, {"text": "hello!"})
    assert err.code == "policy_violation" and "longer than 5" in err.message


def test_example_plugin_bad_options_fail_at_load(plugin_path: Path):
    with pytest.raises(PolicyError, match=r"tenant 'acme' rule #1 \('p'\).*failed to start"):
        policy(
            {
                "kind": "plugin",
                "name": "p",
                "entry_point": "example-max-length",
                "options": {"max": "x"},
            }
        )


class Broken:
    def __init__(self, options: dict[str, Any]) -> None:
        self.result: Any = options.get("result")

    def inspect(self, ctx: Any, payload: dict[str, Any]) -> Verdict:
        if self.result == "raise":
            raise RuntimeError(f"boom {payload}")
        return self.result  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "result",
    ["raise", "not a verdict", Verdict(False, message="no code"), Verdict(True, tags=("bad tag",))],
)
def test_a_failing_plugin_fails_closed_with_internal(result: Any, caplog: pytest.LogCaptureFixture):
    pol = policy({"kind": "plugin", "name": "broken", "object": f"{__name__}:Broken"})
    pol.chain_for("acme").rules[0].inspector.result = result
    err = refused(pol, {"text": SECRET})
    assert err.code == "internal" and "broken" in err.message and SECRET not in err.message
    assert "content inspector 'broken' of tenant 'acme' failed" in caplog.text
    assert SECRET not in caplog.text


def test_builtins_satisfy_the_inspector_protocol():
    pol = policy(
        {"kind": "deny", "patterns": ["x"]},
        {"kind": "schema", "schema": {}},
        {"kind": "redact", "fields": ["a"]},
        {"kind": "tag", "tag": "t", "patterns": ["x"]},
    )
    assert all(isinstance(r.inspector, Inspector) for r in pol.chain_for("acme").rules)


# -- configuration errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ([], r'must be a JSON object \{"tenants"'),
        ({"tenants": {}, "extra": 1}, r'must be a JSON object \{"tenants"'),
        ({"tenants": {"bad name": []}}, r"tenant 'bad name': a tenant is"),
        ({"tenants": {"acme": {}}}, r"tenant 'acme': must be a list of rules"),
        (
            {"tenants": {"acme": [{"kind": "nope"}]}},
            r"tenant 'acme' rule #1: 'kind' must be one of",
        ),
        (
            {
                "tenants": {
                    "acme": [
                        {"kind": "tag", "tag": "t", "patterns": ["x"]},
                        {"kind": "deny", "name": "d", "patterns": ["("]},
                    ]
                }
            },
            r"tenant 'acme' rule #2 \('d'\): pattern #1 is not a valid regex",
        ),
        (
            {"tenants": {"acme": [{"kind": "deny", "pattern": "x"}]}},
            r"rule #1 \('deny #1'\): unknown key\(s\) \['pattern'\]",
        ),
        (
            {"tenants": {"acme": [{"kind": "deny", "patterns": []}]}},
            r"'patterns' must list at least one",
        ),
        (
            {"tenants": {"acme": [{"kind": "deny", "patterns": ["x"], "max_depth": 0}]}},
            r"'max_depth' must be",
        ),
        (
            {"tenants": {"acme": [{"kind": "deny", "patterns": ["x"], "rooms": ["a b"]}]}},
            r"'rooms' must be",
        ),
        (
            {"tenants": {"acme": [{"kind": "schema", "schema": {"type": 12}}]}},
            r"rule #1 \('schema #1'\): invalid JSON Schema",
        ),
        ({"tenants": {"acme": [{"kind": "redact"}]}}, r"needs 'fields' or 'patterns'"),
        (
            {"tenants": {"acme": [{"kind": "redact", "fields": ["a..b"]}]}},
            r"'fields' must be a list of dotted paths",
        ),
        (
            {"tenants": {"acme": [{"kind": "tag", "tag": "a b", "patterns": ["x"]}]}},
            r"'tag' must be",
        ),
        ({"tenants": {"acme": [{"kind": "plugin"}]}}, r"exactly one of 'entry_point' or 'object'"),
        (
            {"tenants": {"acme": [{"kind": "plugin", "entry_point": "missing-one"}]}},
            r"no entry point 'missing-one' in group 'arqonbus.inspectors'",
        ),
        (
            {"tenants": {"acme": [{"kind": "plugin", "object": "no_such_module_x:C"}]}},
            r"cannot import module 'no_such_module_x'",
        ),
        (
            {
                "tenants": {
                    "acme": [{"kind": "plugin", "object": "arqonbus_server.shared.inspect:Nope"}]
                }
            },
            r"has no 'Nope'",
        ),
        (
            {"tenants": {"acme": [{"kind": "plugin", "object": "builtins:dict"}]}},
            r"made dict, with no inspect",
        ),
    ],
)
def test_config_errors_name_the_tenant_and_rule(doc: Any, expected: str):
    with pytest.raises(PolicyError, match=expected):
        parse_policy(doc, "policy", load_plugin)


def test_policy_file_setting_is_validated_at_start_up(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"tenants": {"acme": [{"kind": "deny", "name": "ssn", "patterns": ["["]}]}}')
    with pytest.raises(ConfigError, match=r"ARQONBUS_POLICY_FILE.*tenant 'acme' rule #1 \('ssn'\)"):
        load_settings(policy_file=str(bad))
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")
    with pytest.raises(PolicyError, match="not valid JSON"):
        load_policy(str(broken))
    with pytest.raises(PolicyError, match="cannot read it"):
        load_policy(str(tmp_path / "absent.json"))
    good = tmp_path / "good.json"
    good.write_text('{"tenants": {"acme": [{"kind": "deny", "patterns": ["x"]}]}}')
    settings = load_settings(policy_file=str(good))
    assert policy_for(settings.policy_file) is policy_for(str(good))  # parsed once
    assert not policy_for(str(good)).empty


def test_the_protocol_doc_example_is_a_valid_policy(plugin_path: Path):
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    block = text.split("## Content policies")[1].split("```json")[1].split("```")[0]
    pol = parse_policy(orjson.loads(block), "policy", load_plugin)
    assert len(pol.chain_for("acme").rules) == 6


def test_schema_remote_ref_is_never_fetched_and_fails_closed(caplog: pytest.LogCaptureFixture):
    pol = policy({"kind": "schema", "name": "remote", "schema": {"$ref": "http://127.0.0.1:9/s"}})
    err = refused(pol, {"a": SECRET})
    assert err.code == "internal" and "remote" in err.message and SECRET not in caplog.text


def test_without_a_loader_a_plugin_rule_is_refused_and_nothing_is_imported():
    """shared/ never imports plugin code itself: the gateway passes its loader in."""
    doc = {"tenants": {"acme": [{"kind": "plugin", "object": "no_such_module_x:C"}]}}
    with pytest.raises(PolicyError, match="plugins cannot be loaded here"):
        parse_policy(doc)
