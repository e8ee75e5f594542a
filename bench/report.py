"""Rewrite the README's benchmark tables from bench/results/*.json (never typed by hand).

The README marks each table's place with `<!-- bench:NAME -->` ... `<!-- /bench:NAME -->`.

    .venv/bin/python -m bench.report
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipelines.files import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown(result: dict) -> str:
    lines = [markdown_table(result["rows"], cell=_cell)]
    goals = [
        f"`{name}` = {g['value']:.3g} (goal {g['op']} {g['target']}: **{'met' if g['met'] else 'not met'}**)"
        for name, g in result["goals"].items()
    ]
    machine = result["machine"]
    lines += ["", f"Run {result['when']} on {machine['cores']} cores of {machine['cpu']}, "
              f"GPU {machine['gpu'] or 'none'}, torch {machine['torch']}."]
    lines += ["", "Goals: " + "; ".join(goals) + "."] if goals else []
    return "\n".join(lines)


def update(readme: Path = ROOT / "README.md") -> list[str]:
    text = readme.read_text()
    done = []
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        name = result["bench"]
        pattern = re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m, r=result: m.group(1) + markdown(r) + "\n" + m.group(2), text)
            done.append(name)
    readme.write_text(text)
    return done


if __name__ == "__main__":
    print("updated:", ", ".join(update()) or "nothing")
