"""Where answers go: one row per question, appended as it completes, safe to resume.

Rows are appended to a JSONL journal, one `write` of a whole line each, flushed and fsynced, so a crash
(even SIGKILL) leaves at most one torn last line, which the next run drops. For a `.jsonl` output the
journal is the output. For `.parquet` the journal sits beside it (`<path>.journal.jsonl`) and the Parquet
file is written from it atomically when the job ends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines.files import atomic_path

OUTPUT_COLUMNS = (
    "id", "video", "question", "prediction", "answer", "category", "options", "visual_tokens_full",
    "visual_tokens_kept", "decode_seconds", "encode_seconds", "answer_seconds", "prompt_tokens",
    "generated_tokens", "error",
)


class OutputSink:
    """Appends result rows to the job's output and knows which ids are already done."""

    def __init__(self, path: str | Path, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in (".jsonl", ".parquet"):
            raise ValueError(f"output.path={self.path}: must end in .jsonl or .parquet")
        self.is_parquet = self.path.suffix.lower() == ".parquet"
        self.journal = self.path.with_name(self.path.name + ".journal.jsonl")
        if not self.is_parquet:
            self.journal = self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in {self.path, self.journal}:
                p.unlink(missing_ok=True)
        self.rows: list[dict] = self._recover()
        self.done_ids: set[str] = {row["id"] for row in self.rows}

    def _recover(self) -> list[dict]:
        """Rows already written by earlier runs; a torn last line is cut off the journal."""
        rows: list[dict] = []
        if self.is_parquet and self.path.exists():
            import pyarrow.parquet as pq

            rows = pq.read_table(self.path).to_pylist()
        if not self.journal.exists():
            return rows
        good_bytes = 0
        with self.journal.open("rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError:
                    break
                rows.append(row)
                good_bytes += len(raw)
        if good_bytes != self.journal.stat().st_size:
            with self.journal.open("r+b") as f:
                f.truncate(good_bytes)
        return rows

    def write(self, row: dict) -> None:
        if row["id"] in self.done_ids:
            raise ValueError(f"id {row['id']!r} is already in {self.journal}")
        with self.journal.open("a", encoding="utf-8") as f:
            f.write(json.dumps({k: row.get(k) for k in OUTPUT_COLUMNS}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done_ids.add(row["id"])
        self.rows.append(row)

    def close(self) -> None:
        """Finish the output: for Parquet, write it from the journal (atomically) and drop the journal."""
        if self.is_parquet and self.journal.exists():
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist([{k: r.get(k) for k in OUTPUT_COLUMNS} for r in self.rows])
            with atomic_path(self.path) as partial:
                pq.write_table(table, partial)
            self.journal.unlink()
