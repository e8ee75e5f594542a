"""The small file formats every tool of the project reads and writes: JSONL rows, JSON documents and
Markdown tables, each written through `atomic_path` so that a crash never leaves a torn file behind; and
`exclusive_lock`, which lets one job at a time write an output (`waiting_lock` waits instead, for short
updates of a shared cache file).

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


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` only when the block succeeds
    (one rename), and is removed when it fails. The sibling keeps the suffix, for writers that pick the
    format by it. The new file and the rename are fsynced before the block returns: whatever the caller
    does next (e.g. delete the journal the file was written from) happens after it is on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield partial
        _fsync(partial, os.O_RDONLY)
        os.replace(partial, path)
        _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    finally:
        partial.unlink(missing_ok=True)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


@contextmanager
def waiting_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive `flock` on the file `path` for the block, waiting while another process holds
    it: for short read-modify-writes of a shared cache file (unlike `exclusive_lock`, which refuses)."""
    with Path(path).open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
