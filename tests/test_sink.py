import json

import pyarrow.parquet as pq
import pytest

from pipelines.sink import OUTPUT_COLUMNS, OutputSink
from pipelines.summary import summarize


def row(i: str, error: str | None = None, kept: int = 17) -> dict:
    return {"id": i, "video": "v.mp4", "question": "q", "prediction": None if error else f"p{i}",
            "visual_tokens_full": 257, "visual_tokens_kept": kept, "decode_seconds": 0.5, "error": error}


def test_jsonl_rows_are_appended_and_resumed(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = OutputSink(path)
    sink.write(row("a"))
    sink.write(row("b", error="DecodeError: bad"))
    sink.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["a", "b"] and list(lines[0]) == list(OUTPUT_COLUMNS)
    assert lines[1]["error"] == "DecodeError: bad" and lines[1]["prediction"] is None
    again = OutputSink(path)
    assert again.done_ids == {"a", "b"}
    with pytest.raises(ValueError, match="'a' is already in"):
        again.write(row("a"))
    assert OutputSink(path, overwrite=True).done_ids == set() and not path.exists()


def test_a_torn_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = OutputSink(path)
    sink.write(row("a"))
    sink.close()
    with path.open("a") as f:
        f.write('{"id": "b", "vid')  # a crash in the middle of a write
    again = OutputSink(path)
    assert again.done_ids == {"a"}
    again.write(row("b"))
    again.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_parquet_output_is_written_from_the_journal_and_resumes(tmp_path):
    path = tmp_path / "out.parquet"
    sink = OutputSink(path)
    sink.write(row("a"))
    assert (tmp_path / "out.parquet.journal.jsonl").exists() and not path.exists()
    sink.close()
    assert pq.read_table(path).column("id").to_pylist() == ["a"]
    assert not (tmp_path / "out.parquet.journal.jsonl").exists()
    again = OutputSink(path)
    again.write(row("b"))
    del again  # a crash before close: the journal holds b, the parquet file holds a
    third = OutputSink(path)
    assert third.done_ids == {"a", "b"}
    third.close()
    assert pq.read_table(path).column("id").to_pylist() == ["a", "b"]


def test_output_suffix_is_checked(tmp_path):
    with pytest.raises(ValueError, match="must end in .jsonl or .parquet"):
        OutputSink(tmp_path / "out.csv")


def test_summary_counts_and_means():
    rows = [row("a", kept=17), row("b", kept=19), row("c", error="boom")]
    s = summarize(rows, wall_seconds=2.0, rows_this_run=3)
    assert (s["rows"], s["ok"], s["error"]) == (3, 2, 1)
    assert s["visual_tokens_full_mean"] == 257 and s["visual_tokens_kept_mean"] == 18
    assert s["visual_tokens_kept_fraction"] == round(18 / 257, 4)
    assert s["seconds_per_row"]["decode"] == 0.5 and s["seconds_per_row"]["encode"] is None
    assert s["rows_per_second"] == 1.5
