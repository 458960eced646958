"""The command-line contract of the bad-input suites that ``chaos.run`` starts.

``python -m chaos.<name> --json OUT [--long]`` writes ``{"name", "passed", "summary_md",
"details"}`` to OUT, prints the summary and exits 0 when it passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def parse_suite_args(
    prog: str, description: str | None, long_help: str, argv: list[str] | None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--json", required=True, type=Path, help="where to write the result")
    parser.add_argument("--long", action="store_true", help=long_help)
    return parser.parse_args(argv)


def finish(path: Path, result: dict[str, Any]) -> int:
    """Write the result where ``chaos.run`` reads it, print its summary, give the exit code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(result["summary_md"])
    return 0 if result["passed"] else 1
