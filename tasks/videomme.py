"""Video-MME (Fu et al., 2024): 900 videos, 2,700 four-option questions, short/medium/long videos.

Read: lmms-lab/Video-MME's Parquet, or the same records as JSON/JSONL, flat or nested one record per video
with its `questions` (the layout of the official results template `output_test_template.json`, whose
not-quite-JSON trailing commas are accepted): `question_id`, `question`, `options` ("A. ..." texts, the
prefix dropped), `answer` (a letter), `task_type` (the category); the video is `videoID` (the Parquet's
YouTube id), else `video_id` (the template's number). `video_id`, `duration`, `domain` and `sub_category`
are passed on to the output rows. Video `{videoID}.*`.

Asked as the authors' README asks it (the subtitle-free setting); extracted by the authors' own script
(`tasks.choice.extract_videomme`); `results` writes the results file their script and leaderboard read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.manifest import Question
from stages.prompts import PROMPT
from tasks.choice import LETTERS
from tasks.tables import (
    Entry,
    Table,
    absent_fields,
    as_path,
    field_text,
    make_questions,
    require,
    required_table,
    strip_letters,
    video_root,
)
from tasks.task import Published, Task

if TYPE_CHECKING:
    from pipelines.datasets import DataConfig

EXTRA = ("video_id", "duration", "domain", "sub_category")  # passed on to the output rows


def read(data: DataConfig) -> list[Question]:
    """Video-MME's annotation (see the module doc).

    The category is `task_type` (12 kinds: temporal perception, counting, OCR, ...), not `duration`
    (short, medium, long): `category` is the question's type in every set here (ActivityNet-QA's type,
    NExT-QA's type, MVBench's task), and the duration is the video's, not the question's. The duration
    (with `domain` and `sub_category`) is passed on to the output rows as a column of its own, for
    scores by duration.
    """
    path = as_path(data.annotations)
    label = f"videomme annotations {path}"
    problems: list[str] = []
    table = required_table(path, label, problems)
    if table.columns is None and any(isinstance(r.get("questions"), list) for _, r in table.rows):
        # the release's nested JSON: one record per video, its questions in `questions`
        rows = [(f"{where} question {n}", {**{k: v for k, v in video.items() if k != "questions"}, **q})
                for where, video in table.rows for n, q in enumerate(video.get("questions") or [], start=1)]
        table = Table(path, rows, None)
    columns = table.columns if table.columns is not None else {k for _, r in table.rows for k in r}
    video_field = "videoID" if "videoID" in columns or "video_id" not in columns else "video_id"
    absent = absent_fields(table, ("question_id", video_field, "question", "options", "answer"), problems)
    entries = []
    for where, record in table.rows:
        entry = Entry(f"{path} {where}", field_text(record.get("question_id")),
                      field_text(record.get(video_field)), field_text(record.get("question")),
                      field_text(record.get("answer")), strip_letters(record.get("options")),
                      field_text(record.get("task_type")))
        require(problems, table, where, entry, (video_field, "question", "options", "answer"), absent,
                "question_id")
        entry.extra = {key: record[key] for key in EXTRA if field_text(record.get(key)) is not None}
        entries.append(entry)
    return make_questions(label, entries, problems, video_root(data, path.parent))


def results(rows: Iterable[dict]) -> list[dict]:
    """The job's rows as Video-MME's results file (`evaluation/output_test_template.json`, which the
    authors' `eval_your_results.py` and leaderboard read): one record per video (`video_id`, `duration`,
    `domain`, `sub_category`, `questions`), each question with `question_id`, `task_type`, `question`,
    `options` ("A. text"), `answer` and `response`: the reply as the model gave it, or "" for an error
    row (the script extracts the letter from `response` itself)."""
    videos: dict[str, dict] = {}
    for row in rows:
        video_id = str(row.get("video_id") or Path(str(row["video"])).stem)
        video = videos.setdefault(video_id, {"video_id": video_id, "duration": row.get("duration"),
                                             "domain": row.get("domain"),
                                             "sub_category": row.get("sub_category"), "questions": []})
        options = [f"{letter}. {text}" for letter, text in zip(LETTERS, row["options"] or [], strict=False)]
        response = "" if row.get("error") else (row.get("prediction") or "")
        video["questions"].append({"question_id": row["id"], "task_type": row.get("category"),
                                   "question": row["question"], "options": options,
                                   "answer": row.get("answer"), "response": response})
    return list(videos.values())


# The authors' prompt (Video-MME README, "Prompt", subtitle-free): the instruction, the question with its
# options, then "The best answer is:".
CHOICE_PROMPT = ("Select the best answer to the following multiple-choice question based on the video. "
                 "Respond with only the letter (A, B, C, or D) of the correct option.\n"
                 "{question}\n{options}\nThe best answer is:")
PAPER = "Video-MME paper (arXiv 2405.21075) Table 2 / leaderboard, Video-LLaVA 7B, 8 frames"
TASK = Task(
    name="videomme", read=read, prompt=PROMPT, choice_prompt=CHOICE_PROMPT, rule="videomme", metric="choice",
    results=results,
    published=(Published(39.9, "accuracy %", "all durations, w/o subtitles", PAPER),
               Published(45.3, "accuracy %", "short, w/o subtitles", PAPER),
               Published(38.0, "accuracy %", "medium, w/o subtitles", PAPER),
               Published(36.2, "accuracy %", "long, w/o subtitles", PAPER),
               Published(41.6, "accuracy %", "all durations, with subtitles", PAPER)),
)
