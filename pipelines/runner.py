"""Running a job's stages over its video items: in-process (`runner=local`) or with Ray Data.

Both runners drive the same stage classes (decode -> encode -> answer) over one row per video clip,
then explode each finished video row into one output row per question on the driver. With Ray, each
stage is an actor pool (`map_batches` with `ActorPoolStrategy`) and the dataset streams, so decoding,
encoding and answering of different videos overlap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.config import JobConfig, StageResources
from pipelines.manifest import Question, VideoItem
from stages.answer import CHOICE_PROMPT, AnswerStage, question_text
from stages.columns import is_missing
from stages.decode import DecodeStage
from stages.encode import EncodeStage
from stages.model import load_model


@dataclass
class StageSpec:
    name: str
    cls: type
    kwargs: dict[str, Any]
    resources: StageResources


def stage_specs(job: JobConfig) -> list[StageSpec]:
    """The three stages, each built from its typed config section."""
    r = job.resources
    return [
        StageSpec("decode", DecodeStage, {"config": job.decode}, r.decode),
        StageSpec("encode", EncodeStage, {"model": job.model, "compression": job.compression,
                                          "frame_batch_size": r.frame_batch_size}, r.encode),
        StageSpec("answer", AnswerStage, {"model": job.model, "config": job.pipeline}, r.answer),
    ]


def item_rows(items: list[VideoItem], choice_prompt: str = CHOICE_PROMPT) -> list[dict]:
    """One row per clip, carrying its question ids and the text each asks (decoded and encoded once for
    all of them; a multiple-choice question is asked with its lettered options)."""
    return [
        {
            "video": item.video,
            "start": item.start,
            "end": item.end,
            "ids": [q.id for q in item.questions],
            "questions": [None if q.question is None else question_text(q.question, q.options, choice_prompt)
                          for q in item.questions],
        }
        for item in items
    ]


def question_rows(video_row: dict, questions: dict[str, Question]) -> Iterator[dict]:
    """A finished video row -> one output row per question, with what the question (`questions` by id)
    says of itself: its text, answer, category and options."""
    n = len(video_row["ids"])
    error = video_row.get("error")
    per_answer = {key: _per_answer(video_row.get(key), n)
                  for key in ("predictions", "prompt_tokens", "generated_tokens", "prefill_seconds",
                              "llm_decode_seconds")}
    for i in range(n):
        prefill, decode = per_answer["prefill_seconds"][i], per_answer["llm_decode_seconds"][i]
        question = questions[str(video_row["ids"][i])]
        yield {
            **question_fields(question),
            "prediction": per_answer["predictions"][i],
            "visual_tokens_full": _count(video_row.get("visual_tokens_full")),
            "visual_tokens_kept": _count(video_row.get("visual_tokens_kept")),
            "decode_seconds": _plain(video_row.get("decode_seconds")),
            "encode_seconds": _plain(video_row.get("encode_seconds")),
            "answer_seconds": None if prefill is None else prefill + decode,
            "prompt_tokens": _count(per_answer["prompt_tokens"][i]),
            "generated_tokens": _count(per_answer["generated_tokens"][i]),
            "error": None if is_missing(error) else str(error),
        }


def question_fields(question: Question) -> dict:
    """The columns of an output row that come from the question itself (an error row has only these and
    its `error`)."""
    return {"id": question.id, "video": question.video, "question": question.question,
            "answer": question.answer, "category": question.category,
            "options": None if question.options is None else list(question.options), **question.extra}


def _per_answer(values: Any, n: int) -> list:
    if values is None:
        return [None] * n
    return [_plain(v) for v in values]


def _count(value: Any) -> int | None:
    """A token count; a column with nulls comes back from Arrow as floats."""
    value = _plain(value)
    return None if value is None else int(value)


def _plain(value: Any) -> Any:
    """Numpy scalars and Arrow nulls (NaN in float columns) -> JSON-ready Python values."""
    if isinstance(value, np.generic):
        value = value.item()
    return None if is_missing(value) else value


def batches_of(rows: list[dict], size: int) -> list[dict[str, list]]:
    """Rows -> column batches of at most `size` rows, the shape a stage takes."""
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    return [{key: [row[key] for row in chunk] for key in chunk[0]} for chunk in chunks]


def run_local(job: JobConfig, rows: list[dict], on_video: Callable[[dict], None]) -> None:
    """The stages in this process, one batch of videos after another; the model is loaded once and
    shared by encode and answer."""
    model, tokenizer = load_model(job.model)
    decode = DecodeStage(job.decode)
    encode = EncodeStage(model, compression=job.compression, frame_batch_size=job.resources.frame_batch_size)
    answer = AnswerStage(model, tokenizer, config=job.pipeline)
    for batch in batches_of(rows, job.resources.decode.batch_size):
        out = answer(encode(decode(batch)))
        for i in range(len(out["video"])):
            on_video({key: values[i] for key, values in out.items()})


def run_ray(job: JobConfig, rows: list[dict], on_video: Callable[[dict], None]) -> None:
    """The stages as Ray Data actor pools over a streaming dataset (Ray must be initialised)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = False  # the driver shows its own progress
    has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
    blocks = max(1, math.ceil(len(rows) / job.resources.decode.batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    for spec in stage_specs(job):
        res = spec.resources
        num_gpus = res.num_gpus if res.num_gpus is not None else (1 if has_gpus else 0)
        ds = ds.map_batches(
            spec.cls,
            fn_constructor_kwargs=spec.kwargs,
            batch_size=res.batch_size,
            compute=ActorPoolStrategy(size=res.pool_size),
            num_cpus=res.num_cpus,
            num_gpus=num_gpus,
        )
    for video_row in ds.iter_rows():
        on_video(video_row)
