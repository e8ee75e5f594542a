import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import score
from pipelines.files import InUseError
from pipelines.sink import OUTPUT_COLUMNS, OutputError, OutputSink, unique_rows
from pipelines.summary import format_summary, summarize

ROOT = Path(__file__).resolve().parent.parent

# Another job on the same output, in its own process: opens it (retrying error rows), prints how many
# it retries, then writes one answer per id read from stdin (printing each), and finishes at EOF.
OTHER_JOB = """
import sys
from pipelines.sink import OutputSink
sink = OutputSink(sys.argv[1])
print("open", sink.retried, flush=True)
for line in sys.stdin:
    sink.write({"id": line.strip(), "prediction": "p" + line.strip(), "error": None})
    print("wrote", line.strip(), flush=True)
sink.close()
sink.release()
"""


def row(i: str, error: str | None = None, kept: int = 17) -> dict:
    return {"id": i, "video": "v.mp4", "question": "q", "prediction": None if error else f"p{i}",
            "visual_tokens_full": 257, "visual_tokens_kept": kept, "decode_seconds": 0.5, "error": error}


def ids_in(path: Path) -> list[str]:
    """The ids of an output file as written, one per row."""
    if path.suffix == ".parquet":
        return pq.read_table(path).column("id").to_pylist()
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def write_output(path: Path, rows: list[dict]) -> None:
    with OutputSink(path) as sink:
        for r in rows:
            sink.write(r)
        sink.close()


