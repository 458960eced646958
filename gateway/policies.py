"""Loading content policies: the policy file and inspector plugins (code the gateway imports).

The rules themselves are pure (shared/inspect.py); reading the file and importing plugin code
happen here, once, at start-up (and for rules stored in NATS KV, when they change).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from arqonbus_server.shared.inspect import (
    EMPTY_POLICY,
    ENTRY_POINT_GROUP,
    Policy,
    PolicyError,
    parse_policy,
)

Factory = Callable[[dict[str, Any]], Any]

_loaded: dict[str, Policy] = {}


def policy_for(path: str) -> Policy:
    """The policy in the file at ``path`` ("" = none), read once per process."""
    if not path:
        return EMPTY_POLICY
    policy = _loaded.get(path)
    if policy is None:
        policy = _loaded[path] = load_policy(path)
    return policy


def load_policy(path: str) -> Policy:
    """Read and validate a policy file. Raises PolicyError naming the tenant and rule."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError(f"policy file {path!r}: cannot read it ({exc.strerror})") from None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise PolicyError(f"policy file {path!r}: not valid JSON ({exc})") from None
    return parse_policy(doc, f"policy file {path!r}", load_plugin)


def load_plugin(way: str, value: object, where: str) -> Factory:
    """The factory a plugin rule names: an installed entry point, or ``module:attribute``."""
    if way == "entry_point":
        return _entry_point(value, where)
    return _import_object(value, where)


def _entry_point(value: object, where: str) -> Factory:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{where}: 'entry_point' must be a non-empty string")
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=value)
    if not found:
        known = sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        raise PolicyError(
            f"{where}: no entry point {value!r} in group {ENTRY_POINT_GROUP!r} "
            f"(installed: {known}); install the package that provides it"
        )
    factory = next(iter(found)).load()
    if not callable(factory):
        raise PolicyError(f"{where}: entry point {value!r} is not callable")
    return factory  # type: ignore[no-any-return]


def _import_object(value: object, where: str) -> Factory:
    if not isinstance(value, str) or value.count(":") != 1:
        raise PolicyError(f"{where}: 'object' must be 'module:attribute', got {value!r}")
    module_name, _, attribute = value.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PolicyError(f"{where}: cannot import module {module_name!r} ({exc})") from None
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise PolicyError(f"{where}: module {module_name!r} has no {attribute!r}")
    if not callable(target):
        raise PolicyError(f"{where}: {value!r} is not callable")
    return target  # type: ignore[no-any-return]
