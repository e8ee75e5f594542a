"""EgoSchema (Mangalam et al., NeurIPS 2023): 5,031 five-option questions on 3-minute egocentric clips;
answers public for a 500-question subset only, the rest scored by the authors' server.

Read: lmms-lab/egoschema's Parquet (`question_idx` the id, `video_idx`, `question`, `option`: five "A. ..."
texts, `answer`: the index, None in the full set), or the release's questions.json (egoschema/EgoSchema:
`q_uid` id and video, `option 0`..`option 4`) with its answers from `answer` or from `data.answers`
(subset_answers.json: {q_uid: index}). No category.

The authors' evaluation is their server (`validate.py`), which reads {q_uid: option index} and no text;
the reference for a generative model is lmms-eval's `egoschema` tasks at
75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3: the question, the five options and "Answer with the option's
letter from the given choices directly.", extracted by its own `parse_multi_choice_response`
(`tasks.choice.extract_lmms_eval_egoschema`). `results` writes the server's JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pipelines.manifest import Question
from stages.prompts import CHOICE_PROMPT, PROMPT
from tasks.choice import LETTERS
from tasks.tables import (
    Entry,
    absent_fields,
    as_path,
    field_text,
    make_questions,
    option_fields,
    option_letter,
    require,
    required_table,
    strip_letters,
    video_root,
)
from tasks.task import Task

if TYPE_CHECKING:
    from pipelines.datasets import DataConfig


def read(data: DataConfig) -> list[Question]:
    """EgoSchema (see the module doc): lmms-lab's records or the release's questions.json."""
    path = as_path(data.annotations)
    label = f"egoschema annotations {path}"
    problems: list[str] = []
    table = required_table(path, label, problems)
    columns = table.columns if table.columns is not None else {k for _, r in table.rows for k in r}
    release = "q_uid" in columns  # the release's questions.json
    options = tuple(f"option {i}" for i in range(5)) if release else ("option",)
    id_field, video_field = ("q_uid", "q_uid") if release else ("question_idx", "video_idx")
    required = tuple(dict.fromkeys((id_field, video_field, "question", *options)))
    absent = absent_fields(table, required, problems)
    answers = _subset_answers(data.answers, problems) if data.answers else {}
    entries = []
    for where, record in table.rows:
        qid = field_text(record.get(id_field))
        texts = (option_fields(problems, table, where, record, options, absent) if release
                 else record.get("option"))
        entry = Entry(f"{path} {where}", qid, field_text(record.get(video_field)),
                      field_text(record.get("question")), None, strip_letters(texts))
        fields = ("question",) if release else (video_field, "question", "option")
        require(problems, table, where, entry, fields, absent, id_field)
        answer = record.get("answer")
        answer = answer if field_text(answer) is not None else answers.get(qid or "")
        entry.answer = option_letter(answer, 5, problems, entry.where, "answer")
        entries.append(entry)
    return make_questions(label, entries, problems, video_root(data, path.parent))


def _subset_answers(path: str, problems: list[str]) -> dict[str, object]:
    """The release's subset_answers.json: {q_uid: index}."""
    file = as_path(path)
    try:
        answers = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        problems.append(f"{file}: cannot be read ({type(err).__name__}: {err})")
        return {}
    if not isinstance(answers, dict):
        problems.append(f"{file}: a JSON object {{q_uid: answer index}} is expected")
        return {}
    return {str(k): v for k, v in answers.items()}


def results(rows: Iterable[dict]) -> dict[str, int]:
    """The authors' server's submission ({q_uid: option index 0-4}, `validate.py`; lmms-eval writes the
    same): each row's extracted `choice` as an index, -1 where nothing was chosen or the row is an error
    (the server counts those as invalid, as lmms-eval's -1)."""
    return {str(row["id"]): LETTERS.index(row["choice"]) if row.get("choice") and not row.get("error") else -1
            for row in rows}


TASK = Task(name="egoschema", read=read, prompt=PROMPT, choice_prompt=CHOICE_PROMPT,
            rule="lmms_eval_egoschema", metric="choice", results=results,
            unpublished="none published: Video-LLaVA's paper and EgoSchema's authors report no Video-LLaVA "
                        "number")
