"""The server's one exception tree (drawn in shared/errors.py): every public exception of
shared/, mesh/ and gateway/ hangs off ServerError and names one catalogue entry."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from arqonbus_server import gateway, mesh, shared
from arqonbus_server.shared import errors
from arqonbus_server.shared.errors import CATALOGUE, ServerError


def public_exceptions() -> list[type[BaseException]]:
    found = []
    names = [
        info.name
        for package in (shared, mesh, gateway)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    ]
    for name in names:
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and not attribute.startswith("_")
            ):
                found.append(value)
    return found


EXCEPTIONS = public_exceptions()


def test_the_walk_finds_the_server_exceptions() -> None:
    names = {cls.__name__ for cls in EXCEPTIONS}
    assert {"ArqonError", "BrokerUnavailable", "AuthError", "PortInUse", "PolicyError"} <= names
    assert len(names) >= 25


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_each_public_exception_is_in_the_tree_with_one_catalogue_code(
    cls: type[BaseException],
) -> None:
    assert issubclass(cls, ServerError), f"{cls.__name__} does not derive from ServerError"
    if cls is not errors.ArqonError:  # an ArqonError carries its code per instance
        assert cls.catalogue in CATALOGUE.values()
    assert cls.__name__ in (errors.__doc__ or ""), f"draw {cls.__name__} in the tree"


def test_a_mesh_error_surfaces_as_its_catalogue_code_with_its_message() -> None:
    from arqonbus_server.mesh.ports import BrokerUnavailable, StoreQuotaExceeded

    reply = errors.as_arqon_error(BrokerUnavailable("publish not acknowledged"), "r1")
    assert (reply.code, reply.request_id, reply.error.retryable) == ("unavailable", "r1", True)
    assert reply.message.startswith("publish not acknowledged.")
    assert errors.as_arqon_error(StoreQuotaExceeded("full")).code == "quota_exceeded"


def test_error_fields_travel_on_the_error_and_into_the_frame() -> None:
    import orjson

    from arqonbus_server.shared.envelope import encode_error

    error = errors.ArqonError(errors.MUTED, "muted", "r2", room="lab", retry_after_ms=1500)
    assert error.retry_after_ms == 1500 and error.fields["room"] == "lab"
    again = error.with_request_id("r3")
    assert (again.request_id, again.fields) == ("r3", error.fields)
    payload = orjson.loads(encode_error(again))["payload"]
    assert (payload["room"], payload["retry_after_ms"], payload["code"]) == ("lab", 1500, "muted")
