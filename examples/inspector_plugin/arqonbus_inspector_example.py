"""An example content inspector: refuse a text field longer than a limit.

Install it next to the gateway (``pip install ./examples/inspector_plugin``) and name its
entry point in the policy file::

    {"tenants": {"acme": [
        {"kind": "plugin", "entry_point": "example-max-length",
         "options": {"field": "text", "max": 280}, "channels": ["general"]}
    ]}}

The entry point (group ``arqonbus.inspectors``) names a callable that takes the rule's
``options`` object and returns an inspector: anything with
``inspect(ctx, payload) -> Verdict``. It is built once, when the gateway starts; an
exception from the constructor stops the start with an error naming the rule.
"""

from __future__ import annotations

from typing import Any

from arqonbus_server.shared.errors import POLICY_VIOLATION
from arqonbus_server.shared.inspect import ALLOW, InspectContext, Verdict


class MaxLength:
    def __init__(self, options: dict[str, Any]) -> None:
        self.field = options.get("field", "text")
        self.max = options.get("max", 280)
        if not isinstance(self.field, str) or type(self.max) is not int or self.max < 0:
            raise ValueError("options: 'field' must be a string and 'max' an integer >= 0")

    def inspect(self, ctx: InspectContext, payload: dict[str, Any]) -> Verdict:
        value = payload.get(self.field)
        if isinstance(value, str) and len(value) > self.max:
            return Verdict.deny(
                POLICY_VIOLATION,
                f"field 'payload.{self.field}' is longer than {self.max} characters",
            )
        return ALLOW
