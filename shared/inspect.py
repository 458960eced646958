"""Content policies: a chain of inspectors per tenant, run on every event before it is stored.

The gateway calls :meth:`Policy.check_event` on each parsed :class:`~shared.envelope.ClientEvent`
of a publish. The tenant's chain runs its inspectors in the configured order; each returns a
:class:`Verdict`:

* allow, optionally with a new payload (redaction) and tags: later inspectors see the new
  payload, and the stored and delivered event carries it;
* deny, with a catalogue error code (``policy_violation``, ``invalid_payload``) and a message:
  the publish fails with that error and nothing is stored.

A tenant with no rules costs one dict lookup.

Tags are stored in the envelope, next to ``from`` and ``timestamp``: ``"tags": ["pii"]``
(present only when an inspector added one), so members, ``history`` and any consumer of the
stream see them; :func:`with_tags` adds the field to a stored envelope. Clients cannot set it:
the gateway builds the stored envelope itself.

The policy is a JSON file named by the ``policy_file`` setting, read and validated once at
start-up (see docs/protocol.md, "Content policies")::

    {"tenants": {
        "acme": [
            {"kind": "deny", "name": "no-ssn", "patterns": ["\\\\b\\\\d{3}-\\\\d{2}-\\\\d{4}\\\\b"]},
            {"kind": "schema", "channels": ["orders"], "schema": {"type": "object"}},
            {"kind": "redact", "fields": ["card.number"], "patterns": ["\\\\b\\\\d{16}\\\\b"]},
            {"kind": "tag", "tag": "pii", "patterns": ["(?i)passport"]},
            {"kind": "plugin", "entry_point": "example-max-length", "options": {"max": 10}}
        ],
        "*": []
    }}

``"*"`` is the chain of every tenant not listed. Every rule may have ``name`` (shown in
errors), ``rooms`` and ``channels`` (it applies only there). A tenant's rules may also be
kept in NATS KV (``arqonbus policy set``; :class:`LayeredPolicy`): they replace the file's
rules for that tenant on every gateway, without a restart.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import jsonschema
import jsonschema.exceptions
import jsonschema.validators
import orjson

from arqonbus_server.shared.envelope import ClientEvent
from arqonbus_server.shared.errors import (
    CATALOGUE,
    INTERNAL,
    INVALID_PAYLOAD,
    POLICY_VIOLATION,
    ArqonError,
    ErrorCode,
    InvalidInput,
)
from arqonbus_server.shared.subjects import is_valid_name

log = logging.getLogger("arqonbus.inspect")

ENTRY_POINT_GROUP = "arqonbus.inspectors"
# (way, value, where) -> the plugin's factory; way is "entry_point" or "object". The gateway's
# loader (gateway/policies.py) imports code, so it is passed in, never imported here.
PluginLoader = Callable[[str, object, str], Callable[[dict[str, Any]], Any]]
REDACTED = "[redacted]"
DEFAULT_TENANT = "*"
# Bounds of one scan of a payload's string values (per rule; configurable per rule).
DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_CHARS = 1024 * 1024
MAX_DEPTH_LIMIT = 254
MAX_CHARS_LIMIT = 16 * 1024 * 1024
# Tags one event may carry; a deny message is cut to this many characters.
TAGS_MAX = 16
MESSAGE_MAX = 300
_SHOWN = 40  # a key or a schema value quoted in a message

# -- the inspector interface -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InspectContext:
    """Who publishes what, where. ``principal`` is the authenticated sender's id."""

    tenant: str
    room: str
    channel: str
    principal: str
    message_type: str = "event"


