"""Accuracy per question type from output rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.evaluate import evaluate, format_table, main, normalize, read_rows, sweep_table


@pytest.mark.parametrize(
    ("text", "expected"),
    [("The Red.", "red"), ("  a   circle!", "circle"), ("LEFT", "left"), (None, ""),
     ("an apple, the end", "apple end"), ("three", "three"), ("theatre", "theatre")],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def _row(qid, prediction, answer, error=None, kept=136):
    return {"id": qid, "prediction": prediction, "answer": answer, "error": error, "visual_tokens_kept": kept,
            "answer_seconds": 0.5}


ROWS = [
    _row("00000-color", "Red.", "red"),
    _row("00000-count", "two", "three"),
    _row("00001-color", "blue", "green"),
    _row("00001-count", None, "one", error="decode: broken"),
    _row("00002-color", "The green", "green", kept=100),
    _row("00002-half", "top", None),  # no ground truth: not scored
]


def test_accuracy_per_type_and_overall():
    result = evaluate(ROWS)
    assert result["types"] == {
        "color": {"n": 3, "correct": 2, "errors": 0, "accuracy": 2 / 3},
        "count": {"n": 2, "correct": 0, "errors": 1, "accuracy": 0.0},
    }
    assert result["overall"] == {"n": 5, "correct": 2, "errors": 1, "accuracy": 0.4}
    assert result["unscored"] == 1
    assert result["visual_tokens_kept_mean"] == pytest.approx((136 * 4 + 100) / 5)


def test_type_column_wins_and_plain_ids_are_all():
    rows = [{"id": "q1", "prediction": "x", "answer": "x"}, {"id": "q-2", "type": "what", "prediction": "y",
                                                              "answer": "x"}]
    result = evaluate(rows)
    assert result["types"]["all"]["accuracy"] == 1.0 and result["types"]["what"]["accuracy"] == 0.0


def test_cli_on_jsonl_and_parquet(tmp_path, capsys):
    jsonl = tmp_path / "out.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    result = main([str(jsonl)])
    printed = capsys.readouterr().out
    assert "overall" in printed and "40.0%" in printed and "66.7%" in printed
    assert json.loads((tmp_path / "out.jsonl.eval.json").read_text())["overall"]["correct"] == 2
    parquet = tmp_path / "out.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    assert read_rows(parquet) == ROWS
    assert main([str(parquet), "--json", str(tmp_path / "p.json")])["overall"] == result["overall"]
    assert format_table(result).splitlines()[0].split() == ["type", "n", "correct", "errors", "accuracy"]


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        read_rows(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "1", "prediction": "a"}) + "\n")
    with pytest.raises(SystemExit, match="no row has an answer"):
        main([str(empty)])


def test_sweep_folder_gives_one_row_per_job_with_retention(tmp_path, capsys):
    jobs = {"0": (["compression=none", "data.manifest=q.jsonl"], ["red", "two", "up", "top"], 520),
            "1": (["compression=visionzip", "compression.dominant=4"], ["red", "one", "up", "top"], 40)}
    truth = [("00000-color", "red"), ("00000-count", "two"), ("00001-direction", "up"),
             ("00001-half", "bottom")]
    for name, (overrides, predictions, tokens) in jobs.items():
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        rows = [{"id": i, "answer": a, "prediction": p, "visual_tokens_kept": tokens, "error": None}
                for (i, a), p in zip(truth, predictions, strict=True)]  # fmt: skip
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / name / "predictions.summary.json").write_text("{}")
    rows = main([str(tmp_path)])
    assert [(r["setting"], r["visual_tokens"], r["overall"], r["retention"]) for r in rows] == [
        ("compression=none", 520, 0.75, 1.0),
        ("compression=visionzip compression.dominant=4", 40, 0.5, 0.5 / 0.75),
    ]
    assert rows[1]["count"] == 0.0 and rows[0]["half"] == 0.0
    table = (tmp_path / "accuracy_table.md").read_text()
    header, _, _, last = table.splitlines()
    assert header.split(" | ")[1:] == ["visual_tokens", "color", "count", "direction", "half", "overall",
                                       "errors", "retention |"]
    assert last.split(" | ")[1:] == ["40.000", "1.000", "0.000", "1.000", "0.000", "0.500", "0", "0.667 |"]
    assert json.loads((tmp_path / "accuracy_table.json").read_text()) == rows
    with pytest.raises(ValueError, match="no job folders"):
        sweep_table(tmp_path / "0")
