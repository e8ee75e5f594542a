"""Where answers go: one row per question, appended as it completes, safe to resume and to rerun.

Rows are appended to a JSONL journal, one `write` of a whole line each, flushed and fsynced, so a crash
(even SIGKILL) leaves at most one torn last line, which the next run drops. Any other line that does not
parse stops the job, naming the file and the line, with the file left as it is: rows are never deleted
silently. For a `.jsonl` output the journal is the output. For `.parquet` the journal sits beside it
(`<path>.journal.jsonl`) and the Parquet file is written from it atomically when the job ends.

Beside the output:
- `<stem>.fingerprint.json`: what determines its answers (`pipelines.job.job_fingerprint`). Rows are
  resumed only by a job with the same fingerprint; any other job stops before work, naming the keys that
  differ, so one file never mixes settings.
- `<stem>.errors.log`: every failed row's message and traceback (Ray workers' too).
Error rows are retried by a rerun (`retry_errors`): they leave the output when it is opened and come back
as answers, or as errors again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipelines.files import atomic_path, write_json, write_jsonl

OUTPUT_COLUMNS = (
    "id", "video", "question", "prediction", "answer", "category", "options", "visual_tokens_full",
    "visual_tokens_kept", "decode_seconds", "encode_seconds", "answer_seconds", "prompt_tokens",
    "generated_tokens", "error",
)


class OutputError(ValueError):
    """An output that cannot be resumed as asked; the message names the file and the ways out."""


class OutputSink:
    """Appends result rows to the job's output and knows which ids are already done."""

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in {self.path, self.journal, self.fingerprint_path, self.errors_log}:
                p.unlink(missing_ok=True)
        rows = self._recover()
        if fingerprint is not None:
            self._check_fingerprint(rows, fingerprint)
        failed = [r for r in rows if r.get("error")] if retry_errors else []
        if failed:
            rows = [r for r in rows if not r.get("error")]
            self._rewrite(rows)
        self.retried = len(failed)  # error rows taken out to be tried again
        self.rows: list[dict] = rows
        self.done_ids: set[str] = {row["id"] for row in rows}

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
        if row["id"] in self.done_ids:
            raise ValueError(f"id {row['id']!r} is already in {self.journal}")
        with self.journal.open("a", encoding="utf-8") as f:
            f.write(json.dumps(self._line(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done_ids.add(row["id"])
        self.rows.append(row)

    def log_error(self, ids: list[str], video: str, message: str, detail: str | None) -> None:
        """A failure's message and traceback, for `<stem>.errors.log`."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.errors_log.open("a", encoding="utf-8") as f:
            f.write(f"=== {stamp} {video} (ids {', '.join(ids)})\n{message}\n{(detail or '').rstrip()}\n\n")

    def close(self) -> None:
        """Finish the output: for Parquet, write it from the journal (atomically) and drop the journal."""
        if self.is_parquet and self.journal.exists():
            self._write_parquet(self.rows)
            self.journal.unlink()

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


def differences(recorded: object, current: object, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two fingerprints."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [key for name in sorted(set(recorded) | set(current))
                for key in differences(recorded.get(name), current.get(name), f"{prefix}{name}.")]
    return [] if recorded == current else [prefix.rstrip(".")]
