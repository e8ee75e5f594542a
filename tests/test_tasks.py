"""The published sets as tasks: their readers on the sets' own records (in shared/sets, not in git; sources
in tests/data/sets/SOURCES.md; see tests/shared_data.py), the
prompt and rule each job gets by its data.format, and the official results files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shared_data import missing_reason, shared_folder

from pipelines.config import compose_job
from pipelines.datasets import DataConfig, read_questions
from pipelines.fingerprint import job_fingerprint
from pipelines.score import main as score_main
from pipelines.score import write_scoring_record
from stages.model import read_model_config
from tasks import MANIFEST, TASKS
from tasks.results import main as results_main
from tasks.results import results_file
from tasks.tables import loads_lenient

ROOT = Path(__file__).resolve().parent.parent
SETS = shared_folder("sets")
needs_records = pytest.mark.skipif(SETS is None, reason=missing_reason("sets", "tests/data/sets/SOURCES.md"))


def touch(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


# --------------------------------------------------------------------------------- readers, real records


@needs_records
def test_videomme_reads_the_official_template(tmp_path):
    """The results template: nested one record per video, a comma after each question's last field, the
    video named by `video_id` (no `videoID`), options "A. text"."""
    template = SETS / "videomme" / "output_test_template.json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(template.read_text())  # not strict JSON, as shipped
    questions = read_questions(DataConfig(format="videomme", annotations=str(template),
                                          video_root=str(touch(tmp_path, "001.mp4", "002.mp4"))))
    assert [q.id for q in questions] == [f"00{v}-{k}" for v in (1, 2, 3) for k in (1, 2, 3)]
    first = questions[0]
    assert first.options == ("Apples.", "Candles.", "Berries.", "The three kinds are of the same number.")
    assert (first.answer, first.category, first.video) == ("C", "Counting Problem", str(tmp_path / "001.mp4"))
    assert first.extra == {"video_id": "001", "duration": "short", "domain": "Knowledge",
                           "sub_category": "Humanity & History"}  # fmt: skip
    assert [q.answer for q in questions] == list("CADCDBBCD")
    assert all(q.error is None for q in questions[:6]) and "003" in questions[6].error  # no 003.mp4


@needs_records
def test_nextqa_reads_the_release_csv(tmp_path):
    """val.csv: id `<video>_<qid>`, the answer an index, the type the category; NExTVideo keeps videos in
    numbered subfolders."""
    root = touch(tmp_path, "1164/4010069381.mp4", "0001/4882821564.mp4")
    questions = read_questions(DataConfig(format="nextqa", annotations=str(SETS / "nextqa" / "val.csv"),
                                          video_root=str(root)))
    assert [q.id for q in questions][:3] == ["4010069381_6", "4882821564_1", "2435100235_7"]
    first = questions[0]
    assert first.question == "how do the two man play the instrument"
    assert first.options == ("roll the handle", "tap their feet", "strum the string", "hit with sticks",
                             "pat with hand")  # fmt: skip
    assert (first.answer, first.category, first.video) == ("A", "CH", str(root / "1164/4010069381.mp4"))
    assert [q.answer for q in questions] == list("ACCCDCBB")
    assert [q.category for q in questions] == ["CH", "CW", "CH", "TN", "CW", "CW", "CW", "TN"]
    assert questions[1].error is None and "not found" in questions[2].error


@needs_records
def test_egoschema_reads_the_release_questions_and_subset_answers(tmp_path):
    """questions.json: `q_uid` is id and video, `option 0`..`option 4`; subset_answers.json answers by
    q_uid, and its 5 entries answer none of these 3 questions (the subset's questions are elsewhere)."""
    folder = SETS / "egoschema"
    uids = [r["q_uid"] for r in json.loads((folder / "questions.json").read_text())]
    questions = read_questions(DataConfig(format="egoschema", annotations=str(folder / "questions.json"),
                                          answers=str(folder / "subset_answers.json"),
                                          video_root=str(touch(tmp_path, f"{uids[0]}.mp4"))))
    assert [q.id for q in questions] == uids and questions[0].video == str(tmp_path / f"{uids[0]}.mp4")
    assert all(len(q.options) == 5 and q.answer is None and q.category is None for q in questions)
    assert questions[0].options[3] == "C briefly stops scrolling, showing a drifting focus."
    answers = json.loads((folder / "subset_answers.json").read_text())
    assert list(answers.values()) == [3, 4, 1, 4, 3] and not set(answers) & set(uids)


@needs_records
def test_videollava_reads_activitynet_qa(tmp_path):
    """test_q/test_a in different orders, matched by `question_id`; `type` (0-8) the category; the
    video named without the `v_` its question id and file carry."""
    folder = SETS / "videollava"
    root = touch(tmp_path, "v_1QIUV7WYKXg.mp4", "v_chmegNbBTNc.mkv")
    questions = read_questions(DataConfig(format="videollava", questions=str(folder / "test_q.json"),
                                          answers=str(folder / "test_a.json"), video_root=str(root)))
    by_id = {q.id: q for q in questions}
    assert len(by_id) == 9 and sorted(q.category for q in questions) == [str(t) for t in range(9)]
    first = by_id["v_1QIUV7WYKXg_3"]
    assert (first.question, first.answer, first.category) == ("is the athlete wearing trousers", "no", "3")
    assert first.video == str(root / "v_1QIUV7WYKXg.mp4") and first.error is None
    assert by_id["v_chmegNbBTNc_9"].video.endswith(".mkv") and by_id["v_chmegNbBTNc_9"].answer == "day"
    assert [q.id for q in questions][:2] == ["v_1QIUV7WYKXg_3", "v_chmegNbBTNc_9"]  # test_q's order
    assert "not found" in by_id["v_4LoAbHdHWqM_1"].error


def test_lenient_json_never_touches_strings():
    assert loads_lenient('[{"a": "x, }", "b": [1, 2,],},]') == [{"a": "x, }", "b": [1, 2]}]
    with pytest.raises(json.JSONDecodeError):
        loads_lenient('[{"a": 1} {"b": 2}]')


# ---------------------------------------------------------------------------- prompts and rules by set


def job_for(data_format: str, *overrides: str):
    files = (["data.questions=q.json", "data.answers=a.json"] if data_format == "videollava"
             else ["data.manifest=m.jsonl"] if data_format == "manifest" else ["data.annotations=x.json"])
    return compose_job(f"data.format={data_format}", "output.path=out.jsonl", *files, *overrides)


@pytest.mark.parametrize("data_format", list(TASKS))
def test_each_set_is_asked_and_scored_its_own_way_unless_overridden(data_format):
    task = TASKS[data_format]
    job = job_for(data_format)
    assert (job.pipeline.prompt, job.pipeline.choice_prompt, job.score.rule_for(data_format)) == (
        task.prompt, task.choice_prompt, task.rule)
    mine = job_for(data_format, "score.rule=lmms_eval_nextqa", "pipeline.prompt='USER: <video> {question}'",
                   "pipeline.choice_prompt='{question} {options}'")
    assert (mine.pipeline.prompt, mine.pipeline.choice_prompt, mine.score.rule_for(data_format)) == (
        "USER: <video> {question}", "{question} {options}", "lmms_eval_nextqa")


def test_the_sets_prompts_are_their_references():
    assert TASKS["mvbench"].prompt.endswith("ASSISTANT: Best option:(")
    assert TASKS["mvbench"].choice_prompt.startswith("Carefully watch the video")
    assert "\nOptions:\n{options}\nOnly give the best option." in TASKS["mvbench"].choice_prompt
    assert TASKS["videomme"].choice_prompt.endswith(
        "of the correct option.\n{question}\n{options}\nThe best answer is:")
    assert TASKS["videollava"].prompt.startswith("A chat between a curious human")
    assert TASKS["nextqa"].choice_prompt == "{question}\n{options}"
    assert TASKS["egoschema"].choice_prompt == MANIFEST.choice_prompt  # lmms-eval's post prompt, the same
    assert {name: task.rule for name, task in TASKS.items()} == {
        "manifest": "lmms_eval", "videollava": None, "videomme": "videomme", "mvbench": "mvbench",
        "nextqa": "lmms_eval_nextqa", "egoschema": "lmms_eval_egoschema"}  # fmt: skip


def test_the_fingerprint_records_the_resolved_prompts_and_rule():
    model_config = read_model_config(str(ROOT / "models" / "synth"))
    mme, mvb = (job_fingerprint(job_for(name), model_config) for name in ("videomme", "mvbench"))
    assert mme["pipeline"]["choice_prompt"] == TASKS["videomme"].choice_prompt
    assert mvb["pipeline"]["prompt"] == TASKS["mvbench"].prompt
    assert (mme["score"], mvb["score"]) == ({"rule": "videomme"}, {"rule": "mvbench"})
    other = job_fingerprint(job_for("videomme", "score.rule=lmms_eval"), model_config)
    assert other["score"] == {"rule": "lmms_eval"} and other["pipeline"] == mme["pipeline"]


def test_published_numbers_or_why_none():
    for task in TASKS.values():
        assert bool(task.published) != bool(task.unpublished), task.name
    overall = TASKS["videomme"].published[0]
    assert (overall.value, overall.setting) == (39.9, "all durations, w/o subtitles")
    msvd = [p.value for p in TASKS["videollava"].published if p.setting == "MSVD-QA"]
    assert msvd == [70.7, 3.9]


# --------------------------------------------------------------------------------- official results files


def rows_of_template() -> tuple[list, list[dict]]:
    """The template's records and the job's rows for its questions, each predicting the template's
    `response` (the last question of 003 as an error row)."""
    template = loads_lenient((SETS / "videomme" / "output_test_template.json").read_text())
    rows = [{"id": q["question_id"], "video": f"/data/{v['video_id']}.mp4", "question": q["question"],
             "options": [o[3:] for o in q["options"]], "answer": q["answer"], "category": q["task_type"],
             "prediction": q["response"], "error": None, "video_id": v["video_id"], "duration": v["duration"],
             "domain": v["domain"], "sub_category": v["sub_category"]}
            for v in template for q in v["questions"]]  # fmt: skip
    rows[-1] = {**rows[-1], "prediction": None, "error": "decode failed"}
    return template, rows


@needs_records
def test_videomme_results_file_is_the_official_template(tmp_path):
    template, rows = rows_of_template()
    results = results_file(rows, "videomme")
    expected = json.loads(json.dumps(template))
    expected[-1]["questions"][-1]["response"] = ""  # the error row: an empty response
    assert results == expected  # same layout, keys, order and values
    assert [list(v) for v in results] == [list(v) for v in template]
    keys = [[list(q) for q in v["questions"]] for v in template]
    assert [[list(q) for q in v["questions"]] for v in results] == keys
    output = tmp_path / "preds.jsonl"
    output.write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = results_main([str(output), "--set", "videomme"])
    assert written == tmp_path / "preds.videomme.json" and json.loads(written.read_text()) == expected


@needs_records
def test_egoschema_submission_uses_the_rule(tmp_path):
    uids = [r["q_uid"] for r in json.loads((SETS / "egoschema" / "questions.json").read_text())]
    options = [f"text {i}" for i in range(5)]
    rows = [{"id": uids[0], "options": options, "prediction": "The answer is A because B is wrong"},
            {"id": uids[1], "options": options, "prediction": "no idea"},
            {"id": uids[2], "options": options, "prediction": None, "error": "decode failed"}]
    assert results_file(rows, "egoschema") == {uids[0]: 0, uids[1]: -1, uids[2]: -1}  # its own rule: A
    assert results_file(rows, "egoschema", "lmms_eval_nextqa")[uids[0]] == 1  # NExT-QA's parser: B
    output = tmp_path / "ego.jsonl"
    output.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_scoring_record(output, "egoschema", "choice", None, rule="lmms_eval_nextqa")
    written = results_main([str(output), "--set", "egoschema"])  # the recorded rule
    assert json.loads(written.read_text())[uids[0]] == 1
    with pytest.raises(ValueError, match="set 'nextqa' has no official results file"):
        results_file(rows, "nextqa")


@needs_records
def test_the_score_command_reads_with_the_recorded_rule_or_the_flag(tmp_path):
    _, rows = rows_of_template()
    output = tmp_path / "mme.jsonl"
    output.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_scoring_record(output, "videomme", "choice", None, rule="videomme")
    recorded = score_main([str(output)])
    # the template's responses: "C. Berries." "D." "D. 3" "Answer: C. Jade." "D" "D. 13" "B" "C."; the
    # error row's is empty: every one read alike by both rules, right 6 times of 8 read (not 001-2, 002-3)
    overall = recorded["overall"]
    assert (recorded["rule"], overall["correct"], overall["errors"]) == ("videomme", 6, 1)
    flagged = score_main([str(output), "--rule", "mvbench"])  # "(answer:" of 002-1 credits no option
    assert flagged["rule"] == "mvbench" and flagged["overall"]["correct"] == 5