@dataclass(frozen=True, slots=True)
class Verdict:
    """An inspector's answer. Build it with :meth:`allow` or :meth:`deny`."""

    allowed: bool
    payload: dict[str, Any] | None = None  # None: unchanged
    tags: tuple[str, ...] = ()
    error: ErrorCode | None = None
    message: str = ""

    @staticmethod
    def allow(payload: dict[str, Any] | None = None, tags: tuple[str, ...] = ()) -> Verdict:
        return ALLOW if payload is None and not tags else Verdict(True, payload, tuple(tags))

    @staticmethod
    def deny(error: ErrorCode, message: str) -> Verdict:
        return Verdict(False, error=error, message=message)


ALLOW = Verdict(True)


@runtime_checkable
class Inspector(Protocol):
    def inspect(self, ctx: InspectContext, payload: dict[str, Any]) -> Verdict: ...


class PolicyError(InvalidInput):
    """The policy file is invalid; the message names the file, tenant and rule."""


# -- bounded walks over a payload --------------------------------------------------------


class _Unscannable(Exception):
    """The payload exceeds a rule's bounds: it is refused rather than let through unseen."""


@dataclass(frozen=True, slots=True)
class Bounds:
    max_depth: int = DEFAULT_MAX_DEPTH
    max_chars: int = DEFAULT_MAX_CHARS


def _too_deep(bounds: Bounds) -> _Unscannable:
    return _Unscannable(f"the payload nests more than {bounds.max_depth} levels")


def _too_long(bounds: Bounds) -> _Unscannable:
    return _Unscannable(f"the payload has more than {bounds.max_chars} characters of text")


def iter_strings(payload: Any, bounds: Bounds) -> Iterator[str]:
    """Every string value in ``payload`` (not keys), depth first, within ``bounds``."""
    budget = bounds.max_chars
    # One iterator per open container: the work done is what was scanned, never more.
    stack: list[Iterator[Any]] = [iter((payload,))]
    while stack:
        for value in stack[-1]:
            kind = type(value)
            if kind is str:
                budget -= len(value)
                if budget < 0:
                    raise _too_long(bounds)
                yield value
            elif kind is dict or kind is list:
                if len(stack) > bounds.max_depth:  # value sits at depth len(stack)
                    raise _too_deep(bounds)
                stack.append(iter(value.values() if kind is dict else value))
                break
        else:
            stack.pop()


def _map_strings(
    value: Any, fn: Callable[[str], str], bounds: Bounds, depth: int, budget: list[int]
) -> Any:
    """``value`` with ``fn`` applied to every string value; shares what did not change."""
    kind = type(value)
    if kind is str:
        budget[0] -= len(value)
        if budget[0] < 0:
            raise _too_long(bounds)
        return fn(value)
    if kind is dict:
        if depth > bounds.max_depth:
            raise _too_deep(bounds)
        out: dict[str, Any] | None = None
        for key, child in value.items():
            new = _map_strings(child, fn, bounds, depth + 1, budget)
            if new is not child:
                if out is None:
                    out = dict(value)
                out[key] = new
        return value if out is None else out
    if kind is list:
        if depth > bounds.max_depth:
            raise _too_deep(bounds)
        items: list[Any] | None = None
        for index, child in enumerate(value):
            new = _map_strings(child, fn, bounds, depth + 1, budget)
            if new is not child:
                if items is None:
                    items = list(value)
                items[index] = new
        return value if items is None else items
    return value


def _redact_path(value: Any, path: tuple[str, ...], at: int) -> Any:
    """``value`` with what ``path[at:]`` names replaced by REDACTED (copy on write)."""
    if at == len(path):
        return REDACTED
    segment = path[at]
    slots: Sequence[Any]
    if type(value) is dict:
        slots = list(value) if segment == "*" else [segment] if segment in value else []
    elif type(value) is list:
        if segment == "*":
            slots = range(len(value))
        elif segment.isdigit() and int(segment) < len(value):
            slots = [int(segment)]
        else:
            return value
    else:
        return value
    copy: Any = None  # copied on the first change only: the input is never modified
    for slot in slots:
        new = _redact_path(value[slot], path, at + 1)
        if new is not value[slot]:
            if copy is None:
                copy = type(value)(value)
            copy[slot] = new
    return value if copy is None else copy


