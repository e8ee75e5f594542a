"""Published video-QA sets read as they ship (`pipelines.datasets`), against their twin manifests
(`synthqa.formats`): the same questions, the same predictions, and every bad file refused up front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import compose_job
from pipelines.datasets import DataConfig, VideoIndex, read_questions
from pipelines.job import run_job
from pipelines.manifest import ManifestError, read_manifest
from pipelines.score import score_file
from stages.decode import read_frames
from synthqa.clips import synth_sample
from synthqa.formats import FORMATS, KINDS, write_gif, write_published
from tasks import MANIFEST, TASKS

ROOT = Path(__file__).resolve().parent.parent
SEED, CLIPS = 7, 2


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return write_published(tmp_path_factory.mktemp("published"), SEED, CLIPS)


def data_config(overrides: list[str]) -> DataConfig:
    """`data.key=value` overrides -> the DataConfig they make."""
    return DataConfig(**dict(o.removeprefix("data.").split("=", 1) for o in overrides))


def read_rows(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def run(out: Path, *overrides: str) -> dict[str, dict]:
    # one video per batch and one prompt per generate call: each answer is computed alike in every run,
    # whatever else the run asks; every set asked with the manifest's prompts (the synth model's), so
    # that a set and its twin get the same answers (each set's own prompts: tests/test_tasks.py)
    job = compose_job("+experiment=synth", f"model.path={ROOT / 'models' / 'synth'}", "runner=local",
                      f"output.path={out}", "resources.decode.batch_size=1",
                      "pipeline.generation.batch_size=1", *overrides)
    job.pipeline.prompt, job.pipeline.choice_prompt = MANIFEST.prompt, MANIFEST.choice_prompt
    run_job(job)
    return read_rows(out)


def test_each_reader_gives_the_questions_of_its_twin_manifest(published):
    assert set(published) == set(FORMATS)
    for name, written in published.items():
        questions = read_questions(data_config(written.overrides))
        twin = read_manifest(written.twin)
        assert questions == twin and [q.extra for q in questions] == [q.extra for q in twin], name
        assert [q.id for q in questions] == written.ids and len(questions) == 5 * CLIPS
        assert all(q.error is None and Path(q.video).is_file() for q in questions)
    by_id = {q.id: q for q in read_questions(data_config(published["videollava"].overrides))}
    assert by_id["tumblr_synth00000_0"].video.endswith("videos/tumblr_synth00000.gif")  # TGIF's GIF
    assert by_id["v_synth00001_0"].video.endswith("videos/v_synth00001.mp4")  # ActivityNet's v_ prefix
    assert by_id["tumblr_synth00000_0"].category is None and by_id["v_synth00001_3"].category == "3"
    assert by_id["v_synth00001_0"].answer == synth_sample(SEED, 1).questions[0].answer  # by id, not position
    mme = read_questions(data_config(published["videomme"].overrides))[0]
    assert len(mme.options) == 4 and not mme.options[0].startswith("A.") and mme.category == "color"
    assert mme.extra == {"video_id": "001", "duration": "short", "domain": "Synthetic",
                         "sub_category": "Synthetic"}
    mvbench = {q.id: q for q in read_questions(data_config(published["mvbench"].overrides))}
    assert (mvbench["direction-0"].start, mvbench["direction-0"].end) == (0.0, 1.0)
    assert mvbench["half-1"].options in (("top", "bottom"), ("bottom", "top"))


def test_the_tgif_gif_decodes(tmp_path):
    frames = synth_sample(SEED, 0).clip.frames
    path = write_gif(tmp_path / "clip.gif", frames)
    decoded = read_frames(str(path), num_frames=8).frames
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 25  # GIF's fixed 8-bit palette


def test_the_job_answers_each_set_as_its_twin_manifest(published, tmp_path):
    videollava = published["videollava"]
    videos = videollava.twin.parent / "videollava" / "videos"
    # two questions whose video cannot be used: none is there; two files could be it (dup.mp4, dup.gif,
    # added beside the set's videos: no name of the set is `dup`)
    shutil.copyfile(videos / "v_synth00001.mp4", videos / "dup.mp4")
    shutil.copyfile(videos / "tumblr_synth00000.gif", videos / "dup.gif")
    questions = json.loads((videos.parent / "test_q.json").read_text())
    answers = json.loads((videos.parent / "test_a.json").read_text())
    for name in ("gone", "dup"):
        questions.append({"video_name": name, "question": "What color is the circle?", "question_id": name})
        answers.append({"answer": "red", "question_id": name})
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(answers))
    overrides = {name: written.overrides for name, written in published.items()}
    overrides["videollava"] = ["data.format=videollava", f"data.questions={tmp_path / 'q.json'}",
                               f"data.answers={tmp_path / 'a.json'}", f"data.video_root={videos}"]
    twins = tmp_path / "twins.jsonl"  # every twin in one run; their video paths are relative to their folder
    twins.write_text("".join(written.twin.read_text() for written in published.values()))
    twin_rows = run(tmp_path / "twins.out.jsonl", f"data.manifest={twins}",
                    f"data.video_root={videollava.twin.parent}")
    for name, written in published.items():
        rows = run(tmp_path / f"{name}.out.jsonl", *overrides[name])
        assert set(rows) == set(written.ids) | ({"gone", "dup"} if name == "videollava" else set()), name
        for qid in written.ids:
            row, twin = rows[qid], twin_rows[qid]
            assert row["error"] is None and isinstance(row["prediction"], str), (name, qid, row["error"])
            for key in ("prediction", "question", "answer", "category", "options", "video", "duration"):
                assert row.get(key) == twin.get(key), (name, qid, key)
            assert row.get("duration") == ("short" if name == "videomme" else None)  # Video-MME's, passed on
            if name == "videollava":  # open-ended: the answer's text
                assert row["options"] is None and row["answer"] in {v for vs in KINDS.values() for v in vs}
            else:  # multiple choice: the texts and the correct letter; the category is the set's own
                assert isinstance(row["options"], list) and row["answer"] in "ABCDE"[: len(row["options"])]
                assert (row["category"] is None) == (name == "egoschema")
    # each set's scores, as the job wrote them at its end, against an independent count of its rows
    for name in published:
        output = tmp_path / f"{name}.out.jsonl"
        rows = list(read_rows(output).values())
        if name == "videollava":  # the field judges these with an LLM: not scored without a judge
            assert not (tmp_path / f"{name}.out.scores.json").exists()
            scores = score_file(output, metric="exact")
            right = [r["error"] is None and r["prediction"].strip().lower() == r["answer"] for r in rows]
        else:  # scored by the set's own reference rule, which reads letters: the synth model answers with
            # the option's word (it never learnt letters), so only a bare correct letter counts, and for
            # MVBench an empty reply too (the notebook's check_ans credits "(" with every option)
            scores = json.loads((tmp_path / f"{name}.out.scores.json").read_text())
            assert scores["rule"] == TASKS[name].rule, name
            empty_right = name == "mvbench"
            right = [r["prediction"].strip() in (r["answer"], *([""] if empty_right else [])) for r in rows]
            answered = sum(r["error"] is None for r in rows)
            assert scores["overall"]["unparseable"] == answered - sum(right), name
        assert scores["metric"] == ("exact" if name == "videollava" else "choice"), name
        overall = scores["overall"]
        assert (overall["n"], overall["correct"], overall["errors"]) == (
            len(rows), sum(right), sum(r["error"] is not None for r in rows)), name
    rows = read_rows(tmp_path / "videollava.out.jsonl")
    assert "not found" in rows["gone"]["error"] and rows["gone"]["prediction"] is None
    assert "ambiguous" in rows["dup"]["error"] and "dup.gif" in rows["dup"]["error"]
    assert rows["v_synth00001_3"]["category"] == "3" and rows["tumblr_synth00000_3"]["category"] is None


def write_json(path: Path, document) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def problems_of(data: DataConfig) -> str:
    with pytest.raises(ManifestError) as raised:
        read_questions(data)
    return str(raised.value)


def test_videollava_answers_are_matched_by_id_and_every_mismatch_is_named(tmp_path):
    questions = write_json(tmp_path / "test_q.json", [
        {"video_name": "a", "question": "q1", "question_id": "1"},
        {"video_name": "a", "question": "q2", "question_id": "2"},  # no answer
        {"video_name": "b", "question": "q3", "question_id": "3"},
        {"video_name": "b", "question": "q4", "question_id": "3"},  # duplicate id
        {"video_name": "b", "question_id": "4"},  # no question
    ])
    answers = write_json(tmp_path / "test_a.json", [
        {"answer": "x", "question_id": "1"}, {"answer": "y", "question_id": "9"},  # 9: no question
        {"answer": "z", "question_id": 3, "type": 2}, {"answer": "w", "question_id": "4"},
    ])
    message = problems_of(DataConfig("videollava", questions=str(questions), answers=str(answers)))
    assert f"{questions} item 2: question_id '2' has no answer in {answers}" in message
    assert f"{answers} item 2: question_id '9' has no question in {questions}" in message
    assert f"{questions} item 4: duplicate id '3' (first at {questions} item 3)" in message
    assert f"{questions} item 5: missing question" in message
    assert "has 4 problem(s)" in message
    no_answers = tmp_path / "no.json"
    missing = problems_of(DataConfig("videollava", questions=str(questions), answers=str(no_answers)))
    assert f"{no_answers}: no such file" in missing
    # matched by id whatever the order; ActivityNet-QA's int type is the category; the video is looked up
    write_json(questions, [{"video_name": "a", "question": "q1", "question_id": "1"},
                           {"video_name": "b", "question": "q3", "question_id": "3"}])
    write_json(answers, [{"answer": "z", "question_id": 3, "type": 2}, {"answer": "x", "question_id": "1"}])
    (tmp_path / "v_a.mp4").touch()
    first, second = read_questions(DataConfig("videollava", questions=str(questions), answers=str(answers)))
    assert (first.answer, first.category, first.error) == ("x", None, None)
    assert first.video == str(tmp_path / "v_a.mp4")
    assert (second.answer, second.category, second.options) == ("z", "2", None)
    assert "not found" in second.error


def test_a_parquet_without_a_column_and_duplicate_ids_are_reported_at_once(tmp_path):
    record = {"videoID": "v", "question_id": "001-1", "question": "q", "answer": "A", "task_type": "OCR"}
    path = write_parquet(tmp_path / "videomme.parquet", [record, record | {"question": "again"}])
    message = problems_of(DataConfig("videomme", annotations=str(path)))
    columns = "answer, question, question_id, task_type, videoID"
    assert f"{path}: no column 'options' (columns: {columns})" in message
    assert f"{path} row 2: duplicate id '001-1' (first at {path} row 1)" in message
    assert message.startswith(f"videomme annotations {path} has 2 problem(s)")
    nested = write_json(tmp_path / "videomme.json", [{"videoID": "v", "questions": [  # the release's JSON
        {"question_id": "1", "question": "q", "options": ["A. a", "B. b"], "answer": "A"},
        {"question_id": "2", "options": ["A. a", "B. b"], "answer": "B"}]}])
    assert f"{nested} item 1 question 2: missing question" in problems_of(
        DataConfig("videomme", annotations=str(nested)))


def test_options_that_do_not_fit_are_reported_with_their_ids(tmp_path):
    options = ["A. one", "B. two", "C. three", "D. four"]
    mme = write_parquet(tmp_path / "mme.parquet", [
        {"videoID": "v", "question_id": "1", "question": "q", "options": options, "answer": "E"},
        {"videoID": "v", "question_id": "2", "question": "q", "options": options[:1], "answer": "A"},
        {"videoID": "v", "question_id": "3", "question": "q", "options": options, "answer": "C"},
    ])
    message = problems_of(DataConfig("videomme", annotations=str(mme)))
    assert f"{mme} row 1 (id '1'): answer 'E' is neither one of the letters A, B, C, D" in message
    assert f"{mme} row 2 (id '2'): options must be a list of 2 to 10 texts" in message
    assert "has 2 problem(s)" in message
    mvbench = write_json(tmp_path / "json" / "action_count.json", [
        {"video": "a.mp4", "question": "q", "candidates": ["1", "2"], "answer": "3"},
        {"video": "a.mp4", "candidates": ["1", "2"], "answer": "2"},
    ])
    message = problems_of(DataConfig("mvbench", annotations=str(mvbench.parent)))
    assert f"{mvbench} item 1 (id 'action_count-0'): answer '3' is neither" in message
    assert f"{mvbench} item 2: missing question" in message
    nextqa = tmp_path / "val.csv"
    nextqa.write_text("video,qid,question,answer,type,a0,a1,a2,a3,a4\n"
                      "7,0,why?,7,CW,a,b,c,d,e\n7,1,how?,1,CH,a,b,,d,e\n")
    message = problems_of(DataConfig("nextqa", annotations=str(nextqa)))
    assert f"{nextqa} line 2: answer='7' is neither an option index 0-4 nor a letter" in message
    assert f"{nextqa} line 3: missing a2" in message
    no_options = write_json(tmp_path / "ego.json", [{"question_idx": "0", "question": "q", "video_idx": "v"}])
    assert f"{no_options}: no record has the field 'option'" in problems_of(
        DataConfig("egoschema", annotations=str(no_options)))


def test_bad_files_stop_the_job_before_any_video_is_decoded(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be decoded")

    monkeypatch.setattr("pipelines.runner.DecodeStage", refuse)
    monkeypatch.setattr("stages.decode.read_frames", refuse)
    questions = write_json(tmp_path / "test_q.json",
                           [{"video_name": "a", "question": "q", "question_id": "1"}])
    out, answers = tmp_path / "out.jsonl", tmp_path / "test_a.json"
    with pytest.raises(ManifestError, match="test_a.json: no such file"):
        run(out, "data.format=videollava", f"data.questions={questions}", f"data.answers={answers}")
    assert not out.exists()


def test_egoschema_with_and_without_answers(tmp_path):
    option = [f"{letter}. text {letter}" for letter in "ABCDE"]
    full = write_parquet(tmp_path / "GENERATION" / "test.parquet", [
        {"question_idx": "0", "question": "q", "video_idx": "uid0", "option": option, "answer": None}])
    (q,) = read_questions(DataConfig("egoschema", annotations=str(full)))
    assert (q.id, q.answer, q.options[0], q.category) == ("0", None, "text A", None)
    assert q.video == str(tmp_path / "GENERATION" / "uid0") and "not found" in q.error
    subset = write_parquet(tmp_path / "Subset" / "test.parquet", [
        {"question_idx": "0", "question": "q", "video_idx": "uid0", "option": option, "answer": "3"}])
    assert read_questions(DataConfig("egoschema", annotations=str(subset)))[0].answer == "D"
    # the release: questions.json (q_uid names the question and its video), subset_answers.json apart
    texts = {f"option {i}": f"o{i}" for i in range(5)}
    release = write_json(tmp_path / "questions.json", [
        {"q_uid": "uid0", "google_drive_id": "x", "question": "q", **texts},
        {"q_uid": "uid1", "google_drive_id": "y", "question": "q", **texts},
    ])
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "uid0.mp4").touch()
    answers = write_json(tmp_path / "subset_answers.json", {"uid0": 4})
    first, second = read_questions(DataConfig("egoschema", annotations=str(release), answers=str(answers)))
    assert (first.id, first.answer, first.options, first.error) == ("uid0", "E", tuple(texts.values()), None)
    assert first.video == str(tmp_path / "videos" / "uid0.mp4")
    assert (second.id, second.answer) == ("uid1", None) and "not found" in second.error


def test_the_video_index_finds_one_file_by_name(tmp_path):
    for rel in ("a/x.mp4", "b/x.avi", "v_y.MP4", "z.webm", "frames/clip1/0001.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()
    index = VideoIndex(tmp_path)
    assert index.find("x.avi") == (str(tmp_path / "b/x.avi"), None)  # its extension decides
    assert index.find("a/x") == (str(tmp_path / "a/x.mp4"), None)  # its folder decides
    assert index.find("y", ("", "v_")) == (str(tmp_path / "v_y.MP4"), None)  # ActivityNet's v_, any case
    assert index.find("z")[1] is None and index.find("y")[1] is not None
    assert "ambiguous: 2 files" in index.find("x")[1] and "a/x.mp4, b/x.avi" in index.find("x")[1]
    assert "is a folder" in index.find("clip1")[1]  # MVBench's frame folders
    path, error = index.find("nope")
    assert path == str(tmp_path / "nope") and "not found" in error
    with pytest.raises(ManifestError, match="data.video_root .*/absent: no such folder"):
        read_questions(DataConfig("videomme", annotations=str(write_parquet(tmp_path / "m.parquet", [
            {"videoID": "v", "question_id": "1", "question": "q", "options": ["a", "b"], "answer": "A"}])),
            video_root=str(tmp_path / "absent")))


def test_mvbench_windows(tmp_path):
    for rel in ("video/star/Charades_v1_480/c.mp4", "video/star/Charades_segment/s.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()
    item = {"question": "q", "candidates": ["a", "b"], "answer": "b"}
    tasks = tmp_path / "json" / "action_sequence.json"
    write_json(tasks, [item | {"video": "c.mp4", "start": 1.5, "end": 4},
                       item | {"video": "s.mp4", "start": 1.5, "end": 4},  # lmms-eval's pre-cut clip
                       item | {"video": "c.mp4", "start": 4, "end": 2}])
    cut, precut, bad = read_questions(DataConfig("mvbench", annotations=str(tasks),
                                                 video_root=str(tmp_path / "video")))
    assert (cut.id, cut.start, cut.end, cut.answer, cut.category, cut.error) == (
        "action_sequence-0", 1.5, 4.0, "B", "action_sequence", None)
    assert (precut.start, precut.end, precut.error) == (None, None, None)
    assert "not 0 <= start < end" in bad.error  # that question's error, not the whole set's