@contextmanager
def other_job(path: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """OTHER_JOB on `path`, once it has opened the output, and the number of error rows it retries; killed
    at the end of the block if still running."""
    with subprocess.Popen([sys.executable, "-c", OTHER_JOB, str(path)], cwd=ROOT, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as job:
        try:
            opened = job.stdout.readline().split()
            assert opened[:1] == ["open"], f"the other job did not open {path}: {opened}"
            yield job, int(opened[1])
        finally:
            if job.poll() is None:
                job.kill()


def tell(job: subprocess.Popen, answer_id: str) -> None:
    """Have the other job write an answer for `answer_id`, and wait until it has."""
    job.stdin.write(answer_id + "\n")
    job.stdin.flush()
    assert job.stdout.readline().split() == ["wrote", answer_id]


def test_jsonl_rows_are_appended_and_resumed(tmp_path):
    path = tmp_path / "out.jsonl"
    write_output(path, [row("a"), row("b", error="DecodeError: bad")])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["a", "b"] and list(lines[0]) == list(OUTPUT_COLUMNS)
    assert lines[1]["error"] == "DecodeError: bad" and lines[1]["prediction"] is None
    with OutputSink(path, retry_errors=False) as again:
        assert again.done_ids == {"a", "b"}
        with pytest.raises(ValueError, match="'a' is already in"):
            again.write(row("a"))
    with OutputSink(path, overwrite=True) as fresh:
        assert fresh.done_ids == set() and not path.exists()


def test_a_torn_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "out.jsonl"
    write_output(path, [row("a")])
    with path.open("a") as f:
        f.write('{"id": "b", "vid')  # a crash in the middle of a write
    with OutputSink(path) as again:
        assert again.done_ids == {"a"}
        again.write(row("b"))
        again.close()
    assert ids_in(path) == ["a", "b"]


def test_parquet_output_is_written_from_the_journal_and_resumes(tmp_path):
    path = tmp_path / "out.parquet"
    with OutputSink(path) as sink:
        sink.write(row("a"))
        assert (tmp_path / "out.parquet.journal.jsonl").exists() and not path.exists()
        sink.close()
    assert ids_in(path) == ["a"]
    assert not (tmp_path / "out.parquet.journal.jsonl").exists()
    again = OutputSink(path)
    again.write(row("b"))
    again.release()  # a crash before close (the OS drops a dead process's lock): b only in the journal
    with OutputSink(path) as third:
        assert third.done_ids == {"a", "b"}
        third.close()
    assert ids_in(path) == ["a", "b"]


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


def test_the_summary_says_why_this_run_wrote_fewer_rows_than_the_file_has():
    def this_run_line(rows: list[dict], this_run: list[dict]) -> str:
        summary = {**summarize(rows, this_run, {}, wall_seconds=2.0), "output": "out.jsonl"}
        return next(line for line in format_summary(summary).splitlines() if "this run" in line).strip()

    five = [row(i) for i in "abcde"]
    assert this_run_line(five, five[1:]) == (
        "this run  4 rows (1 already in the file from an earlier run) in 2.0 s (2.00 rows/s); decode 0.0 s, "
        "encode 0.0 s, answer 0.0 s")
    retried = [row("a", error="boom"), row("b"), row("c"), row("a")]  # a's error row retried this run
    assert this_run_line(retried, retried[3:]).startswith("this run  1 rows (2 already in the file from "
                                                          "earlier runs) in 2.0 s")
    assert this_run_line(five, five).startswith("this run  5 rows in 2.0 s")


def test_a_corrupt_line_before_the_last_stops_the_job_and_keeps_the_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_output(path, [row(i) for i in "abc"])
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + '{"id": "b", oops\n' + lines[2])  # a hand edit gone wrong
    before = path.read_bytes()
    with pytest.raises(OutputError, match=rf"{path}:2: not a readable output row"):
        OutputSink(path)
    assert path.read_bytes() == before  # nothing cut: rows b and c are still there to fix


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_error_rows_stay_until_their_retry_replaces_them(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    write_output(path, [row("a"), row("b", error="DecodeError: missing"), row("c", error="boom")])
    with OutputSink(path, retry_errors=False) as kept:
        assert kept.done_ids == {"a", "b", "c"} and kept.retried == 0
    with OutputSink(path) as retry:
        assert retry.done_ids == {"a"} and retry.retried == 2
        assert ids_in(path) == ["a", "b", "c"]  # opening for a retry removes nothing
        retry.write(row("b"))  # the video is back: an answer now
        retry.write(row("c", error="boom again"))
        assert [(r["id"], r["error"]) for r in retry.rows] == [("a", None), ("b", None), ("c", "boom again")]
        retry.close()
    assert ids_in(path) == ["a", "b", "c"]  # the replaced rows are gone, each id once
    with OutputSink(path) as again:
        assert again.rows[1]["prediction"] == "pb" and again.rows[2]["error"] == "boom again"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_killed_retry_run_keeps_its_error_rows_and_its_lock_dies_with_it(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    write_output(path, [row("a"), row("b", error="DecodeError: missing"), row("c", error="boom")])
    with other_job(path) as (job, retried):
        assert retried == 2  # b and c
        tell(job, "b")
        with pytest.raises(InUseError, match=rf"pid {job.pid} on {socket.gethostname()}, started "):
            OutputSink(path)
        job.send_signal(signal.SIGKILL)
        assert job.wait(timeout=30) == -signal.SIGKILL
    with OutputSink(path, retry_errors=False) as after:  # the dead job's lock went with it
        assert [(r["id"], r["error"]) for r in after.rows] == [("a", None), ("b", None), ("c", "boom")]
    assert ids_in(path) == ["a", "b", "c"]  # b's answer replaced its error row when reopened


def test_a_second_job_on_an_output_stops_before_touching_it(tmp_path):
    path = tmp_path / "out.jsonl"
    write_output(path, [row("a")])
    with other_job(path) as (job, _):
        tell(job, "b")
        before = path.read_bytes()
        for overwrite in (False, True):
            with pytest.raises(InUseError) as refused:
                OutputSink(path, overwrite=overwrite)
            holder = f"pid {job.pid} on {socket.gethostname()}, started "
            assert str(refused.value).startswith(f"output.path={path} is in use by another job: {holder}")
            assert path.read_bytes() == before  # not recovered, not rewritten, not deleted
        tell(job, "c")
        job.stdin.close()
        assert job.wait(timeout=30) == 0
    with OutputSink(path) as after:
        assert after.done_ids == {"a", "b", "c"}
    assert ids_in(path) == ["a", "b", "c"]
    assert json.loads((tmp_path / "out.lock").read_text())["pid"] == os.getpid()  # the last holder


def test_a_parquet_output_killed_before_its_journal_was_deleted_keeps_each_id_once(tmp_path, caplog):
    path = tmp_path / "out.parquet"
    write_output(path, [row("q1")])
    with OutputSink(path) as sink:
        sink.write(row("q2"))
        journal = sink.journal.read_bytes()
        sink.close()
    sink.journal.write_bytes(journal)  # killed after the Parquet file was written, before the journal went
    with caplog.at_level(logging.WARNING, logger="pipelines.sink"), OutputSink(path) as again:
        assert [r["id"] for r in again.rows] == ["q1", "q2"] and again.done_ids == {"q1", "q2"}
        assert ids_in(path) == ["q1", "q2"] and not sink.journal.exists()  # rewritten once, on open
        again.write(row("q3"))
        again.close()
    assert f"{path}: more than one answered row for 1 id(s)" in caplog.text
    assert ids_in(path) == ["q1", "q2", "q3"]


def test_the_parquet_file_is_on_disk_before_its_journal_is_deleted(tmp_path, monkeypatch):
    path = tmp_path / "out.parquet"
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, Path.unlink

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", os.path.realpath(dst)))
        real_replace(src, dst)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        events.append(("unlink", os.path.realpath(self)))
        real_unlink(self, missing_ok=missing_ok)

    with OutputSink(path) as sink:
        sink.write(row("a"))
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(Path, "unlink", unlink)
        sink.close()
    folder = os.path.realpath(tmp_path)
    order = [events.index(e) for e in [("replace", os.path.join(folder, "out.parquet")), ("fsync", folder),
                                       ("unlink", os.path.join(folder, "out.parquet.journal.jsonl"))]]
    partial = [i for i, (kind, name) in enumerate(events) if kind == "fsync" and ".partial" in name]
    assert partial and partial[0] < order[0] < order[1] < order[2]  # file, rename, folder, then the journal


def test_unique_rows_keep_the_newest_answer_else_the_newest_error():
    rows = [row("a"), row("b", error="e1"), {**row("a"), "prediction": "newer"}, row("c", error="e1"),
            row("b"), row("b", error="e2"), row("c", error="e2"), {"note": "no id"}, {"note": "no id"}]
    assert [(r.get("id"), r.get("prediction"), r.get("error")) for r in unique_rows(rows)] == [
        ("a", "newer", None), ("b", "pb", None), ("c", None, "e2"), (None, None, None), (None, None, None)]


def test_scores_and_the_summary_count_each_id_once(tmp_path):
    path = tmp_path / "dup.jsonl"
    rows = [{**row("a"), "answer": "pa"}, {**row("b", error="boom"), "answer": "pb"},
            {**row("b"), "answer": "pb"}, {**row("a"), "answer": "pa"}, {**row("c"), "answer": "no"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # two writers before the lock existed
    result = score.main([str(path)])
    assert (result["overall"]["n"], result["overall"]["correct"], result["overall"]["errors"]) == (3, 2, 0)
    summary = summarize(rows, [], {}, wall_seconds=1.0)
    assert (summary["rows"], summary["ok"], summary["error"]) == (3, 3, 0)


def test_a_job_with_other_settings_cannot_add_to_an_output(tmp_path):
    path = tmp_path / "out.jsonl"
    settings = {"compression": {"method": "visionzip", "dominant": 14}, "model": {"path": "m"}}
    with OutputSink(path, fingerprint=settings) as sink:
        sink.write(row("a"))
    assert json.loads((tmp_path / "out.fingerprint.json").read_text()) == settings
    OutputSink(path, fingerprint=settings).release()  # the same job resumes
    other = {"compression": {"method": "visionzip", "dominant": 30}, "model": {"path": "m"}}
    with pytest.raises(OutputError, match=r"other settings \(compression.dominant differ.*overwrite=true"):
        OutputSink(path, fingerprint=other)
    with OutputSink(path, fingerprint=other, overwrite=True) as fresh:  # the refused open let the lock go
        assert fresh.done_ids == set()
    assert json.loads((tmp_path / "out.fingerprint.json").read_text()) == other
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text(json.dumps(row("x")) + "\n")  # rows, but nothing says what made them
    with pytest.raises(OutputError, match="no legacy.fingerprint.json says what made them"):
        OutputSink(legacy, fingerprint=settings)