def _cap(text: str, limit: int = MESSAGE_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(value: object) -> str:
    return _cap(repr(value), _SHOWN)


# -- built-in inspectors -----------------------------------------------------------------


class DenyPatterns:
    """Refuse (``policy_violation``) a payload with a string value matching a pattern."""

    def __init__(
        self, name: str, patterns: list[re.Pattern[str]], bounds: Bounds, message: str = ""
    ) -> None:
        self.name = name
        self.patterns = patterns
        self.bounds = bounds
        # Never the matched text: it may be the very secret the rule keeps out.
        self.message = message or f"the payload matches deny rule {name!r}"

    def inspect(self, ctx: InspectContext, payload: dict[str, Any]) -> Verdict:
        try:
            for text in iter_strings(payload, self.bounds):
                for pattern in self.patterns:
                    if pattern.search(text):
                        return Verdict.deny(POLICY_VIOLATION, self.message)
        except _Unscannable as exc:
            return _unscannable(self.name, exc)
        return ALLOW


class SchemaCheck:
    """Refuse (``invalid_payload``) a payload that fails a JSON Schema.

    With ``payload_type`` it applies only to payloads whose ``"type"`` field equals it; use
    the rule's ``channels`` for a schema per channel.
    """

    def __init__(self, name: str, schema: dict[str, Any], payload_type: str | None) -> None:
        self.name = name
        self.payload_type = payload_type
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        self.validator = cls(schema)

    def inspect(self, ctx: InspectContext, payload: dict[str, Any]) -> Verdict:
        if self.payload_type is not None and payload.get("type") != self.payload_type:
            return ALLOW
        error = next(iter(self.validator.iter_errors(payload)), None)
        if error is None:
            return ALLOW
        return Verdict.deny(INVALID_PAYLOAD, self._describe(error))

    def _describe(self, error: jsonschema.exceptions.ValidationError) -> str:
        """Where and which keyword failed, never the value (it may be a secret)."""
        field = "payload" + "".join(
            f"[{part}]" if isinstance(part, int) else f".{_cap(str(part), _SHOWN)}"
            for part in list(error.absolute_path)[:8]
        )
        keyword = str(error.validator)
        if keyword == "required" and isinstance(error.instance, dict):
            missing = [k for k in error.validator_value if k not in error.instance]
            detail = f"misses required field(s) {_shown(missing)}"
        elif keyword in ("type", "minimum", "maximum", "minLength", "maxLength", "const"):
            detail = f"fails {keyword!r} (schema: {_shown(error.validator_value)})"
        else:
            detail = f"fails {keyword!r}"
        return f"field {field!r} {detail} in the schema of rule {self.name!r}"


class Redact:
    """Replace named fields, and text matching patterns, with ``"[redacted]"``."""

    def __init__(
        self,
        name: str,
        fields: list[tuple[str, ...]],
        patterns: list[re.Pattern[str]],
        bounds: Bounds,
    ) -> None:
        self.name = name
        self.fields = fields
        self.patterns = patterns
        self.bounds = bounds

    def _scrub(self, text: str) -> str:
        for pattern in self.patterns:
            text = pattern.sub(REDACTED, text)
        return text

    def inspect(self, ctx: InspectContext, payload: dict[str, Any]) -> Verdict:
        new: Any = payload
        for path in self.fields:
            new = _redact_path(new, path, 0)
        if self.patterns:
            try:
                new = _map_strings(new, self._scrub, self.bounds, 1, [self.bounds.max_chars])
            except _Unscannable as exc:
                return _unscannable(self.name, exc)
        return ALLOW if new is payload else Verdict.allow(new)


class Tag:
    """Add ``tag`` to the event's tags when a string value matches a pattern."""

    def __init__(
        self, name: str, tag: str, patterns: list[re.Pattern[str]], bounds: Bounds
    ) -> None:
        self.name = name
        self.verdict = Verdict.allow(tags=(tag,))
        self.patterns = patterns
        self.bounds = bounds

    def inspect(self, ctx: InspectContext, payload: dict[str, Any]) -> Verdict:
        try:
            for text in iter_strings(payload, self.bounds):
                for pattern in self.patterns:
                    if pattern.search(text):
                        return self.verdict
        except _Unscannable as exc:
            return _unscannable(self.name, exc)
        return ALLOW


def _unscannable(name: str, exc: _Unscannable) -> Verdict:
    return Verdict.deny(
        POLICY_VIOLATION, f"{exc}, more than rule {name!r} inspects: send a smaller payload"
    )


# -- the chain ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    inspector: Inspector
    rooms: frozenset[str] | None = None
    channels: frozenset[str] | None = None


class Chain:
    """One tenant's rules, run in order."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = tuple(rules)

    def run(self, ctx: InspectContext, payload: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The payload as it should be stored and the tags added; raises ArqonError on deny."""
        tags: list[str] = []
        for rule in self.rules:
            if (rule.rooms is not None and ctx.room not in rule.rooms) or (
                rule.channels is not None and ctx.channel not in rule.channels
            ):
                continue
            try:
                verdict = rule.inspector.inspect(ctx, payload)
                _check_verdict(verdict)
            except Exception as exc:
                # Fail closed: a broken inspector must not let content through unseen.
                _log_failure(rule.name, ctx.tenant, exc)
                raise ArqonError(INTERNAL, f"content inspector {rule.name!r} failed") from None
            if not verdict.allowed:
                assert verdict.error is not None
                raise ArqonError(verdict.error, _cap(verdict.message))
            if verdict.payload is not None:
                payload = verdict.payload
            for tag in verdict.tags:
                if tag not in tags:
                    tags.append(tag)
        if len(tags) > TAGS_MAX:
            del tags[TAGS_MAX:]
        return payload, tags


def _log_failure(name: str, tenant: str, exc: Exception) -> None:
    """The exception's type and where it was raised; not its text, which may quote the payload."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
    log.error(
        "content inspector %r of tenant %r failed: %s at %s (message withheld)",
        name,
        tenant,
        type(exc).__name__,
        where,
    )


def _check_verdict(verdict: object) -> None:
    """A plugin's verdict must be well formed; a bad one counts as the inspector failing."""
    if not isinstance(verdict, Verdict):
        raise TypeError(f"inspect() returned {type(verdict).__name__}, not a Verdict")
    if not verdict.allowed and (
        not isinstance(verdict.error, ErrorCode) or CATALOGUE.get(verdict.error.code) is None
    ):
        raise TypeError("a deny verdict needs an ErrorCode of shared.errors.CATALOGUE")
    if verdict.payload is not None and not isinstance(verdict.payload, dict):
        raise TypeError("a verdict's payload must be a dict")
    if not all(is_valid_name(tag) for tag in verdict.tags):
        raise TypeError("tags must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")


class Policy:
    """The chains of all tenants: what :meth:`check_event` applies to each publish."""

    def __init__(
        self,
        chains: Mapping[str, Chain | None] | None = None,
        plugins: PluginLoader | None = None,
    ) -> None:
        # A tenant listed with no rules maps to None: no chain, and not the "*" one either.
        chains = dict(chains or {})
        # Builds the plugin rules of rules stored later (LayeredPolicy); None: none allowed.
        self.plugins = plugins
        self._default = chains.pop(DEFAULT_TENANT, None)
        self._chains = chains

    @property
    def empty(self) -> bool:
        return self._default is None and not any(self._chains.values())

    def chain_for(self, tenant: str) -> Chain | None:
        return self._chains.get(tenant, self._default)

    def check_event(
        self, event: ClientEvent, tenant: str, principal: str
    ) -> tuple[ClientEvent, list[str]]:
        """The event to store (maybe redacted) and its tags; raises ArqonError if refused."""
        chain = self.chain_for(tenant)
        if chain is None:
            return event, []
        ctx = InspectContext(tenant, event.room, event.channel, principal)
        try:
            payload, tags = chain.run(ctx, event.payload)
        except ArqonError as exc:
            raise exc.with_request_id(event.id) from None
        if payload is not event.payload:
            event = replace(event, payload=payload)
        return event, tags


EMPTY_POLICY = Policy()


class _InvalidStoredPolicy:
    """Stands in for a tenant's KV policy that does not parse: every publish fails closed."""

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def inspect(self, ctx: InspectContext, payload: dict[str, Any]) -> Verdict:
        raise PolicyError(self.problem)


class LayeredPolicy(Policy):
    """Per-tenant rules kept in NATS KV, over the policy file's.

    ``lookup(tenant)`` returns the tenant's stored rules (JSON: the list of rules a policy
    file gives a tenant), or None. A tenant with stored rules uses them instead of the
    file's (an empty list: no rules). Stored rules are parsed once per change. Rules that
    do not parse (written around ``arqonbus policy set``, which validates) fail closed:
    every publish of that tenant is refused with ``internal`` until they are fixed.
    """

    def __init__(self, base: Policy, lookup: Callable[[str], bytes | None]) -> None:
        super().__init__(plugins=base.plugins)
        self._base = base
        self._lookup = lookup
        self._parsed: dict[str, tuple[bytes, Chain | None]] = {}

    @property
    def empty(self) -> bool:
        return False

    def chain_for(self, tenant: str) -> Chain | None:
        raw = self._lookup(tenant)
        if raw is None:
            self._parsed.pop(tenant, None)
            return self._base.chain_for(tenant)
        parsed = self._parsed.get(tenant)
        if parsed is None or parsed[0] is not raw:  # a new value is a new bytes object
            parsed = (raw, parse_stored_rules(tenant, raw, self.plugins))
            self._parsed[tenant] = parsed
        return parsed[1]


def check_storable(rules: Any) -> None:
    """Rules kept in NATS KV may name plugins by entry point only (installed code).

    ``object`` imports any module of the gateway's Python path: from a file the operator
    controls that is fine, from KV (writable by anyone with its NATS credential) it would
    let a bucket write run code on every gateway.
    """
    if not isinstance(rules, list):
        return
    for i, rule in enumerate(rules):
        if isinstance(rule, dict) and rule.get("kind") == "plugin" and "object" in rule:
            raise PolicyError(
                f"stored rule #{i + 1}: a plugin kept in NATS KV must use 'entry_point' (an "
                "installed inspector), not 'object'"
            )


def parse_stored_rules(
    tenant: str, raw: bytes, plugins: PluginLoader | None = None
) -> Chain | None:
    """A tenant's rules as stored in KV; an invalid entry becomes a chain that fails closed."""
    try:
        rules = orjson.loads(raw)
        check_storable(rules)
        doc = {"tenants": {tenant: rules}}
        return parse_policy(doc, "stored policy", plugins).chain_for(tenant)
    except (orjson.JSONDecodeError, PolicyError) as exc:
        log.error("the stored content policy of tenant %r is invalid: %s", tenant, exc)
        problem = "the stored policy is invalid: fix it with 'arqonbus policy set'"
        return Chain([Rule("stored-policy", _InvalidStoredPolicy(problem), None, None)])


def with_tags(stored: bytes, tags: list[str]) -> bytes:
    """The stored envelope (an orjson object, ending in ``}``) with ``"tags": [...]`` added."""
    if not tags:
        return stored
    return b'%s,"tags":%s}' % (stored[:-1], orjson.dumps(tags))


# -- loading the policy file -------------------------------------------------------------

_COMMON_KEYS = {"kind", "name", "rooms", "channels"}
_BOUND_KEYS = {"max_depth", "max_chars"}
_KIND_KEYS = {
    "deny": {"patterns", "message"} | _BOUND_KEYS,
    "schema": {"schema", "payload_type"},
    "redact": {"fields", "patterns"} | _BOUND_KEYS,
    "tag": {"tag", "patterns"} | _BOUND_KEYS,
    "plugin": {"entry_point", "object", "options"},
}


def parse_policy(doc: Any, source: str = "policy", plugins: PluginLoader | None = None) -> Policy:
    """Validate a policy document; plugin rules are built with ``plugins`` (the gateway's
    loader, gateway/policies.py); without one, a plugin rule is refused."""
    if not isinstance(doc, dict) or set(doc) - {"tenants"} or "tenants" not in doc:
        raise PolicyError(f'{source}: must be a JSON object {{"tenants": {{...}}}}')
    tenants = doc["tenants"]
    if not isinstance(tenants, dict):
        raise PolicyError(f"{source}: 'tenants' must map tenant names to lists of rules")
    chains: dict[str, Chain | None] = {}
    for tenant, rules in tenants.items():
        where = f"{source}: tenant {tenant!r}"
        if tenant != DEFAULT_TENANT and not is_valid_name(tenant):
            raise PolicyError(f"{where}: a tenant is '*' or 1-64 of A-Z, a-z, 0-9, '_', '-'")
        if not isinstance(rules, list):
            raise PolicyError(f"{where}: must be a list of rules")
        parsed = [
            _parse_rule(rule, f"{where} rule #{i + 1}", i + 1, plugins)
            for i, rule in enumerate(rules)
        ]
        chains[tenant] = Chain(parsed) if parsed else None
    return Policy(chains, plugins)


def _parse_rule(rule: Any, where: str, number: int, plugins: PluginLoader | None) -> Rule:
    if not isinstance(rule, dict):
        raise PolicyError(f"{where}: must be a JSON object")
    kind = rule.get("kind")
    if kind not in _KIND_KEYS:
        raise PolicyError(f"{where}: 'kind' must be one of {sorted(_KIND_KEYS)}, got {kind!r}")
    name = rule.get("name", f"{kind} #{number}")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{where}: 'name' must be a non-empty string")
    where = f"{where} ({name!r})"
    unknown = set(rule) - _COMMON_KEYS - _KIND_KEYS[kind]
    if unknown:
        allowed = sorted(_COMMON_KEYS | _KIND_KEYS[kind])
        raise PolicyError(
            f"{where}: unknown key(s) {sorted(unknown)}; a {kind} rule takes {allowed}"
        )
    rooms = _names(rule, "rooms", where)
    channels = _names(rule, "channels", where)
    if kind == "plugin":
        inspector = _build_plugin(rule, where, plugins)
    else:
        inspector = _BUILDERS[kind](rule, name, where)
    return Rule(name, inspector, rooms, channels)


def _names(rule: dict[str, Any], key: str, where: str) -> frozenset[str] | None:
    if key not in rule:
        return None
    value = rule[key]
    if not isinstance(value, list) or not value or not all(is_valid_name(v) for v in value):
        raise PolicyError(
            f"{where}: {key!r} must be a non-empty list of names (1-64 of A-Z, a-z, 0-9, '_', '-')"
        )
    return frozenset(value)


def _patterns(rule: dict[str, Any], where: str, required: bool) -> list[re.Pattern[str]]:
    value = rule.get("patterns", [])
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise PolicyError(f"{where}: 'patterns' must be a list of non-empty regex strings")
    if required and not value:
        raise PolicyError(f"{where}: 'patterns' must list at least one regex")
    compiled = []
    for index, text in enumerate(value):
        try:
            compiled.append(re.compile(text))
        except re.error as exc:
            raise PolicyError(
                f"{where}: pattern #{index + 1} is not a valid regex ({exc})"
            ) from None
    return compiled


def _bounds(rule: dict[str, Any], where: str) -> Bounds:
    depth = rule.get("max_depth", DEFAULT_MAX_DEPTH)
    chars = rule.get("max_chars", DEFAULT_MAX_CHARS)
    if type(depth) is not int or not 1 <= depth <= MAX_DEPTH_LIMIT:
        raise PolicyError(f"{where}: 'max_depth' must be an integer in 1-{MAX_DEPTH_LIMIT}")
    if type(chars) is not int or not 1 <= chars <= MAX_CHARS_LIMIT:
        raise PolicyError(f"{where}: 'max_chars' must be an integer in 1-{MAX_CHARS_LIMIT}")
    return Bounds(depth, chars)


def _build_deny(rule: dict[str, Any], name: str, where: str) -> Inspector:
    message = rule.get("message", "")
    if not isinstance(message, str) or len(message) > MESSAGE_MAX:
        raise PolicyError(
            f"{where}: 'message' must be a string of at most {MESSAGE_MAX} characters"
        )
    return DenyPatterns(name, _patterns(rule, where, True), _bounds(rule, where), message)


def _build_schema(rule: dict[str, Any], name: str, where: str) -> Inspector:
    schema = rule.get("schema")
    if not isinstance(schema, dict):
        raise PolicyError(f"{where}: 'schema' must be a JSON Schema object")
    payload_type = rule.get("payload_type")
    if payload_type is not None and (not isinstance(payload_type, str) or not payload_type):
        raise PolicyError(f"{where}: 'payload_type' must be a non-empty string")
    try:
        return SchemaCheck(name, schema, payload_type)
    except jsonschema.exceptions.SchemaError as exc:
        raise PolicyError(f"{where}: invalid JSON Schema ({_cap(exc.message)})") from None


def _build_redact(rule: dict[str, Any], name: str, where: str) -> Inspector:
    fields = rule.get("fields", [])
    if not isinstance(fields, list) or not all(_is_field_path(f) for f in fields):
        raise PolicyError(
            f"{where}: 'fields' must be a list of dotted paths like 'card.number' or 'items.*.ssn'"
        )
    patterns = _patterns(rule, where, False)
    if not fields and not patterns:
        raise PolicyError(f"{where}: a redact rule needs 'fields' or 'patterns'")
    paths = [tuple(f.split(".")) for f in fields]
    return Redact(name, paths, patterns, _bounds(rule, where))


def _is_field_path(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < value.count(".") + 1 <= MAX_DEPTH_LIMIT
        and all(value.split("."))
    )


def _build_tag(rule: dict[str, Any], name: str, where: str) -> Inspector:
    tag = rule.get("tag")
    if not is_valid_name(tag):
        raise PolicyError(f"{where}: 'tag' must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    assert isinstance(tag, str)
    return Tag(name, tag, _patterns(rule, where, True), _bounds(rule, where))


def _build_plugin(rule: dict[str, Any], where: str, plugins: PluginLoader | None) -> Inspector:
    options = rule.get("options", {})
    if not isinstance(options, dict):
        raise PolicyError(f"{where}: 'options' must be a JSON object")
    if ("entry_point" in rule) == ("object" in rule):
        raise PolicyError(f"{where}: a plugin rule needs exactly one of 'entry_point' or 'object'")
    if plugins is None:
        raise PolicyError(f"{where}: plugins cannot be loaded here")
    way = "entry_point" if "entry_point" in rule else "object"
    try:
        inspector = plugins(way, rule[way], where)(options)
    except PolicyError:
        raise
    except Exception as exc:
        raise PolicyError(f"{where}: the plugin failed to start ({_cap(repr(exc))})") from None
    if not isinstance(inspector, Inspector):
        raise PolicyError(f"{where}: the plugin made {type(inspector).__name__}, with no inspect()")
    return inspector


_BUILDERS: dict[str, Callable[[dict[str, Any], str, str], Inspector]] = {
    "deny": _build_deny,
    "schema": _build_schema,
    "redact": _build_redact,
    "tag": _build_tag,
}
