"""Where answers go: one row per question, appended as it completes, safe to resume and to rerun.

Rows are appended to a JSONL journal, one `write` of a whole line each, flushed and fsynced, so a crash
(even SIGKILL) leaves at most one torn last line, which the next run drops. Any other line that does not
parse stops the job, naming the file and the line, with the file left as it is: rows are never deleted
silently. For a `.jsonl` output the journal is the output. For `.parquet` the journal sits beside it
(`<path>.journal.jsonl`) and the Parquet file is written from it atomically when the job ends (fsynced
before the journal is deleted).

One writer per output: an `OutputSink` holds an exclusive lock on `<stem>.lock` from before it reads the
output until `release()` (or the end of its `with` block), so a second job on the same output stops at
once, naming the holder (`pipelines.files.exclusive_lock`; a dead holder's lock is gone with it).

One row per id (`unique_rows`): when an id has several rows, in file order with the journal after the
Parquet file, its last answered row wins, else its last error row: newer rows replace older ones, and an
answer replaces an error whatever the order. Duplicated answers in an existing output (a crash between
the Parquet write and the journal's deletion, or two writers before the lock existed) are reported and
the output rewritten with one row per id.

Error rows are retried by a rerun (`retry_errors`): they stay in the output, their ids are asked again,
and each new row (an answer, or an error again) replaces the old one; `close()` rewrites the output
without the replaced rows. A run killed before that keeps every error row it did not replace.

Beside the output:
- `<stem>.fingerprint.json`: what determines its answers (`pipelines.fingerprint.job_fingerprint`). Rows are
  resumed only by a job with the same fingerprint; any other job stops before work, naming the keys that
  differ, so one file never mixes settings.
- `<stem>.errors.log`: every failed row's message and traceback (Ray workers' too).
- `<stem>.lock`: the lock, holding its last holder's host, pid and start time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

from pipelines.files import atomic_path, exclusive_lock, write_json, write_jsonl

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = (
    "id", "video", "question", "prediction", "answer", "category", "options", "visual_tokens_full",
    "visual_tokens_kept", "decode_seconds", "encode_seconds", "answer_seconds", "prompt_tokens",
    "generated_tokens", "error",
)


class OutputError(ValueError):
    """An output that cannot be resumed as asked; the message names the file and the ways out."""


class OutputSink:
    """Appends result rows to the job's output and knows which ids are already done. Holds the output's
    lock until `release()`; as a context manager, until the block ends. `rows` is the output, one row per
    id (the newest); `done_ids` the ids not to ask again (every id but the error rows to retry)."""

    def __init__(self, path: str | Path, *, overwrite: bool = False, retry_errors: bool = True,
                 fingerprint: dict | None = None) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in (".jsonl", ".parquet"):
            raise OutputError(f"output.path={self.path}: must end in .jsonl or .parquet")
        self.is_parquet = self.path.suffix.lower() == ".parquet"
        journal = self.path.with_name(self.path.name + ".journal.jsonl")
        self.journal = journal if self.is_parquet else self.path
        self.fingerprint_path = self.path.with_name(self.path.stem + ".fingerprint.json")
        self.errors_log = self.path.with_name(self.path.stem + ".errors.log")
        self.lock_path = self.path.with_name(self.path.stem + ".lock")
        self._lock = ExitStack()
        self._lock.enter_context(exclusive_lock(self.lock_path, f"output.path={self.path}"))
        try:
            self._open(overwrite, retry_errors, fingerprint)
        except BaseException:
            self.release()
            raise

    def _open(self, overwrite: bool, retry_errors: bool, fingerprint: dict | None) -> None:
        """Read the output (under the lock): one row per id, rewritten when it held more."""
        if overwrite:
            for p in {self.path, self.journal, self.fingerprint_path, self.errors_log}:
                p.unlink(missing_ok=True)
        written = self._recover()
        self.rows: list[dict] = unique_rows(written)
        if fingerprint is not None:
            self._check_fingerprint(self.rows, fingerprint)
        if len(self.rows) < len(written):
            duplicated = sum(n > 1 for n in Counter(r["id"] for r in written if not r.get("error")).values())
            if duplicated:
                log.warning("%s: more than one answered row for %d id(s); keeping the newest of each",
                            self.path, duplicated)
            self._rewrite(self.rows)
        self._position = {row["id"]: i for i, row in enumerate(self.rows)}
        self.done_ids: set[str] = {row["id"] for row in self.rows if not (retry_errors and row.get("error"))}
        self.retried = len(self.rows) - len(self.done_ids)  # error rows to ask again
        self._replaced = 0  # rows of `rows` that replaced an earlier row of the output this run

    def release(self) -> None:
        """Let another job open the output (idempotent). Call `close()` first to finish it."""
        self._lock.close()

    def __enter__(self) -> OutputSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _recover(self) -> list[dict]:
        """Rows already written by earlier runs; a torn last line (no newline: a crash mid-write) is cut off
        the journal, any other unreadable line is an `OutputError`."""
        rows: list[dict] = []
        if self.is_parquet and self.path.exists():
            import pyarrow.parquet as pq

            rows = pq.read_table(self.path).to_pylist()
        if not self.journal.exists():
            return rows
        good_bytes = 0
        with self.journal.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    break  # the torn last line
                try:
                    row = json.loads(raw)
                    if not isinstance(row, dict) or "id" not in row:
                        raise ValueError("not an output row")
                except ValueError as err:
                    raise OutputError(
                        f"{self.journal}:{number}: not a readable output row ({err}); the file is left as it "
                        "is. Fix or remove that line, or start over with output.overwrite=true or another "
                        "output.path"
                    ) from None
                rows.append(row)
                good_bytes += len(raw)
        if good_bytes != self.journal.stat().st_size:
            with self.journal.open("r+b") as f:
                f.truncate(good_bytes)
        return rows

    def _check_fingerprint(self, rows: list[dict], fingerprint: dict) -> None:
        """Resume only rows written with the same fingerprint; record it for a new output."""
        if rows:
            if not self.fingerprint_path.exists():
                raise OutputError(
                    f"{self.path} holds {len(rows)} rows but no {self.fingerprint_path.name} says what made "
                    "them, so this job cannot add to it safely. Pass another output.path, or "
                    "output.overwrite=true to start over"
                )
            recorded = json.loads(self.fingerprint_path.read_text())
            differ = differences(recorded, fingerprint)
            if differ:
                raise OutputError(
                    f"{self.path} was written by a job with other settings ({', '.join(differ)} differ; "
                    f"see {self.fingerprint_path.name}): its {len(rows)} rows would mix with this job's. "
                    "Pass another output.path, or output.overwrite=true to start over"
                )
        write_json(self.fingerprint_path, fingerprint)

    def _rewrite(self, rows: list[dict]) -> None:
        """The output as exactly `rows` (atomically)."""
        if self.is_parquet:
            self._write_parquet(rows)
            self.journal.unlink(missing_ok=True)
        else:
            write_jsonl(self.journal, [self._line(r) for r in rows])

    def write(self, row: dict) -> None:
        """Append `row` to the journal; it replaces the row of a retried id in `rows`."""
        if row["id"] in self.done_ids:
            raise ValueError(f"id {row['id']!r} is already in {self.journal}")
        with self.journal.open("a", encoding="utf-8") as f:
            f.write(json.dumps(self._line(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done_ids.add(row["id"])
        if row["id"] in self._position:
            self.rows[self._position[row["id"]]] = row
            self._replaced += 1
        else:
            self._position[row["id"]] = len(self.rows)
            self.rows.append(row)

    def log_error(self, ids: list[str], video: str, message: str, detail: str | None) -> None:
        """A failure's message and traceback, for `<stem>.errors.log`."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.errors_log.open("a", encoding="utf-8") as f:
            f.write(f"=== {stamp} {video} (ids {', '.join(ids)})\n{message}\n{(detail or '').rstrip()}\n\n")

    def close(self) -> None:
        """Finish the output as `rows`, one row per id: for Parquet, write it (atomically) and drop the
        journal; for JSONL, rewrite it (atomically) when retried rows replaced old ones. The lock stays
        held until `release()`."""
        if (self.is_parquet and self.journal.exists()) or self._replaced:
            self._rewrite(self.rows)
        self._replaced = 0

    def _write_parquet(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_path(self.path) as partial:
            pq.write_table(pa.Table.from_pylist([self._line(r) for r in rows]), partial)

    @staticmethod
    def _line(row: dict) -> dict:
        """The output columns in order, then any columns the question brought along (manifest extras)."""
        return {**{k: row.get(k) for k in OUTPUT_COLUMNS}, **{k: v for k, v in row.items()
                                                                 if k not in OUTPUT_COLUMNS}}


def unique_rows(rows: Iterable[dict]) -> list[dict]:
    """One row per id, in the order the ids first appear: the id's last row without an error, else its
    last row (`rows` in the order they were written, oldest first). Rows without an id are all kept."""
    newest: dict[object, dict] = {}
    for number, row in enumerate(rows):
        key = ("id", row["id"]) if row.get("id") is not None else ("row", number)
        kept = newest.get(key)
        if kept is None or not row.get("error") or kept.get("error"):
            newest[key] = row
    return list(newest.values())


def differences(recorded: object, current: object, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two fingerprints."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [key for name in sorted(set(recorded) | set(current))
                for key in differences(recorded.get(name), current.get(name), f"{prefix}{name}.")]
    return [] if recorded == current else [prefix.rstrip(".")]
