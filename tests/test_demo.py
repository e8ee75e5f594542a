"""`make demo` (synthqa.demo): its data, and the whole app end to end on the shipped synth model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipelines.files import read_jsonl
from pipelines.score import read_rows, score_rows
from synthqa.clips import QUESTION_TYPES, synth_sample
from synthqa.demo import DEMO_CLIPS, DEMO_SEED, write_demo_data

ROOT = Path(__file__).resolve().parent.parent


def test_demo_data_is_every_question_type_per_clip_plus_one_truncated_file(tmp_path):
    manifest = write_demo_data(tmp_path / "demo" / "manifest.jsonl", clips=2)
    rows = read_jsonl(manifest)
    ids = [f"{i:05d}-{t}" for i in range(2) for t in QUESTION_TYPES]
    assert [r["id"] for r in rows] == [*ids, "broken-color"]
    first = synth_sample(DEMO_SEED, 0).questions[0]
    assert rows[-1] == {"id": "broken-color", "video": "broken.mp4", "question": first.question,
                        "answer": first.answer, "category": "color"}  # fmt: skip
    whole = (tmp_path / "demo" / "clip_00000.mp4").stat().st_size
    assert (tmp_path / "demo" / "broken.mp4").stat().st_size == whole // 2  # cut before its index
    assert [r["answer"] for r in rows[5:10]] == [q.answer for q in synth_sample(DEMO_SEED, 1).questions]


def test_demo_app_prints_predictions_beside_the_truth(tmp_path):
    command = [sys.executable, "-m", "synthqa.demo", "+experiment=demo", "runner=local",
               f"hydra.run.dir={tmp_path}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "demo_data" / "manifest.jsonl").exists()  # data.manifest in the job's output folder
    rows = read_rows(tmp_path / "predictions.jsonl")
    assert len(rows) == 5 * DEMO_CLIPS + 1
    assert [r["id"] for r in rows if r["error"]] == ["broken-color"]
    answered = [r for r in rows if not r["error"]]
    assert all(r["visual_tokens_kept"] == 8 * 17 for r in answered)  # VisionZip 14 + 3 a frame
    overall = score_rows(rows, metric="exact")["overall"]
    assert overall["correct"] >= 0.85 * len(answered)  # the shipped model answers the held-out clips
    printed = result.stdout.splitlines()
    for row in rows:  # every row printed with its truth (or its error)
        line = next(line for line in printed if line.strip().startswith(row["id"] + " "))
        truth = f"{row['prediction']!r} (truth {row['answer']!r})"
        assert line.endswith(f"ERROR {row['error']}" if row["error"] else truth)
    table_row = f"| overall | {len(rows)} | {overall['correct']} | 1 |"
    assert any(line.startswith(table_row) for line in printed)  # the accuracy table follows
