"""Writing files safely: `atomic_path` (and `write_text` / `write_json` on it) so that a crash never leaves
a torn file behind, and `waiting_lock` for short read-modify-writes of a file several processes share
(the weights' digest cache, a vLLM export). The stages use them directly; `pipelines.files` builds the
job's formats and its output lock on them.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
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


@contextmanager
def waiting_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive `flock` on the file `path` for the block, waiting while another process holds
    it: for short read-modify-writes of a shared cache file (unlike `pipelines.files.exclusive_lock`,
    which refuses)."""
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
