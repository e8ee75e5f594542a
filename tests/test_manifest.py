import json
from pathlib import Path

import pytest

from pipelines.manifest import ManifestError, group_by_video, read_manifest


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_rows_resolve_relative_paths_and_group_by_clip(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "video": "v1.mp4", "question": "q1", "answer": "yes"},
        {"id": "b", "video": "/abs/v2.mp4", "question": "q2"},
        {"id": "c", "video": "v1.mp4", "question": "q3"},
        {"id": "d", "video": "v1.mp4", "question": "q4", "start": 1, "end": 2.5},
    ])
    questions = read_manifest(manifest, video_root=tmp_path / "videos")
    assert [q.id for q in questions] == ["a", "b", "c", "d"]
    assert questions[0].video == str(tmp_path / "videos" / "v1.mp4")
    assert questions[0].answer == "yes" and questions[1].answer is None
    assert questions[1].video == "/abs/v2.mp4"
    assert (questions[3].start, questions[3].end) == (1.0, 2.5)
    items = group_by_video(questions)
    assert [[q.id for q in item.questions] for item in items] == [["a", "c"], ["b"], ["d"]]


def test_video_root_defaults_to_the_manifest_folder(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": 1, "video": "x.mp4", "question": "q"}])
    (q,) = read_manifest(manifest)
    assert q.video == str(tmp_path / "x.mp4") and q.id == "1"


def test_csv_manifest(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,video,question,answer,start,end\nx,v.mp4,what?,red,,\ny,v.mp4,why?,,0.5,3\n")
    x, y = read_manifest(manifest)
    assert (x.id, x.question, x.answer, x.start, x.end) == ("x", "what?", "red", None, None)
    assert (y.answer, y.start, y.end) == (None, 0.5, 3.0)


def test_every_problem_is_reported_with_its_line_number(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "video": "v.mp4", "question": "q"},
        {"id": "a", "video": "v.mp4", "question": "q"},
        "{not json",
        {"id": "c", "question": "q"},
        {"id": "d", "video": "v.mp4", "question": "q", "start": "soon"},
        {"id": "e", "video": "v.mp4", "question": "q", "start": 3, "end": 1},
        {"id": "f", "video": "v.mp4"},
        {"id": "g", "video": "v.mp4", "question": "q", "prediction": "red"},
        [1, 2],
    ])
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest)
    message = str(err.value)
    assert "8 problem(s)" in message
    for expected in [
        "m.jsonl:2: duplicate id 'a' (first on line 1)",
        "m.jsonl:3: not valid JSON",
        "m.jsonl:4: missing video",
        "m.jsonl:5: start='soon' is not a number of seconds",
        "m.jsonl:6: end=1.0 is not after start=3.0",
        "m.jsonl:7: missing question",
        "m.jsonl:8: column(s) prediction are the job's own output columns",
        "m.jsonl:9: a JSON object is expected",
    ]:
        assert expected in message


def test_captioning_needs_no_question(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "video": "v.mp4"}])
    (q,) = read_manifest(manifest, require_question=False)
    assert q.question is None


def test_missing_and_empty_manifests(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        read_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(tmp_path / "empty.jsonl")
    (tmp_path / "bad.csv").write_text("id,video,question\na,v.mp4,q,extra\n")
    with pytest.raises(ManifestError, match=r"bad.csv:2: 1 more field\(s\) than the header"):
        read_manifest(tmp_path / "bad.csv")


def test_multiple_choice_rows_carry_options_category_and_the_answer_letter(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "video": "v.mp4", "question": "Which way?", "options": ["left", "right"], "answer": "b",
         "category": "direction"},
        {"id": "b", "video": "v.mp4", "question": "Which colour?", "options": ["red", " blue "],
         "answer": "blue"},
        {"id": "c", "video": "v.mp4", "question": "How many?", "category": "count", "answer": "two"},
    ])  # fmt: skip
    a, b, c = read_manifest(manifest)
    assert (a.options, a.answer, a.category) == (("left", "right"), "B", "direction")
    assert (b.options, b.answer, b.category) == (("red", "blue"), "B", None)  # an option's text -> its letter
    assert (c.options, c.answer, c.category) == (None, "two", "count")
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "x", "video": "v.mp4", "question": "q", "options": ["only one"]},
        {"id": "y", "video": "v.mp4", "question": "q", "options": ["a", "b"], "answer": "C"},
        {"id": "z", "video": "v.mp4", "question": "q", "options": "a|b"},
    ])  # fmt: skip
    with pytest.raises(ManifestError) as err:
        read_manifest(bad)
    assert str(err.value).splitlines()[1:] == [
        f"  {bad}:1: options must be a list of 2 to 10 texts, got ['only one']",
        f"  {bad}:2: answer 'C' is neither one of the letters A, B nor an option's text",
        f"  {bad}:3: options must be a list of 2 to 10 texts, got 'a|b'",
    ]


def test_the_users_own_columns_pass_through(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "video": "v.mp4", "question": "q", "source": "shot 3", "difficulty": 2}])
    (q,) = read_manifest(manifest)
    assert q.extra == {"source": "shot 3", "difficulty": 2}


def test_an_empty_csv_cell_of_the_users_own_column_passes_through_as_null(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,video,question,source\na,v.mp4,q,shot 3\nb,v.mp4,q,\n")
    a, b = read_manifest(manifest)
    assert (a.extra, b.extra) == ({"source": "shot 3"}, {"source": None})
