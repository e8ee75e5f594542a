"""The small file formats every tool of the project reads and writes: JSONL rows, JSON documents and
Markdown tables, each written through `atomic_path` so that a crash never leaves a torn file behind; and
`exclusive_lock`, which lets one job at a time write an output. The atomic writes live in `stages.files`
(with `waiting_lock`, which waits instead of refusing), used by the stages too, which never import
`pipelines`; they are imported here for the tools.

(The job's output journal appends line by line instead; see `pipelines.sink`.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from stages.files import atomic_path, write_json, write_text

__all__ = ["InUseError", "atomic_path", "exclusive_lock", "markdown_table", "read_jsonl", "write_json",
           "write_jsonl", "write_text"]


class InUseError(RuntimeError):
    """Another live process holds the lock of what this one was about to write (`exclusive_lock`)."""


@contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive `flock` on the file `path` for the block, or raise `InUseError` at once, naming
    `what` and the holder (host, pid, start time, which the holder writes into the file). The OS drops the
    lock when its process dies, even by SIGKILL, so a crash never leaves a stale lock; the file stays. The
    descriptor is not inherited by programs the holder starts (Ray's processes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUseError(
                f"{what} is in use by another job: {_holder(fd)} (lock {path}). Two jobs never write one "
                "output: wait for that one to finish, or give this one its own"
            ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it into the lock file."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, TypeError, KeyError):
        return "a process that has not written its details yet"


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
