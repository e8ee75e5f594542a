"""The layers: the stages (what runs on the workers) never import the pipelines (the job around them), and
scoring a file, which needs no model, starts without loading torch or transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at its top or anywhere inside it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_stages_never_import_the_pipelines():
    offending = {path.name: sorted(m for m in imported_modules(path) if m.split(".")[0] == "pipelines")
                 for path in sorted((ROOT / "stages").glob("*.py"))}
    assert {name: modules for name, modules in offending.items() if modules} == {}


def test_scoring_starts_without_torch_or_transformers():
    probe = "import sys, pipelines.score; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]"
