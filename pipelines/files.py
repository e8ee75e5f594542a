"""The small file formats every tool of the project reads and writes: JSONL rows, JSON documents and
Markdown tables, each written through `atomic_path` so that a crash never leaves a torn file behind.

(The job's output journal appends line by line instead; see `pipelines.sink`.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` only when the block succeeds
    (one rename), and is removed when it fails. The sibling keeps the suffix, for writers that pick the
    format by it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` into `path`, atomically."""
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, document: object) -> Path:
    """A JSON document (indented, newline-terminated), atomically."""
    return write_text(path, json.dumps(document, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """One JSON object per line, atomically."""
    return write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSONL file (blank lines skipped); a line that is not JSON is an error naming
    the file and line."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return rows


def markdown_table(rows: list[dict], columns: list[str] | None = None,
                   cell: Callable[[object], str] = lambda v: "" if v is None else str(v)) -> str:
    """Rows as a Markdown table; `columns` default to every key in first-seen order, `cell` formats a
    value (missing keys are None)."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
