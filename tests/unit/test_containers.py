"""The NATS backend switch and the container backend's failures: clear, and fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from arqonbus_server.mesh.containers import (
    BACKEND_ENV,
    ContainerCluster,
    ContainerEngineUnavailable,
    UnknownNatsBackend,
    backend_from_env,
    image_tag,
    make_cluster,
)
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.shared.errors import LocalClusterError, ServerError


@pytest.mark.parametrize(
    ("environ", "backend"),
    [({}, "local"), ({BACKEND_ENV: ""}, "local"), ({BACKEND_ENV: " Container "}, "container")],
)
def test_the_backend_defaults_to_the_local_binary(environ: dict[str, str], backend: str) -> None:
    assert backend_from_env(environ) == backend


def test_an_unknown_backend_names_the_variable_and_the_choices() -> None:
    with pytest.raises(UnknownNatsBackend) as caught:
        backend_from_env({BACKEND_ENV: "docker"})
    message = str(caught.value)
    assert "ARQONBUS_NATS_BACKEND='docker'" in message
    assert "local" in message and "container" in message
    assert isinstance(caught.value, LocalClusterError)
    with pytest.raises(UnknownNatsBackend):
        make_cluster("kubernetes", Path("unused"))


def test_the_local_backend_makes_a_plain_local_cluster(tmp_path: Path) -> None:
    cluster = make_cluster("local", tmp_path, 1)
    assert type(cluster) is LocalCluster


def test_no_engine_fails_at_once_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-engine.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{missing}")
    started = time.monotonic()
    with pytest.raises(ContainerEngineUnavailable) as caught:
        ContainerCluster(tmp_path / "nats", 3)
    assert time.monotonic() - started < 5.0  # a missing socket is refused, never waited on
    message = str(caught.value)
    assert f"unix://{missing}" in message
    assert "podman system service" in message and "DOCKER_HOST" in message
    assert "TESTCONTAINERS_RYUK_DISABLED=true" in message
    assert isinstance(caught.value, ServerError)
    assert not (tmp_path / "nats").exists()  # refused before touching any file


def test_the_image_tag_follows_the_binary(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_bytes(b"nats-server 2.11")
    two.write_bytes(b"nats-server 2.12")
    assert image_tag(str(one)).startswith("localhost/arqonbus-nats:")
    assert image_tag(str(one)) == image_tag(str(one)) != image_tag(str(two))
