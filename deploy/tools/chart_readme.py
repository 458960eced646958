"""Generate the parameters table of helm/arqonbus/README.md from the `## @param` comments.

Each `## @param path description` line in values.yaml documents the value at `path`; its default
comes from the parsed values.yaml. `## @section Title` starts a new table. The table is written
between the README's `<!-- params:start -->` and `<!-- params:end -->` markers.

    python deploy/tools/chart_readme.py          # rewrite the README
    python deploy/tools/chart_readme.py --check  # exit 1 if the README is stale or a value is undocumented
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "arqonbus"
START, END = "<!-- params:start -->", "<!-- params:end -->"
PARAM = re.compile(r"^\s*## @param (\S+) (.+)$")
SECTION = re.compile(r"^\s*## @section (.+)$")


def lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def leaves(values: Any, prefix: str = "") -> list[str]:
    """Paths of every value that needs a @param: non-empty maps are walked, the rest are leaves."""
    if isinstance(values, dict) and values:
        out: list[str] = []
        for key, sub in values.items():
            out += leaves(sub, f"{prefix}.{key}" if prefix else key)
        return out
    return [prefix]


def table(values_text: str) -> tuple[str, list[str]]:
    values = yaml.safe_load(values_text)
    lines: list[str] = []
    documented: list[str] = []
    for raw in values_text.splitlines():
        if m := SECTION.match(raw):
            lines += [
                "",
                f"### {m.group(1)}",
                "",
                "| Name | Description | Default |",
                "|---|---|---|",
            ]
        elif m := PARAM.match(raw):
            path, desc = m.group(1), m.group(2).replace("|", "\\|")
            default = json.dumps(lookup(values, path), separators=(",", ":"))
            lines.append(f"| `{path}` | {desc} | `{default}` |")
            documented.append(path)
    # a documented map covers its children (e.g. gateway.resources)
    missing = [
        p for p in leaves(values) if not any(p == d or p.startswith(d + ".") for d in documented)
    ]
    return "\n".join(lines).strip() + "\n", missing


def render(readme: str, body: str) -> str:
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{body}{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    body, missing = table((CHART / "values.yaml").read_text())
    if missing:
        print("values without ## @param: " + ", ".join(missing), file=sys.stderr)
        return 1
    readme_path = CHART / "README.md"
    readme = readme_path.read_text()
    if START not in readme or END not in readme:
        print(f"{readme_path}: markers {START} / {END} missing", file=sys.stderr)
        return 1
    new = render(readme, body)
    if args.check:
        if new != readme:
            print(
                f"{readme_path} is stale: run python deploy/tools/chart_readme.py", file=sys.stderr
            )
            return 1
        return 0
    readme_path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
