"""MVBench (Li et al., CVPR 2024): 20 temporal tasks, 200 questions each, 2 to 5 candidates.

Read: the task files (`json/<task>.json`, or their folder: every task; HF's Parquet shards too): `video`,
`question`, `candidates`, `answer` (the correct candidate's text), `start`/`end` (seconds, some tasks).
Category: the record's `task_type` if any, else the task file's name. MVBench has no ids: id
`<file stem>-<index>`.

Asked as the authors' evaluation asks it (OpenGVLab/Ask-Anything video_chat2/mvbench.ipynb at
4dd8210b030374bb0c510a57dfbe916f70d3ef71, `infer_mvbench` with `system_llm=True`): the system prompt, then
"Question: ...", "Options:" with "(A) text" lines and "Only give the best option.", all in the user turn;
the assistant's turn starts with the answer prompt "Best option:(", so the model writes the letter next.
Extracted by the notebook's `check_ans` (`tasks.choice.extract_mvbench`), every question counted.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.manifest import Question
from tasks.tables import (
    Entry,
    absent_fields,
    as_path,
    field_text,
    load_table,
    make_questions,
    require,
    video_root,
)
from tasks.task import Task

if TYPE_CHECKING:
    from pipelines.datasets import DataConfig


def read(data: DataConfig) -> list[Question]:
    """MVBench's task files (see the module doc). `start`/`end` (seconds) set the clip's window; a window
    that is not a pair of numbers with end > start is that question's error. lmms-eval's copy of the
    videos has the windowed tasks already cut (folders named `*_segment`): for a video found in such a
    folder the window is not applied again."""
    path = as_path(data.annotations)
    label = f"mvbench annotations {path}"
    problems: list[str] = []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl", ".parquet"))
        if not files:
            problems.append(f"{path}: no .json, .jsonl or .parquet task file in the folder")
        default_root = path.parent
    else:
        files, default_root = [path], path.parent
    entries = []
    for file in files:
        table = load_table(file, problems)
        if table is None:
            continue
        absent = absent_fields(table, ("video", "question", "candidates", "answer"), problems)
        # HF's Parquet shards (action_antonym/train-00000-of-00001.parquet) are named by their folder
        stem = file.parent.name if file.stem.startswith(("train-", "test-")) else file.stem
        for index, (where, record) in enumerate(table.rows):
            entry = Entry(f"{file} {where}", f"{stem}-{index}", field_text(record.get("video")),
                           field_text(record.get("question")), field_text(record.get("answer")),
                           record.get("candidates"), field_text(record.get("task_type")) or stem)
            require(problems, table, where, entry, ("video", "question", "candidates", "answer"), absent)
            if record.get("start") is not None or record.get("end") is not None:
                entry.start, entry.end, entry.error = _window(record.get("start"), record.get("end"))
            entries.append(entry)
    questions = make_questions(label, entries, problems, video_root(data, default_root))
    return [replace(q, start=None, end=None) if q.start is not None and _precut(q.video) else q
            for q in questions]


def _window(start: object, end: object) -> tuple[float | None, float | None, str | None]:
    """MVBench's clip window in seconds, or why it cannot be used (the question's error)."""
    try:
        begin, stop = float(start), float(end)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, None, f"window start={start!r}, end={end!r} is not a pair of numbers of seconds"
    if not (math.isfinite(begin) and math.isfinite(stop)) or begin < 0 or stop <= begin:
        return None, None, f"window start={start!r}, end={end!r} is not 0 <= start < end"
    return begin, stop, None


def _precut(video: str) -> bool:
    """lmms-eval's MVBench videos: the windowed tasks' clips already cut, in `*_segment` folders."""
    return Path(video).parent.name.endswith("_segment")


SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
          "movement of objects, and the action and pose of persons. Based on your observations, select the "
          "best option that accurately addresses the question.\n")
PROMPT = "USER: <video>\n{question} ASSISTANT: Best option:("  # the notebook's answer_prompt after the role
CHOICE_PROMPT = SYSTEM + "Question: {question}\nOptions:\n{options}\nOnly give the best option."
TASK = Task(name="mvbench", read=read, prompt=PROMPT, choice_prompt=CHOICE_PROMPT, rule="mvbench",
            metric="choice",
            unpublished="none published: the MVBench paper's table does not list Video-LLaVA, and "
                        "Video-LLaVA's paper does not report MVBench")
