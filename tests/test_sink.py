import json

import pyarrow.parquet as pq
import pytest

from pipelines.sink import OUTPUT_COLUMNS, OutputError, OutputSink
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
    again = OutputSink(path, retry_errors=False)
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
    with pytest.raises(OutputError, match="must end in .jsonl or .parquet"):
        OutputSink(tmp_path / "out.csv")


def test_summary_counts_the_output_and_times_this_run():
    rows = [row("a", kept=17), row("b", kept=19), row("c", error="boom")]
    s = summarize(rows, rows[2:], {"decode": 0.5, "encode": 0.25, "answer": 1.0}, wall_seconds=2.0)
    assert (s["rows"], s["ok"], s["error"]) == (3, 2, 1)  # the whole output
    assert s["visual_tokens_full_mean"] == 257 and s["visual_tokens_kept_mean"] == 18
    assert s["visual_tokens_kept_fraction"] == round(18 / 257, 4)
    assert s["this_run"] == {"rows": 1, "ok": 0, "error": 1, "wall_seconds": 2.0, "rows_per_second": 0.5,
                             "stage_seconds": {"decode": 0.5, "encode": 0.25, "answer": 1.0}}
    idle = summarize(rows, [], {}, wall_seconds=0.1)  # a resumed run with nothing left to do
    assert idle["this_run"]["rows_per_second"] is None and idle["this_run"]["stage_seconds"]["answer"] == 0


def test_a_corrupt_line_before_the_last_stops_the_job_and_keeps_the_file(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = OutputSink(path)
    for i in "abc":
        sink.write(row(i))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + '{"id": "b", oops\n' + lines[2])  # a hand edit gone wrong
    before = path.read_bytes()
    with pytest.raises(OutputError, match=rf"{path}:2: not a readable output row"):
        OutputSink(path)
    assert path.read_bytes() == before  # nothing cut: rows b and c are still there to fix


def test_error_rows_are_retried_unless_told_otherwise(tmp_path):
    for suffix in (".jsonl", ".parquet"):
        path = tmp_path / f"out{suffix}"
        sink = OutputSink(path)
        sink.write(row("a"))
        sink.write(row("b", error="DecodeError: missing"))
        sink.close()
        kept = OutputSink(path, retry_errors=False)
        assert kept.done_ids == {"a", "b"} and kept.retried == 0
        retry = OutputSink(path)
        assert retry.done_ids == {"a"} and retry.retried == 1
        retry.write(row("b"))  # the video is back: an answer now
        retry.close()
        ids = pq.read_table(path).column("id").to_pylist() if suffix == ".parquet" else [
            json.loads(line)["id"] for line in path.read_text().splitlines()]
        assert ids == ["a", "b"] and all(r.get("error") is None for r in OutputSink(path).rows)


def test_a_job_with_other_settings_cannot_add_to_an_output(tmp_path):
    path = tmp_path / "out.jsonl"
    settings = {"compression": {"method": "visionzip", "dominant": 14}, "model": {"path": "m"}}
    sink = OutputSink(path, fingerprint=settings)
    sink.write(row("a"))
    assert json.loads((tmp_path / "out.fingerprint.json").read_text()) == settings
    OutputSink(path, fingerprint=settings)  # the same job resumes
    other = {"compression": {"method": "visionzip", "dominant": 30}, "model": {"path": "m"}}
    with pytest.raises(OutputError, match=r"other settings \(compression.dominant differ.*overwrite=true"):
        OutputSink(path, fingerprint=other)
    assert OutputSink(path, fingerprint=other, overwrite=True).done_ids == set()
    assert json.loads((tmp_path / "out.fingerprint.json").read_text()) == other
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text(json.dumps(row("x")) + "\n")  # rows, but nothing says what made them
    with pytest.raises(OutputError, match="no legacy.fingerprint.json says what made them"):
        OutputSink(legacy, fingerprint=settings)
