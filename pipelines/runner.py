"""Running a job's stages over its video items: in-process (`runner=local`) or with Ray Data.

Both runners drive the same stage classes (decode -> encode -> answer) over one row per video clip,
then explode each finished video row into one output row per question on the driver. With Ray, each
stage is an actor pool (`map_batches` with `ActorPoolStrategy`) and the dataset streams, so decoding,
encoding and answering of different videos overlap.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipelines.config import JobConfig, StageResources
from pipelines.manifest import Question, VideoItem
from stages.answer import CHOICE_PROMPT, AnswerStage, question_text
from stages.columns import is_missing
from stages.decode import DecodeStage
from stages.encode import EncodeStage
from stages.model import ModelConfig, half_parameters, load_model, read_model_config

log = logging.getLogger(__name__)


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


def item_rows(items: list[VideoItem], choice_prompt: str = CHOICE_PROMPT,
              history: dict[str, dict[int, tuple[str, str | None]]] | None = None) -> list[dict]:
    """One row per clip, carrying its question ids and the text each asks (decoded and encoded once for
    all of them; a multiple-choice question is asked with its lettered options).

    When any question belongs to a conversation, every row also carries `conversations` and `turns` (per
    question: its conversation's id and turn, "" and 0 for none) and `history`: JSON of the turns of its
    conversations answered before this run ({conversation: {turn: [question as asked, answer]}}, from
    `history`, see `conversation_history`), which the answer stage puts in the prompts of the later turns.
    """
    rows = [
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
    if any(q.conversation is not None for item in items for q in item.questions):
        history = history or {}
        for row, item in zip(rows, items, strict=True):
            names = [q.conversation or "" for q in item.questions]
            row["conversations"] = names
            row["turns"] = [q.turn or 0 for q in item.questions]
            row["history"] = json.dumps({name: {str(turn): list(pair) for turn, pair in history[name].items()}
                                         for name in sorted(set(names)) if name and history.get(name)})
    return rows


def conversation_history(questions: list[Question], rows: list[dict], choice_prompt: str = CHOICE_PROMPT
                         ) -> dict[str, dict[int, tuple[str, str | None]]]:
    """The turns of each conversation that the output already holds (`rows`, matched by id):
    {conversation: {turn: (question as asked, its prediction; None for an error row)}}."""
    done = {str(row["id"]): row for row in rows}
    history: dict[str, dict[int, tuple[str, str | None]]] = {}
    for q in questions:
        if q.conversation is not None and q.id in done and q.question is not None:
            prediction = done[q.id].get("prediction")
            answer = None if done[q.id].get("error") or prediction is None else str(prediction)
            asked = question_text(q.question, q.options, choice_prompt)
            history.setdefault(q.conversation, {})[q.turn] = (asked, answer)
    return history


def unanswerable_turns(pending: list[Question], history: dict[str, dict[int, tuple[str, str | None]]]
                       ) -> list[Question]:
    """`pending` with an `error` on each turn that follows a recorded turn without an answer (an error row
    kept by `output.retry_errors=false`): its prompt would need that answer."""
    out = []
    for q in pending:
        missing = [turn for turn, (_, answer) in sorted(history.get(q.conversation or "", {}).items())
                   if turn < (q.turn or 0) and answer is None]
        if missing and q.error is None:
            q = replace(q, error=f"conversation {q.conversation!r}: turn {missing[0]} is an error row, and "
                                 f"turn {q.turn} needs its answer (rerun with output.retry_errors=true)")
        out.append(q)
    return out


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
    turn = ({} if question.conversation is None
            else {"conversation": question.conversation, "turn": question.turn})
    return {"id": question.id, "video": question.video, "question": question.question,
            "answer": question.answer, "category": question.category,
            "options": None if question.options is None else list(question.options), **turn, **question.extra}


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
    stages = [("decode", DecodeStage(job.decode)),
              ("encode", EncodeStage(model, compression=job.compression,
                                     frame_batch_size=job.resources.frame_batch_size)),
              ("answer", AnswerStage(model, tokenizer, config=job.pipeline))]
    for batch in batches_of(rows, job.resources.decode.batch_size):
        for name, stage in stages:
            batch = timed_call(stage, name, batch)
        for i in range(len(batch["video"])):
            on_video({key: values[i] for key, values in batch.items()})


def run_ray(job: JobConfig, rows: list[dict], on_video: Callable[[dict], None]) -> None:
    """The stages as Ray Data actor pools over a streaming dataset (Ray must be initialised), placed as
    `placement` says for this cluster."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = False  # the driver shows its own progress
    cluster = ray.cluster_resources()
    placed = placement(job, gpus=int(cluster.get("GPU", 0)), cpus=cluster.get("CPU", 1.0))
    log.info("placement: %s", ", ".join(f"{name} {r.pool_size} x (cpu {r.num_cpus:g}, gpu {r.num_gpus:g})"
                                        for name, r in placed.items()))
    blocks = max(1, math.ceil(len(rows) / job.resources.decode.batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    for spec in stage_specs(job):
        res = placed[spec.name]
        ds = ds.map_batches(
            timed(spec.cls, spec.name),
            fn_constructor_kwargs=spec.kwargs,
            batch_size=res.batch_size,
            compute=ActorPoolStrategy(size=res.pool_size),
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
        )
    for video_row in ds.iter_rows():
        on_video(video_row)


def placement(job: JobConfig, gpus: int, cpus: float) -> dict[str, StageResources]:
    """Each stage's actors and their resources on a cluster of `gpus` GPUs and `cpus` CPUs; what the config
    sets is kept, `num_gpus: null` and `pool_size: null` are resolved here:

    - no GPU: nothing asks for one; one encode and one answer actor.
    - GPUs: encode and answer share a GPU, each asking the fraction of it that its half of the model takes
      (`gpu_shares`: for the 7B, encode 0.1 and answer 0.9), so both run at once on a one-GPU box instead
      of one after the other; one encode actor, and one answer actor per GPU (the LLM is where time goes;
      with `engine=vllm`, `pipeline.vllm.actors_per_gpu` of them, splitting answer's share).
    - decode: as many actors as the CPUs left over allow (at least 1, at most 8).
    """
    r = job.resources
    shares = gpu_shares(job.model) if gpus else {"encode": 0.0, "answer": 0.0}
    per_gpu = job.pipeline.vllm.actors_per_gpu if job.pipeline.engine == "vllm" else 1
    shares["answer"] = round(shares["answer"] / per_gpu, 4)
    placed = {}
    for name in ("encode", "answer"):
        res: StageResources = getattr(r, name)
        auto_pool = max(1, gpus) * per_gpu if name == "answer" else 1
        placed[name] = replace(res, num_gpus=shares[name] if res.num_gpus is None else res.num_gpus,
                               pool_size=res.pool_size or auto_pool)
    spare = cpus - sum(p.num_cpus * p.pool_size for p in placed.values())
    auto_decode = int(min(8, max(1, spare // max(r.decode.num_cpus, 0.01))))
    decode = replace(r.decode, num_gpus=r.decode.num_gpus or 0.0, pool_size=r.decode.pool_size or auto_decode)
    return {"decode": decode, **placed}


def gpu_shares(model: ModelConfig) -> dict[str, float]:
    """The fractions of one GPU the encode and answer actors ask for: each half's share of the model's
    parameters (counted from its config, nothing loaded), encode's rounded up to a twentieth and kept
    within [0.1, 0.5], answer the rest."""
    halves = half_parameters(read_model_config(model.path))
    share = halves["vision"] / (halves["vision"] + halves["language"])
    encode = min(0.5, max(0.1, math.ceil(share * 20) / 20))
    return {"encode": encode, "answer": round(1.0 - encode, 2)}


def timed(cls: type, name: str) -> type:
    """`cls` whose calls also record when each batch ran (`timed_call`), under the same class name, so
    Ray's actors keep theirs."""

    def __call__(self, batch: dict) -> dict:  # noqa: N807 - the stage's own call, timed
        return timed_call(super(subclass, self).__call__, name, batch)

    subclass = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return subclass


def timed_call(stage: Callable[[dict], dict], name: str, batch: dict) -> dict:
    """`stage(batch)` with column `<name>_interval`: [start, end] wall-clock seconds of the whole batch,
    on every row (the job's timeline)."""
    start = time.time()
    out = stage(batch)
    interval = np.array([start, time.time()])
    return {**out, f"{name}_interval": [interval] * len(out["video"])}
