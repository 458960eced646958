"""docs/architecture.md lists every module of the server, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
LISTED = re.compile(r"`((?:shared|mesh|gateway)/[\w/]+\.py)`")


def modules() -> set[str]:
    return {
        str(path.relative_to(REPO))
        for top in ("shared", "mesh", "gateway")
        for path in (REPO / top).rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }


def test_every_module_is_in_the_components_table() -> None:
    table = DOC.read_text().split("## Components", 1)[1].split("\n## ", 1)[0]
    listed = set(LISTED.findall(table))
    assert sorted(modules() - listed) == [], "add these modules to docs/architecture.md"
    assert sorted(listed - modules()) == [], "these modules in docs/architecture.md are gone"
