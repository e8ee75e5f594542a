"""Weight files' sha256, each computed once: kept by (absolute path, size, mtime) in a JSON cache file
(`digests.json` under `cache_dir()` by default), so a 14 GB checkpoint is read once and later callers only
stat its files. Used by the job's fingerprint (`pipelines.fingerprint`) and the vLLM export's digest
(`stages.vllm_engine`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stages.files import waiting_lock, write_json

log = logging.getLogger(__name__)

DIGESTS_FILE = "digests.json"
_READ_BYTES = 16 << 20
_ANNOUNCE_BYTES = 1 << 30  # hashing more than this at once is announced: it takes seconds


def cache_dir() -> Path:
    """vzpipe's cache folder: `$XDG_CACHE_HOME/vzpipe`, else `~/.cache/vzpipe`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vzpipe"


def file_digests(files: Iterable[Path], cache_file: Path | None = None) -> dict[Path, str]:
    """{file: sha256} of `files`, each read only when the cache (`cache_file`, default
    `cache_dir()/digests.json`) has no digest for its absolute path at its size and mtime. A missing or
    unreadable cache is recomputed; one that cannot be written is a warning: digests stay right, only
    slower."""
    cache_file = cache_file or cache_dir() / DIGESTS_FILE
    known = _read_digests(cache_file)
    digests: dict[Path, str] = {}
    stale: dict[Path, dict] = {}
    for file in files:
        stat = file.stat()
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        cached = known.get(str(file.resolve()))
        if isinstance(cached, dict) and {k: cached.get(k) for k in entry} == entry \
                and isinstance(cached.get("sha256"), str):
            digests[file] = cached["sha256"]
        else:
            stale[file] = entry
    size = sum(entry["size"] for entry in stale.values())
    if size > _ANNOUNCE_BYTES:
        log.info("hashing the checkpoint's weights once (%.1f GB, %d files; digests kept in %s) ...",
                 size / 1e9, len(stale), cache_file)
    if stale:  # the files at once (a sharded checkpoint's shards): hashlib lets go of the GIL
        with ThreadPoolExecutor(max_workers=min(len(stale), os.cpu_count() or 1)) as pool:
            for file, digest in zip(stale, pool.map(_sha256, stale), strict=True):
                digests[file] = stale[file]["sha256"] = digest
        _record_digests(cache_file, {str(file.resolve()): entry for file, entry in stale.items()})
    return digests


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_READ_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_digests(cache_file: Path) -> dict:
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _record_digests(cache_file: Path, fresh: dict[str, dict]) -> None:
    """Add `fresh` to the cache file, under a lock so concurrent jobs' digests merge; entries of files
    that no longer exist are dropped, so the file stays as small as the checkpoints on disk."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with waiting_lock(cache_file.with_name(cache_file.name + ".lock")):
            known = {**_read_digests(cache_file), **fresh}
            write_json(cache_file, {path: entry for path, entry in known.items() if os.path.exists(path)})
    except OSError as err:
        log.warning("could not keep the weights' digests in %s (%s): they are hashed again next time",
                    cache_file, err)
