"""Rewrite the documentation's benchmark tables from bench/results/*.json (never typed by hand).

A page (README.md or docs/*.md) marks each table's place with `<!-- bench:NAME -->` ...
`<!-- /bench:NAME -->`.

    .venv/bin/python -m bench.report            # rewrite the tables
    .venv/bin/python -m bench.report --check    # exit 1 when a table differs from its result, or is missing
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pipelines.files import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def _goal(name: str, g: dict) -> str:
    value = f"{g['value']:.3g}" if g["value"] is not None else f"not measured ({g.get('note', 'no value')})"
    at = f" at `{g['setting']}`" if "setting" in g else ""
    return f"`{name}` = {value}{at} (goal {g['op']} {g['target']}: **{'met' if g['met'] else 'not met'}**)"


def markdown(result: dict) -> str:
    """A result's table (nested values, e.g. a placement or an actor list, stay in the JSON), its machine and
    its goals."""
    rows = [{key: value for key, value in row.items() if not isinstance(value, dict | list)}
            for row in result["rows"]]
    lines = [markdown_table(rows, cell=_cell)]
    goals = [_goal(name, g) for name, g in result["goals"].items()]
    machine = result["machine"]
    lines += ["", f"Run {result['when']} on {machine['cores']} cores of {machine['cpu']}, "
              f"GPU {machine['gpu'] or 'none'}, torch {machine['torch']}."]
    lines += ["", "Goals: " + "; ".join(goals) + "."] if goals else []
    return "\n".join(lines)


def pages(root: Path = ROOT) -> list[Path]:
    """The Markdown files that may hold generated tables: the README and the docs pages."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _marker(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)", re.S)


def update(paths: list[Path] | None = None, write: bool = True) -> list[str]:
    """Put each result's table between its markers in `paths` (default: `pages()`). Returns what is out of
    date: `PAGE:NAME` for every table whose text changed (written only when `write`), and `NAME (no page)`
    for a result whose table is on no page."""
    results = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))]
    changed, shown = [], set()
    for page in pages() if paths is None else paths:
        text = new = page.read_text()
        for result in results:
            name = result["bench"]
            table = markdown(result)
            before = new
            new = _marker(name).sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), new)
            shown.update([name] if _marker(name).search(new) else [])
            if new != before:
                changed.append(f"{page.name}:{name}")
        if write and new != text:
            page.write_text(new)
    return changed + [f"{r['bench']} (no page)" for r in results if r["bench"] not in shown]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a table differs from its result")
    args = parser.parse_args(argv)
    changed = update(write=not args.check)
    if args.check:
        print("tables out of date: " + ", ".join(changed) if changed else "every table is up to date")
        return 1 if changed else 0
    print("updated:", ", ".join(changed) or "nothing (every table was up to date)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
