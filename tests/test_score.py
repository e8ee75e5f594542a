"""Scoring predictions: exact match, multiple choice (lmms-eval's letter extraction), what the LLM judge is
shown (the judge itself: tests/test_judge.py), bootstrap intervals over videos, the scoring record a job
leaves beside its output, and a -m sweep's table with error rows apart and jobs without answers named."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.judge import PROMPT_VERSION, JudgeConfig
from pipelines.score import (
    bootstrap_ci,
    format_table,
    judge_messages,
    main,
    normalize,
    read_rows,
    score_rows,
    scoring_record_path,
    scoring_settings,
    sweep_table,
    write_scoring_record,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("The Red.", "red"), ("  a   circle!", "circle"), ("LEFT", "left"), (None, ""),
     ("an apple, the end", "apple end"), ("three", "three"), ("theatre", "theatre")],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


# ----------------------------------------------------------------------------------------------- exact


def _row(qid, prediction, answer, category, video, error=None, kept=136):
    return {"id": qid, "video": video, "prediction": prediction, "answer": answer, "category": category,
            "options": None, "error": error, "visual_tokens_kept": kept, "answer_seconds": 0.5}  # fmt: skip


ROWS = [
    _row("00000-color", "Red.", "red", "color", "v0.mp4"),
    _row("00000-count", "two", "three", "count", "v0.mp4"),
    _row("00001-color", "blue", "green", "color", "v1.mp4"),
    _row("00001-count", None, "one", "count", "v1.mp4", error="decode: broken"),
    _row("00002-color", "The green", "green", "color", "v2.mp4", kept=100),
    _row("00002-half", "top", None, "half", "v2.mp4"),  # no ground truth: not scored
]


def _plain(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "ci95"}


def test_exact_per_category_and_overall():
    result = score_rows(ROWS)
    assert result["metric"] == "exact" and result["requests"] == 0
    assert {c: _plain(g) for c, g in result["by_category"].items()} == {
        "color": {"n": 3, "correct": 2, "wrong": 1, "errors": 0, "accuracy": 2 / 3, "unparseable": 0},
        "count": {"n": 2, "correct": 0, "wrong": 1, "errors": 1, "accuracy": 0.0, "unparseable": 0},
    }
    assert _plain(result["overall"]) == {"n": 5, "correct": 2, "wrong": 2, "errors": 1, "accuracy": 0.4,
                                         "unparseable": 0}  # fmt: skip
    assert result["unscored"] == 1
    assert result["visual_tokens_kept_mean"] == pytest.approx((136 * 4 + 100) / 5)
    assert result["answer_seconds_mean"] == 0.5
    assert "score" not in result["overall"] and "judge" not in result


def test_category_only_from_the_column_and_old_files_without_it():
    rows = [{"id": "q1-color", "prediction": "x", "answer": "x"},  # an id suffix is no category any more
            {"id": "q-2", "category": "what", "prediction": "y", "answer": "x"},
            {"id": "q-3", "category": None, "prediction": "x", "answer": "x"}]  # fmt: skip
    result = score_rows(rows)
    assert {c: g["accuracy"] for c, g in result["by_category"].items()} == {"all": 1.0, "what": 0.0}
    assert result["by_category"]["all"]["n"] == 2


def test_ci95_resamples_videos_deterministically():
    # 9 videos of 1 to 4 questions, 13 of 20 right
    right = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1]
    videos = list("aaabbbccddeeeefgghhi")
    low, high = bootstrap_ci(right, videos)
    assert (low, high) == pytest.approx((0.42082043343653247, 0.8695652173913043), abs=1e-12)  # SEED 0
    assert bootstrap_ci(right, videos) == [low, high]  # seeded
    assert bootstrap_ci(right, videos, seed=1) != [low, high]
    assert bootstrap_ci([1, 0, 1, 1], ["one"] * 4) == [0.75, 0.75]  # one video: nothing to resample
    assert bootstrap_ci([], []) is None
    # questions of one video move together: wider than if every question were its own video
    independent = bootstrap_ci(right, list(range(20)))
    assert high - low > independent[1] - independent[0]
    # in a result: overall and per category, over the same videos
    result = score_rows(ROWS)
    assert result["overall"]["ci95"] == bootstrap_ci([1, 0, 0, 0, 1], ["v0.mp4", "v0.mp4", "v1.mp4",
                                                                        "v1.mp4", "v2.mp4"])  # fmt: skip
    assert result["by_category"]["count"]["ci95"] == [0.0, 0.0]


def test_a_metric_that_does_not_fit_the_rows_is_refused_and_writes_nothing(tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    output.write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # open questions: no options
    scores = tmp_path / "out.scores.json"
    scores.write_text('{"metric": "exact"}\n')  # an earlier scoring's file
    with pytest.raises(SystemExit) as refused:
        main([str(output), "--metric", "choice"])
    assert refused.value.code == 2
    assert capsys.readouterr().err == (f"error: {output}: metric choice needs multiple-choice rows, and none "
                                       "of the 5 rows with an answer has options: score them with exact or "
                                       "judge\n")
    assert scores.read_text() == '{"metric": "exact"}\n'
    mixed = [*ROWS, {**ROWS[0], "id": "mc", "options": ["red", "blue"], "answer": "A"}]  # one has options
    assert score_rows(mixed, metric="choice")["overall"]["n"] == 6


def test_cli_on_jsonl_and_parquet(tmp_path, capsys):
    jsonl = tmp_path / "out.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    result = main([str(jsonl)])
    printed = capsys.readouterr().out
    assert "| overall | 5 | 2 | 2 | 1 | 0.400 |" in printed and "| color | 3 | 2 | 1 | 0 | 0.667 |" in printed
    written = json.loads((tmp_path / "out.scores.json").read_text())
    assert written == result and written["source"] == str(jsonl) and written["overall"]["correct"] == 2
    old = [{k: v for k, v in r.items() if k not in ("category", "options")} for r in ROWS]  # an old file
    parquet = tmp_path / "out.parquet"
    pq.write_table(pa.Table.from_pylist(old), parquet)
    assert read_rows(parquet) == old
    from_parquet = main([str(parquet), "--scores", str(tmp_path / "p.json")])
    assert _plain(from_parquet["overall"]) == _plain(result["overall"])
    assert list(from_parquet["by_category"]) == ["all"]
    assert json.loads((tmp_path / "p.json").read_text())["source"] == str(parquet)
    header = format_table(result).splitlines()[0]
    assert header == "| category | n | correct | wrong | errors | accuracy | ci95 | unparseable |"


def test_bad_inputs_are_named(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        read_rows(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "1", "prediction": "a"}) + "\n")
    with pytest.raises(SystemExit) as refused:
        main([str(empty)])
    assert refused.value.code == 2
    assert capsys.readouterr().err == f"error: {empty}: no row has an answer to score\n"
    assert not (tmp_path / "empty.scores.json").exists()
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path / "nope.jsonl")])
    assert refused.value.code == 2
    assert capsys.readouterr().err == f"error: output file {tmp_path / 'nope.jsonl'}: no such file\n"
    with pytest.raises(ValueError, match="metric must be one of"):
        score_rows(ROWS, metric="bleu")
    with pytest.raises(ValueError, match="needs a judge"):
        score_rows(ROWS, metric="judge")
    with pytest.raises(SystemExit):  # argparse: --metric judge without --judge-url / --judge-model
        main([str(empty), "--metric", "judge"])
    mc = {"id": "m", "prediction": "A", "answer": "F", "options": ["x", "y"]}
    with pytest.raises(ValueError, match="row 'm': answer 'F' is not the letter of one of its 2 options"):
        score_rows([mc])


# ---------------------------------------------------------------------------------------------- choice

OPTIONS = ["red circle", "blue square", "green triangle", "yellow star"]


def test_choice_reads_replies_by_the_rule_and_divides_as_its_reference():
    """The rule decides the letter (tests/test_extraction.py holds each rule's table): the same replies
    under Video-MME's own script and lmms-eval's current rule; `reference_accuracy` leaves out what the
    reference's accuracy leaves out (Video-MME's script: the replies it cannot read)."""
    rows = [_mc("1", "Choice A", "A"), _mc("2", "the answer is b", "B"), _mc("3", "Based on it, D", "D"),
            _mc("4", "D", "A", error="decode")]  # fmt: skip
    authors = score_rows(rows, rule="videomme")
    # "Choice A" -> the C of "Choice"; "the answer is b" -> nothing, not counted; "Based..." -> B; the
    # error row is an empty response in the results file: not counted either
    overall = authors["overall"]
    assert authors["rule"] == "videomme"
    assert (overall["correct"], overall["unparseable"], overall["errors"]) == (0, 1, 1)
    assert overall["accuracy"] == 0 and overall["reference_accuracy"] == 0 / 2
    current = score_rows(rows, rule="lmms_eval")  # "Choice A" -> A (end), "b" -> none, "... D" -> D (end)
    assert (current["overall"]["correct"], current["overall"]["unparseable"]) == (2, 1)
    assert current["overall"]["accuracy"] == current["overall"]["reference_accuracy"] == 2 / 4
    assert score_rows(rows)["rule"] == "lmms_eval"  # the generic rule
    assert "lmms_eval/tasks/_task_utils/mcq_extract.py" in current["rule_reference"]


def _mc(qid, prediction, answer, category="attr", video="v0", error=None):
    return {"id": qid, "video": video, "question": f"question {qid}?", "prediction": prediction,
            "answer": answer, "category": category, "options": OPTIONS, "error": error}  # fmt: skip


def test_choice_metric_is_the_default_with_options():
    rows = [_mc("1", "The best answer is B.", "B"), _mc("2", "(C)", "B"), _mc("3", "blue square", "B"),
            _mc("4", "no idea", "A", category="count"), _mc("5", None, "A", category="count", error="decode"),
            _mc("6", "a", "a", video="v1"),  # a lowercase answer letter
            {"id": "7", "prediction": "The Red.", "answer": "red", "category": "open", "options": None},
            {**_mc("8", "D", None), "answer": None}]  # fmt: skip
    result = score_rows(rows)
    assert result["metric"] == "choice" and result["unscored"] == 1
    counts = {c: (g["n"], g["correct"], g["unparseable"], g["errors"])
              for c, g in result["by_category"].items()}  # fmt: skip
    # lmms-eval's rule reads letters only: "blue square" and a lower-case "a" name no option
    assert counts == {"attr": (4, 1, 2, 0), "count": (2, 0, 1, 1), "open": (1, 1, 0, 0)}  # open-ended: exact
    assert result["overall"]["accuracy"] == 2 / 7
    assert score_rows(rows, metric="exact")["overall"]["correct"] == 2  # "a" == "a" and "red" == "red"


# ----------------------------------------------------------------------------------------------- judge


def test_judge_messages_shows_options_and_the_correct_one():
    row = {**_mc("1", "B", "b"), "question": "What is it?"}
    assert judge_messages(row) == ("What is it?\nA. red circle\nB. blue square\nC. green triangle\n"
                                   "D. yellow star", "B. blue square", "B")  # fmt: skip


# ---------------------------------------------------------------------------------------------- sweeps


def test_sweep_folder_gives_one_row_per_job_with_retention(tmp_path, capsys):
    error = {"prediction": None, "visual_tokens_kept": None, "error": "decode: broken"}
    jobs = {"0": (["compression=none", "data.manifest=q.jsonl"], ["red", "two", "up", "top"], 520, True),
            "1": (["compression=visionzip", "compression.dominant=4"], ["red", "one", "up", None], 40, True),
            "2": (["compression=pool"], ["red", "one", None, "top"], 30, False)}  # no answers: not scorable
    truth = [("color", "red", "v0"), ("count", "two", "v0"), ("direction", "up", "v1"),
             ("half", "bottom", "v1")]
    for name, (overrides, predictions, tokens, answers) in jobs.items():
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        rows = [{"id": f"{v}-{c}", "video": v, "category": c, "answer": a if answers else None,
                 "prediction": p, "visual_tokens_kept": tokens, "error": None, **(error if p is None else {})}
                for (c, a, v), p in zip(truth, predictions, strict=True)]  # fmt: skip
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / name / "predictions.summary.json").write_text("{}")
    rows = main([str(tmp_path)])
    columns = ("setting", "visual_tokens", "overall", "rows", "wrong", "errors", "retention")
    assert [tuple(r[c] for c in columns) for r in rows] == [
        ("compression=none", 520, 0.75, 4, 1, 0, 1.0),
        ("compression=visionzip compression.dominant=4", 40, 0.5, 4, 1, 1, 0.5 / 0.75),
        ("compression=pool", 30, None, 4, None, 1, None),  # its error row counted, no accuracy
    ]  # fmt: skip
    assert rows[1]["count"] == 0.0 and rows[1]["half"] == 0.0 and rows[0]["metric"] == "exact"
    assert rows[2]["note"] == "no answers: not scorable" and "color" not in rows[2]
    assert rows[2]["metric"] is None
    assert all(r["ci95"][0] <= r["overall"] <= r["ci95"][1] for r in rows[:2])
    table = (tmp_path / "scores_table.md").read_text()
    header, _, _, visionzip, pool = table.splitlines()
    assert header.split(" | ")[1:] == ["visual_tokens", "color", "count", "direction", "half", "overall",
                                       "ci95", "rows", "wrong", "errors", "retention", "metric", "note |"]
    cells = visionzip.split(" | ")[1:]
    assert cells[:6] + cells[7:] == ["40.000", "1.000", "0.000", "1.000", "0.000", "0.500", "4", "1", "1",
                                     "0.667", "exact", " |"]  # fmt: skip
    assert pool == ("| compression=pool | 30.000 |  |  |  |  |  |  | 4 |  | 1 |  |  | no answers: not "
                    "scorable |")
    assert json.loads((tmp_path / "scores_table.json").read_text()) == rows
    assert json.loads((tmp_path / "1" / "predictions.scores.json").read_text())["overall"]["accuracy"] == 0.5
    assert not (tmp_path / "2" / "predictions.scores.json").exists()
    assert table in capsys.readouterr().out
    with pytest.raises(ValueError, match="no job folders"):
        sweep_table(tmp_path / "0")


def test_the_jobs_scoring_record_scores_its_output_without_flags(tmp_path, capsys):
    output = tmp_path / "predictions.jsonl"
    rows = [_mc("1", "The answer is B.", "B"), _mc("2", "B", "B")]  # with options
    output.write_text("".join(json.dumps(r) + "\n" for r in rows))
    no_record = main([str(output)])  # from the rows
    assert no_record["metric"] == "choice" and no_record["overall"]["correct"] == 2
    write_scoring_record(output, "manifest", "exact", None)
    assert main([str(output)])["overall"]["correct"] == 1  # as recorded: the texts compared
    assert main([str(output), "--metric", "choice"])["overall"]["correct"] == 2  # a flag overrides
    judge = JudgeConfig(url="http://127.0.0.1:9/v1", model="judge-m", key_env="MY_KEY", temperature=0,
                        reask=2)
    write_scoring_record(output, "videollava", "judge", judge, served_model="judge-m-0125")
    record = json.loads(scoring_record_path(output).read_text())
    assert record == {"data_format": "videollava", "metric": "judge", "rule": None,
                      "served_model": "judge-m-0125",
                      "judge": {**asdict(judge), "prompt_version": PROMPT_VERSION}}  # fmt: skip
    assert scoring_settings(output) == ("judge", judge)
    assert scoring_settings(output, judge_overrides={"concurrency": 2, "temperature": None}) == (
        "judge", replace(judge, concurrency=2, temperature=None))
    assert scoring_settings(output, metric="exact") == ("exact", None)
    write_scoring_record(output, "videollava", "judge", JudgeConfig())  # a job run without a judge
    assert scoring_settings(output) == ("judge", JudgeConfig())
    with pytest.raises(SystemExit):
        main([str(output)])
    assert "--judge-url must be set; --judge-model must be set (scored by an LLM judge; nothing usable " \
           "recorded in predictions.scoring.json)" in capsys.readouterr().err
