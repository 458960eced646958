"""The server installs under one namespace, ``arqonbus_server``; the SDK is ``arqonbus``.

Bare ``shared``, ``mesh`` or ``gateway`` in site-packages would collide with any other
distribution or user project that has such a folder.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.timeouts import SEC

REPO = Path(__file__).resolve().parents[2]
SERVER_DIRS = ("shared", "mesh", "gateway")


def install(source: Path, target: Path) -> set[str]:
    """``pip install --no-deps`` of ``source`` into the empty ``target``; what it holds then."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300 * SEC,
    )  # fmt: skip
    return {p.name for p in target.iterdir() if p.name != "bin"}


def test_every_server_package_directory_is_listed_for_installation() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        "arqonbus_server." + str(init.parent.relative_to(REPO)).replace("/", ".")
        for top in SERVER_DIRS
        for init in (REPO / top).rglob("__init__.py")
    }
    assert set(config["packages"]) == on_disk
    assert config["package-dir"] == {f"arqonbus_server.{top}": top for top in SERVER_DIRS}


def test_a_fresh_install_holds_only_the_two_namespaces(tmp_path: Path) -> None:
    server = install(REPO, tmp_path / "server")
    [info] = [name for name in server if name.endswith(".dist-info")]
    assert server == {"arqonbus_server", info}
    assert (tmp_path / "server" / info / "top_level.txt").read_text().split() == ["arqonbus_server"]
    entry_points = (tmp_path / "server" / info / "entry_points.txt").read_text()
    assert "arqonbus = arqonbus_server.gateway.admin.cli:main" in entry_points
    for top in SERVER_DIRS:
        where = tmp_path / "server" / "arqonbus_server" / top
        installed = {str(p.relative_to(where)) for p in where.rglob("*.py")}
        assert installed == {str(p.relative_to(REPO / top)) for p in (REPO / top).rglob("*.py")}
    # The dashboard's page is served from the package (gateway/dashboard/routes.py).
    static = REPO / "gateway" / "dashboard" / "static"
    installed_static = tmp_path / "server" / "arqonbus_server" / "gateway" / "dashboard" / "static"
    assert {p.name for p in installed_static.iterdir()} == {p.name for p in static.iterdir()}

    sdk = install(REPO / "clients" / "python", tmp_path / "sdk")
    [info] = [name for name in sdk if name.endswith(".dist-info")]
    assert sdk == {"arqonbus", info} and info.startswith("arqonbus-")  # no server code
