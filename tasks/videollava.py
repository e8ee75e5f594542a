"""Video-LLaVA's open-ended zero-shot QA sets: MSVD-QA, MSRVTT-QA, TGIF-QA and ActivityNet-QA, in the
files Video-LLaVA's `TRAIN_AND_VALIDATE.md` points to (`eval/GPT_Zero_Shot_QA/<Set>_Zero_Shot_QA/`).

Read: `data.questions` (test_q.json: `video_name`, `question`, `question_id`) and `data.answers`
(test_a.json: `question_id`, `answer`, and in ActivityNet-QA `type`, the category, kept as shipped: 0
motion, 1 spatial and 2 temporal relationship, then by answer 3 yes/no, 4 color, 5 object, 6 location, 7
number, 8 other). Answers are matched by `question_id` (Video-LLaVA's own script pairs them by position).
Videos: `<video_name>` or ActivityNet's `v_<video_name>` (ActivityNet-QA names the video without the `v_`
its question ids and files carry), any video extension (TGIF-QA's GIFs too).

Asked as Video-LLaVA's `run_inference_video_qa.py` asks it: the question as it is, in the `llava_v1`
conversation with its system line; judged by an LLM with Video-LLaVA's `eval_video_qa.py` instructions
(`pipelines.score`, metric `judge`): no choice extraction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.manifest import Question
from stages.prompts import CHOICE_PROMPT
from tasks.tables import (
    Entry,
    absent_fields,
    as_path,
    field_text,
    load_table,
    make_questions,
    missing,
    raise_problems,
    require,
    video_root,
)
from tasks.task import Published, Task

if TYPE_CHECKING:
    from pipelines.datasets import DataConfig


def read(data: DataConfig) -> list[Question]:
    """Video-LLaVA's zero-shot QA files (MSVD, MSRVTT, TGIF, ActivityNet): see the module doc."""
    qpath, apath = as_path(data.questions), as_path(data.answers)
    label = f"videollava questions {qpath} and answers {apath}"
    problems: list[str] = []
    questions, answers = load_table(qpath, problems), load_table(apath, problems)
    if questions is None or answers is None:
        raise_problems(label, problems)
    q_absent = absent_fields(questions, ("question_id", "video_name", "question"), problems)
    a_absent = absent_fields(answers, ("question_id", "answer"), problems)
    by_id: dict[str, tuple[str, dict]] = {}
    for where, record in answers.rows:
        qid = field_text(record.get("question_id"))
        if qid is None:
            missing(problems, answers, where, "question_id", a_absent)
        elif qid in by_id:
            problems.append(f"{apath} {where}: duplicate question_id {qid!r} (first at {by_id[qid][0]})")
        else:
            by_id[qid] = (where, record)
    matching = not {"question_id"} & (q_absent | a_absent)
    entries, seen = [], set()
    for where, record in questions.rows:
        qid = field_text(record.get("question_id"))
        entry = Entry(f"{qpath} {where}", qid, field_text(record.get("video_name")),
                      field_text(record.get("question")))
        require(problems, questions, where, entry, ("video_name", "question"), q_absent, "question_id")
        if qid is not None and qid not in seen and matching:
            found = by_id.pop(qid, None)
            if found is None:
                problems.append(f"{qpath} {where}: question_id {qid!r} has no answer in {apath}")
            else:
                answer_where, answer = found
                entry.answer = field_text(answer.get("answer"))
                entry.category = field_text(answer.get("type"))
                if entry.answer is None and "answer" not in a_absent:
                    problems.append(f"{apath} {answer_where}: question_id {qid!r}: missing answer")
        seen.add(qid)
        entries.append(entry)
    if matching:
        problems += [f"{apath} {where}: question_id {qid!r} has no question in {qpath}"
                     for qid, (where, _) in by_id.items()]
    return make_questions(label, entries, problems, video_root(data, qpath.parent), prefixes=("", "v_"))


# videollava/conversation.py `conv_llava_v1` (PKU-YuanGroup/Video-LLaVA at
# 984e65bf8e8fd97072258547c4c8061fdd2416b7): the system line, then "USER: ... ASSISTANT:" joined by " "
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the human's questions.")
PROMPT = SYSTEM + " USER: <video>\n{question} ASSISTANT:"
PAPER = "Video-LLaVA paper (arXiv 2311.10122) Table 3, zero-shot video QA, GPT-3.5 judge"
TASK = Task(
    name="videollava", read=read, prompt=PROMPT, choice_prompt=CHOICE_PROMPT, rule=None, metric="judge",
    published=tuple(Published(value, metric, qa_set, PAPER) for qa_set, accuracy, score in (
        ("MSVD-QA", 70.7, 3.9), ("MSRVTT-QA", 59.2, 3.5), ("TGIF-QA", 70.0, 4.0),
        ("ActivityNet-QA", 45.3, 3.3)) for value, metric in ((accuracy, "judge accuracy %"),
                                                              (score, "judge score 0-5"))),
)
