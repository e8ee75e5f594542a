"""NExT-QA multiple choice (Xiao et al., CVPR 2021): 5 options per question, causal/temporal/descriptive.

Read: the release's val.csv/test.csv (doc-doc/NExT-QA `dataset/nextqa/`) or lmms-lab/NExTQA's MC Parquet:
`video`, `qid`, `question`, `a0`..`a4`, `answer` (the option's index), `type` (the category: CW, CH, TN,
TC, DC, DL, DO, and TP in some releases). Id `<video>_<qid>`, as NExT-QA names its questions.

The authors' `eval_mc.py` scores classifier indices and reads no text, so the reference for a generative
model is lmms-eval's `nextqa_mc_test` at 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3: the question then the
options with no instruction (its task sets no pre- or post-prompt) and `parse_multi_choice_response`
(`tasks.choice.extract_lmms_eval_nextqa`), accuracy over every question.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.manifest import Question
from stages.prompts import PROMPT
from tasks.tables import (
    Entry,
    absent_fields,
    as_path,
    field_text,
    make_questions,
    missing,
    option_fields,
    option_letter,
    require,
    required_table,
    video_root,
)
from tasks.task import Task

if TYPE_CHECKING:
    from pipelines.datasets import DataConfig


def read(data: DataConfig) -> list[Question]:
    """NExT-QA's multiple-choice questions (see the module doc)."""
    path = as_path(data.annotations)
    label = f"nextqa annotations {path}"
    problems: list[str] = []
    table = required_table(path, label, problems)
    options = tuple(f"a{i}" for i in range(5))
    absent = absent_fields(table, ("video", "qid", "question", "answer", *options), problems)
    entries = []
    for where, record in table.rows:
        video, qid = field_text(record.get("video")), field_text(record.get("qid"))
        entry = Entry(f"{path} {where}", None if video is None or qid is None else f"{video}_{qid}", video,
                      field_text(record.get("question")), None,
                      option_fields(problems, table, where, record, options, absent),
                      field_text(record.get("type")))
        entry.answer = option_letter(record.get("answer"), 5, problems, entry.where, "answer")
        require(problems, table, where, entry, ("video", "question"), absent)
        for key, value in (("qid", qid), ("answer", field_text(record.get("answer")))):
            if value is None:
                missing(problems, table, where, key, absent)
        entries.append(entry)
    return make_questions(label, entries, problems, video_root(data, path.parent))


TASK = Task(name="nextqa", read=read, prompt=PROMPT, choice_prompt="{question}\n{options}",
            rule="lmms_eval_nextqa", metric="choice",
            unpublished="none published: neither Video-LLaVA's paper nor NExT-QA's authors report "
                        "Video-LLaVA")
