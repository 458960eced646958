"""Service commands on NATS: the request a caller's gateway sends and the reply it gets back.

These bodies travel only between gateways (``P.cmd.<tenant>.<room>.<channel>.<command>``,
NATS request/reply). Clients see the envelopes of :mod:`shared.envelope` instead. Both
sides are gateways of the same deployment, but a reply is still validated before it is
turned into an envelope: NATS is shared infrastructure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from arqonbus_server.shared.envelope import ResponseError, parse_response_error
from arqonbus_server.shared.errors import ArqonError, InvalidInput


class MalformedServiceMessage(InvalidInput):
    """A request or reply body that no ArqonBus gateway would have sent."""


@dataclass(frozen=True, slots=True)
class ServiceCall:
    """A service command on its way to a handler."""

    command: str
    parameters: dict[str, Any]
    sender: str
    request_id: str
    timestamp: str
    timeout_ms: int

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "command": self.command,
                "parameters": self.parameters,
                "from": self.sender,
                "request_id": self.request_id,
                "timestamp": self.timestamp,
                "timeout_ms": self.timeout_ms,
            }
        )

    @classmethod
    def decode(cls, body: bytes) -> ServiceCall:
        obj = _object(body)
        command, parameters = obj.get("command"), obj.get("parameters")
        sender, request_id = obj.get("from"), obj.get("request_id")
        timestamp, timeout_ms = obj.get("timestamp"), obj.get("timeout_ms")
        if not (
            isinstance(command, str)
            and isinstance(parameters, dict)
            and isinstance(sender, str)
            and isinstance(request_id, str)
            and isinstance(timestamp, str)
            and isinstance(timeout_ms, int)
            and not isinstance(timeout_ms, bool)
            and timeout_ms > 0
        ):
            raise MalformedServiceMessage("service request is missing a field")
        return cls(command, parameters, sender, request_id, timestamp, timeout_ms)

    def delivery_payload(self) -> dict[str, Any]:
        """The ``payload`` of the command envelope the handler receives."""
        return {
            "command": self.command,
            "parameters": self.parameters,
            "request_id": self.request_id,
            "timeout_ms": self.timeout_ms,
        }


@dataclass(frozen=True, slots=True)
class ServiceReply:
    """A handler's answer (or its gateway's error) on its way back to the caller's gateway."""

    id: str
    sender: str
    timestamp: str
    result: dict[str, Any] | None
    error: ResponseError | None

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"id": self.id, "from": self.sender, "timestamp": self.timestamp}
        if self.error is None:
            obj["status"] = "success"
            obj["result"] = self.result if self.result is not None else {}
        else:
            obj["status"] = "error"
            obj["error"] = self.error.as_dict()
        return orjson.dumps(obj)

    @classmethod
    def decode(cls, body: bytes) -> ServiceReply:
        obj = _object(body)
        reply_id, sender, timestamp = obj.get("id"), obj.get("from"), obj.get("timestamp")
        if not (
            isinstance(reply_id, str) and isinstance(sender, str) and isinstance(timestamp, str)
        ):
            raise MalformedServiceMessage("service reply is missing id, from or timestamp")
        status = obj.get("status")
        if status == "success":
            result = obj.get("result")
            if not isinstance(result, dict):
                raise MalformedServiceMessage("service reply result is not an object")
            return cls(reply_id, sender, timestamp, result, None)
        if status == "error":
            try:
                error = parse_response_error(obj.get("error"))
            except ArqonError as exc:
                raise MalformedServiceMessage(exc.message) from None
            return cls(reply_id, sender, timestamp, None, error)
        raise MalformedServiceMessage(f"service reply status {status!r}")


def _object(body: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedServiceMessage("not JSON") from None
    if not isinstance(obj, dict):
        raise MalformedServiceMessage("not a JSON object")
    return obj
