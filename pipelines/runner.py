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
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipelines.config import ConfigError, JobConfig, StageResources, check
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
        StageSpec("answer", AnswerStage, {"model": job.model, "config": job.pipeline,
                                          "custom_positions": job.compression.positions == "original"},
                  r.answer),
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


NODE_COLUMNS = ("decode_node", "encode_node", "answer_node")  # with Ray: the node that ran each stage


def question_rows(video_row: dict, questions: dict[str, Question]) -> Iterator[dict]:
    """A finished video row -> one output row per question, with what the question (`questions` by id)
    says of itself: its text, answer, category and options; with Ray, the nodes of its stages
    (`NODE_COLUMNS`)."""
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
            **{column: video_row[column] for column in NODE_COLUMNS if not is_missing(video_row.get(column))},
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
    shared by encode and answer (each load announced, then timed, on the console)."""
    log.info("loading %s (both halves: encode and answer share it in this process) ...", job.model.path)
    start = time.perf_counter()
    model, tokenizer = load_model(job.model)
    log.info("loaded %s in %.1f s", job.model.path, time.perf_counter() - start)
    if job.pipeline.engine == "vllm":
        log.info("starting the vLLM engine (the first start compiles, about a minute) ...")
    stages = [("decode", DecodeStage(job.decode)),
              ("encode", EncodeStage(model, compression=job.compression,
                                     frame_batch_size=job.resources.frame_batch_size)),
              ("answer", AnswerStage(model, tokenizer, config=job.pipeline,
                                     custom_positions=job.compression.positions == "original"))]
    for batch in batches_of(rows, job.resources.decode.batch_size):
        for name, stage in stages:
            batch = timed_call(stage, name, batch)
        for i in range(len(batch["video"])):
            on_video({key: values[i] for key, values in batch.items()})


def run_ray(job: JobConfig, rows: list[dict], on_video: Callable[[dict], None]) -> None:
    """The stages as Ray Data actor pools over a streaming dataset (Ray must be initialised), sized node
    by node as `placement` plans for the cluster's alive nodes (the plan is logged): a placement the nodes
    cannot hold at once stops here, before the dataset runs.

    A node lost mid-job is logged. When the nodes left can hold every actor, Ray restarts the lost ones
    there and retries their batches; when they cannot (Ray would wait for them forever), the stages are
    stopped and the clips not yet finished are run again, placed anew on the nodes left; when those
    cannot run the job at all, it stops (`NodeLostError`). Each clip reaches `on_video` once."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the driver shows its own progress
    lost: list[Node] = []
    while rows:
        nodes = cluster_nodes()
        try:
            placed = placement(job, nodes)
        except ConfigError as err:
            if not lost:
                raise
            why = str(err).removeprefix("invalid configuration:").strip()
            raise NodeLostError(
                f"{', '.join(map(str, lost))} left the cluster mid-job, and the nodes left cannot run the "
                f"job: {why}. The rows answered so far are in the output; rerun the same command when the "
                "cluster has room again (it resumes)") from None
        for line in placed.describe(nodes):
            log.info(line)
        log.info(actors_loading(job, placed))
        started = time.time()
        ds = stage_dataset(job, placed, rows)
        finished: set[str] = set()
        try:
            for video_row in rows_watched(ds.iter_rows(), NodeWatch(job, placed.stages, nodes).check):
                if not finished:
                    log.info(first_clip(video_row, started))
                on_video(video_row)
                finished.add(str(video_row["ids"][0]))
            return
        except NodesLost as err:
            executor = getattr(ds, "_current_executor", None)  # Ray Data's, running the pools
            if executor is not None:
                executor.shutdown(force=True)
            lost += err.nodes
            rows = [row for row in rows if str(row["ids"][0]) not in finished]
            log.warning("the nodes left cannot hold the lost actors beside the others: the stages stop, and "
                        "the %d clips not finished run again, placed on the nodes left", len(rows))


def actors_loading(job: JobConfig, placed: Placement) -> str:
    """What the stages' actors do before the first answers (in the actors, whose logs stay there): start
    a worker process, load their half of the model, and with vLLM start its engine."""
    engine = ("; each answer actor then starts a vLLM engine (the first start compiles, about a minute)"
              if job.pipeline.engine == "vllm" else "")
    pools = {name: placed.stages[name].pool_size for name in ("encode", "answer")}
    return (f"starting the actors ({pools['encode']} encode, {pools['answer']} answer): each starts a worker "
            f"and loads its half of {job.model.path}{engine}; the first answers follow ...")


def first_clip(video_row: dict, started: float) -> str:
    """The console line of the first clip out of the stages (started at `started`, epoch seconds): how
    long it took, and when the actors that ran it were ready (`timed`: column `<stage>_ready_at`)."""
    ready = ", ".join(f"{stage} {float(video_row[f'{stage}_ready_at']) - started:.1f} s"
                      for stage in ("encode", "answer") if not is_missing(video_row.get(f"{stage}_ready_at")))
    return f"first clip answered {time.time() - started:.1f} s after the stages started" + (
        f" (its actors were ready after: {ready})" if ready else "")


def stage_dataset(job: JobConfig, placed: Placement, rows: list[dict]) -> Any:
    """The streaming Ray dataset of `rows` through the three stages' actor pools, as `placed` sizes them."""
    import ray
    from ray.data import ActorPoolStrategy

    blocks = max(1, math.ceil(len(rows) / job.resources.decode.batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    for spec in stage_specs(job):
        res = placed.stages[spec.name]
        ds = ds.map_batches(
            timed(spec.cls, spec.name),
            fn_constructor_kwargs=spec.kwargs,
            batch_size=res.batch_size,
            compute=ActorPoolStrategy(size=res.pool_size),
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
        )
    return ds


@dataclass(frozen=True)
class Node:
    """One alive Ray node and what it offers to the job's actors."""

    id: str
    cpus: float
    gpus: int

    def __str__(self) -> str:
        return (f"node {self.id[:8]} ({self.cpus:g} CPU{'' if self.cpus == 1 else 's'}, {self.gpus} "
                f"GPU{'' if self.gpus == 1 else 's'})")


def cluster_nodes() -> list[Node]:
    """The connected Ray cluster's alive nodes (`ray.nodes()`), with their CPUs and GPUs."""
    import ray

    return [Node(n["NodeID"], float(n["Resources"].get("CPU", 0.0)), int(n["Resources"].get("GPU", 0)))
            for n in ray.nodes() if n["Alive"]]


class NodeLostError(ConnectionError):
    """Nodes left the cluster mid-job and those left cannot run the job: it stops (its rows so far are
    written; a rerun resumes)."""


class NodesLost(Exception):  # noqa: N818 - a signal within run_ray, not an error a user sees
    """Nodes left, and the nodes left cannot hold every actor of the running pools."""

    def __init__(self, nodes: list[Node]) -> None:
        super().__init__(", ".join(map(str, nodes)))
        self.nodes = nodes


class NodeWatch:
    """Notices nodes leaving the cluster while the job runs (`check`, called about once a second)."""

    def __init__(self, job: JobConfig, stages: dict[str, StageResources], nodes: list[Node],
                 alive_nodes: Callable[[], list[Node]] = cluster_nodes) -> None:
        self.job, self.stages, self.nodes, self.alive_nodes = job, stages, nodes, alive_nodes
        self.lost: list[Node] = []

    def check(self) -> None:
        """Log each node that has left; raise `NodesLost` when the nodes left cannot hold every actor of
        the pools (`placement_problems`): Ray could not restart the lost ones, and their batches would
        wait forever."""
        alive = self.alive_nodes()
        ids = {node.id for node in alive}
        gone = [node for node in self.nodes if node.id not in ids and node not in self.lost]
        if not gone:
            return
        self.lost.extend(gone)
        stuck = placement_problems(self.job, self.stages, alive)
        for node in gone:
            log.warning("%s left the cluster: %s", node,
                        "the nodes left cannot hold the running pools; the clips not yet finished are placed "
                        "anew" if stuck else "Ray restarts its actors on the nodes left and retries their "
                        "batches")
        if stuck:
            raise NodesLost(self.lost)


def rows_watched(rows: Iterator[dict], check: Callable[[], None], every: float = 1.0) -> Iterator[dict]:
    """`rows`, read in a thread of their own, while `check` runs every `every` seconds here even when no
    row comes (Ray Data waits without end for an actor that cannot be placed): what it raises ends the
    iteration."""
    arrived: queue.Queue = queue.Queue(maxsize=64)
    end = object()

    def read() -> None:
        try:
            for row in rows:
                arrived.put(row)
            arrived.put(end)
        except BaseException as err:  # noqa: BLE001 - re-raised in the reading thread below
            arrived.put(err)

    threading.Thread(target=read, name="ray-data-rows", daemon=True).start()
    next_check = time.monotonic() + every
    while True:
        try:
            item = arrived.get(timeout=max(0.0, next_check - time.monotonic()))
        except queue.Empty:
            item = None
        if time.monotonic() >= next_check:
            check()
            next_check = time.monotonic() + every
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        if item is not None:
            yield item


RAY_UNITS = 10_000  # Ray counts resources in steps of 1/10,000 (a GPU fraction has at most 4 decimals)
MAX_DECODERS_PER_NODE = 8
PLAN_ORDER = ("answer", "encode", "decode")  # the GPU stages first; decode takes the CPUs they leave


@dataclass
class Placement:
    """Each stage's actors (`stages`: the resources of one actor; `pool_size`, the cluster's total) and the
    plan they were sized by (`nodes`: node id -> the actors of each stage that fit there)."""

    stages: dict[str, StageResources]
    nodes: dict[str, dict[str, int]]

    def describe(self, nodes: list[Node]) -> list[str]:
        """The plan for the log: the stages, then one line per node."""
        lines = ["placement: " + ", ".join(f"{name} {r.pool_size} x (cpu {r.num_cpus:g}, gpu {r.num_gpus:g})"
                                           for name, r in self.stages.items())]
        for node in nodes:
            actors = ", ".join(f"{name} {self.nodes[node.id][name]}" for name in self.stages
                               if self.nodes[node.id][name])
            lines.append(f"  {node}: {actors or 'nothing'}")
        return lines


class _Room:
    """What is left of one node while actors are planned onto it, in Ray's 1/10,000 units: a GPU fraction
    goes to the GPU it fits best (least left over), a whole number takes that many unused GPUs; an actor
    never spans nodes."""

    def __init__(self, node: Node) -> None:
        self.node, self.cpu, self.gpus = node, _units(node.cpus), [RAY_UNITS] * node.gpus

    def fits(self, cpu: int, gpu: int) -> bool:
        return cpu <= self.cpu and self._gpus_for(gpu) is not None

    def take(self, cpu: int, gpu: int) -> None:
        chosen = self._gpus_for(gpu)
        assert chosen is not None and cpu <= self.cpu
        self.cpu -= cpu
        for i in chosen:
            self.gpus[i] -= min(gpu, RAY_UNITS)

    def _gpus_for(self, gpu: int) -> list[int] | None:
        """The GPUs an actor asking `gpu` units would take here (none for no GPU), else None."""
        if gpu >= RAY_UNITS:
            unused = [i for i, left in enumerate(self.gpus) if left == RAY_UNITS][:gpu // RAY_UNITS]
            return unused if len(unused) == gpu // RAY_UNITS else None
        if gpu > 0:
            fits = [i for i, left in enumerate(self.gpus) if left >= gpu]
            return [min(fits, key=lambda i: self.gpus[i])] if fits else None
        return []


class _Packing:
    """Actors placed one after another the way Ray spreads them over nodes: each on the next node in turn
    (round robin) that holds it, there as `_Room` says."""

    def __init__(self, nodes: list[Node]) -> None:
        self.rooms, self.turn = [_Room(node) for node in nodes], 0

    def place(self, cpu: int, gpu: int) -> _Room | None:
        """The room that took an actor asking `cpu` and `gpu` units, None when no node holds it."""
        for step in range(len(self.rooms)):
            room = self.rooms[(self.turn + step) % len(self.rooms)]
            if room.fits(cpu, gpu):
                room.take(cpu, gpu)
                self.turn = (self.turn + step + 1) % len(self.rooms)
                return room
        return None


def placement(job: JobConfig, nodes: list[Node]) -> Placement:
    """Each stage's actors and their resources, planned node by node on the cluster's alive `nodes`; what
    the config sets is kept, `num_gpus: null` and `pool_size: null` are resolved here:

    - GPUs (on any node): encode and answer share each GPU, each asking the fraction of it that its half of
      the model takes (`gpu_shares`: for the 7B, encode 0.1 and answer 0.9), so both run at once instead
      of one after the other; on each node with GPUs one encode actor (Ray would put two encoders on one
      GPU, best fit, leaving a GPU short for its answer actor) and one answer actor per GPU (with
      `engine=vllm`, `pipeline.vllm.actors_per_gpu` of them, splitting answer's share, rounded down to
      Ray's 0.0001 so that they fit beside the encoder).
    - no GPU anywhere: nothing asks for one; one encode and one answer actor on each node.
    - decode: on each node, as many actors as the CPUs the others leave there allow (at most 8 a node;
      at least one in the cluster).

    A `pool_size` given is the cluster's total, spread over the nodes. A placement whose actors the nodes
    cannot hold all at once is refused (`ConfigError`, saying what to change; see `placement_problems`)
    instead of running the pools one after the other or waiting forever for an actor Ray cannot place.
    Ray Data places the actors itself (spreading them over the nodes): the plan sizes the pools.
    """
    r = job.resources
    per_gpu = job.pipeline.vllm.actors_per_gpu if job.pipeline.engine == "vllm" else 1
    shares = {"decode": 0.0, "encode": 0.0, "answer": 0.0}
    if any(node.gpus for node in nodes):
        whole = gpu_shares(job.model)
        shares |= {"encode": whole["encode"], "answer": _units(whole["answer"]) // per_gpu / RAY_UNITS}
    configured = {name: getattr(r, name) for name in ("decode", "encode", "answer")}
    asks = {name: replace(res, num_gpus=shares[name] if res.num_gpus is None else res.num_gpus)
            for name, res in configured.items()}
    packing = _Packing(nodes)
    plan = {node.id: dict.fromkeys(asks, 0) for node in nodes}
    for name in PLAN_ORDER:
        res = asks[name]
        cpu, gpu = _units(res.num_cpus), _units(res.num_gpus)
        if res.pool_size is None:
            for room in packing.rooms:
                for _ in range(_actors_per_node(name, res, room.node, per_gpu)):
                    if not room.fits(cpu, gpu):
                        break
                    room.take(cpu, gpu)
                    plan[room.node.id][name] += 1
        wanted = res.pool_size or 1  # an automatic pool that no node could hold: one actor, checked below
        while sum(counts[name] for counts in plan.values()) < wanted and (room := packing.place(cpu, gpu)):
            plan[room.node.id][name] += 1
        asks[name] = replace(res, pool_size=res.pool_size or max(1, sum(c[name] for c in plan.values())))
    check(placement_problems(job, asks, nodes))
    return Placement(asks, plan)


def _actors_per_node(name: str, res: StageResources, node: Node, per_gpu: int) -> int:
    """How many actors of stage `name` an automatic pool plans on `node` (fewer when its room runs out)."""
    if name == "decode":
        return MAX_DECODERS_PER_NODE
    if not res.num_gpus:
        return 1
    if name == "encode":  # one a node: two fractions that fit one GPU would go to the same GPU
        return 1 if node.gpus else 0
    if res.num_gpus >= 1:
        return node.gpus // int(res.num_gpus)
    return node.gpus * per_gpu


def placement_problems(job: JobConfig, placed: dict[str, StageResources], nodes: list[Node]) -> list[str]:
    """Why the `nodes` cannot hold every actor of `placed` at once, each naming the keys to change: a GPU
    request Ray refuses (over 1 and not whole, or finer than 0.0001), more CPUs or GPUs asked than the
    cluster has, GPU requests that Ray cannot pack onto the GPUs in either order the pools start
    (`unplaced_gpu_actor`), an actor that fits no single node, or actors that do not fit node by node
    beside the others (`_Packing`, the GPU stages first)."""
    problems = []
    for name, res in placed.items():
        gpu = res.num_gpus or 0.0
        if gpu > 1 and not float(gpu).is_integer():
            problems.append(f"resources.{name}.num_gpus={gpu:g}: Ray takes more than one GPU only as a whole "
                            "number (an actor cannot span a fraction of a second GPU)")
        elif abs(gpu * RAY_UNITS - _units(gpu)) > 1e-6:
            problems.append(f"resources.{name}.num_gpus={gpu}: Ray counts GPU fractions in steps of 0.0001")
    if problems:
        return problems
    cpus = sum(node.cpus for node in nodes)
    cpus_asked = sum(res.num_cpus * res.pool_size for res in placed.values())
    if _units(cpus_asked) > _units(cpus):
        problems.append(f"{_demand(job, placed, 'num_cpus', cpus_asked)}, the cluster has {cpus:g}: lower a "
                        "num_cpus or a pool_size, or give Ray more CPUs (ray.num_cpus)")
    requests = [(name, _units(res.num_gpus or 0.0))
                for name, res in placed.items() for _ in range(res.pool_size)]
    gpus = [node.gpus for node in nodes]
    if any(unplaced_gpu_actor(order, gpus) for order in (requests, requests[::-1])):
        problems.append(_gpu_refusal(job, placed, gpus, sum(units for _, units in requests) / RAY_UNITS))
    if problems:
        return problems
    largest = max(nodes, key=lambda node: (node.cpus, node.gpus), default=Node("none", 0.0, 0))
    for name, res in placed.items():
        if not any(_Room(node).fits(_units(res.num_cpus), _units(res.num_gpus)) for node in nodes):
            problems.append(f"resources.{name}: one actor asks {res.num_cpus:g} CPUs and {res.num_gpus:g} "
                            f"GPUs, more than any one node has (the largest: {largest}; an actor cannot "
                            "span nodes): lower its num_cpus or num_gpus")
    if problems:
        return problems
    packing = _Packing(nodes)
    for name in PLAN_ORDER:
        res = placed[name]
        cpu, gpu = _units(res.num_cpus), _units(res.num_gpus)
        for placed_so_far in range(res.pool_size):
            if not packing.place(cpu, gpu):
                problems.append(f"resources.{name}: {res.pool_size - placed_so_far} of its {res.pool_size} "
                                "actors fit no node beside the other stages' actors (the cluster has the "
                                f"CPUs and GPUs, but not node by node: {', '.join(map(str, nodes))}): lower "
                                "a pool_size or a num_cpus")
                break
    return problems


def unplaced_gpu_actor(requests: list[tuple[str, int]], gpus: list[int]) -> str | None:
    """Ray's packing of GPU requests (name, 1/10,000s of a GPU), in the order given, onto nodes with `gpus`
    empty GPUs each (`_Packing`: the nodes in turn; on a node a fraction goes to the GPU it fits best,
    least left over, the first of equals, and a whole number takes that many unused GPUs). The name of
    the first request that finds no room, else None."""
    packing = _Packing([Node(str(i), 0.0, count) for i, count in enumerate(gpus)])
    return next((name for name, units in requests if not packing.place(0, units)), None)


def _gpu_refusal(job: JobConfig, placed: dict[str, StageResources], node_gpus: list[int], asked: float
                 ) -> str:
    """What the GPU requests need, why the nodes' GPUs (`node_gpus`, per node) cannot hold them at once,
    and what to change."""
    need = _demand(job, placed, "num_gpus", asked)
    gpus = sum(node_gpus)
    if gpus == 0:
        where = f"{need}, and the cluster has no GPU"
    elif asked > gpus:
        where = f"{need} on {'one GPU' if gpus == 1 else f'a cluster of {gpus}'}"
    else:
        where = (f"{need} of the cluster's {gpus}, but not GPU by GPU (an actor asking a fraction must fit "
                 "what one GPU has left, one asking whole GPUs takes unused ones of one node)")
    ways = [f"leave resources.{name}.num_gpus unset" for name in placed
            if placed[name].num_gpus and getattr(job.resources, name).num_gpus is not None]
    ways += [f"lower resources.{name}.pool_size" for name in placed
             if placed[name].num_gpus and getattr(job.resources, name).pool_size is not None
             and placed[name].pool_size > 1]
    if placed["encode"].num_gpus:
        ways.insert(0, "resources.encode.num_gpus=0 keeps encode on the CPU")
    which = "one of them" if sum(1 for res in placed.values() if res.num_gpus) > 1 else "it"
    return (f"{where}: Ray could not hold all their actors at once (the pools would run one after the other, "
            f"or wait forever). Lower {which}, e.g. {', or '.join(ways)}")


def _demand(job: JobConfig, placed: dict[str, StageResources], key: str, total: float) -> str:
    """The stages asking for `key` (num_cpus or num_gpus) and their `total`, e.g.
    `resources.encode.num_gpus=0.45 (automatic) and resources.answer.num_gpus=1 x 2 actors need 2.45 GPUs`."""
    asks = []
    for name, res in placed.items():
        value, configured = getattr(res, key), getattr(job.resources, name)
        if not value:
            continue
        pool = "" if res.pool_size == 1 else f" x {res.pool_size} actors"
        pool += " (automatic pool_size)" if pool and configured.pool_size is None else ""
        automatic = " (automatic)" if getattr(configured, key) is None else ""
        asks.append(f"resources.{name}.{key}={value:g}{automatic}{pool}")
    stages = asks[0] if len(asks) == 1 else ", ".join(asks[:-1]) + " and " + asks[-1]
    unit = "GPU" if key == "num_gpus" else "CPU"
    return f"{stages} {'needs' if len(asks) == 1 else 'need'} {total:g} {unit}{'' if total == 1 else 's'}"


def _units(value: float) -> int:
    """`value` in Ray's 1/10,000 steps."""
    return round(value * RAY_UNITS)


def gpu_shares(model: ModelConfig) -> dict[str, float]:
    """The fractions of one GPU the encode and answer actors ask for: each half's share of the model's
    parameters (counted from its config, nothing loaded), encode's rounded up to a twentieth and kept
    within [0.1, 0.5], answer the rest."""
    halves = half_parameters(read_model_config(model.path))
    share = halves["vision"] / (halves["vision"] + halves["language"])
    encode = min(0.5, max(0.1, math.ceil(share * 20) / 20))
    return {"encode": encode, "answer": round(1.0 - encode, 2)}


def timed(cls: type, name: str) -> type:
    """`cls` as a Ray actor whose calls also record when each batch ran (`timed_call`), on which node
    (column `<name>_node`: the Ray node id, which the output rows carry) and when the actor was ready
    (column `<name>_ready_at`, epoch seconds: its worker started, its model loaded; the driver reports it,
    as the actors' own logs stay in the actors), under the same class name, so Ray's actors keep theirs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807 - the stage's own setup
        super(subclass, self).__init__(*args, **kwargs)
        self.ready_at = time.time()

    def __call__(self, batch: dict) -> dict:  # noqa: N807 - the stage's own call, timed
        import ray

        out = timed_call(super(subclass, self).__call__, name, batch)
        n = len(out["video"])
        return {**out, f"{name}_node": [ray.get_runtime_context().get_node_id()] * n,
                f"{name}_ready_at": [self.ready_at] * n}

    subclass = type(cls.__name__, (cls,), {"__init__": __init__, "__call__": __call__,
                                           "__module__": cls.__module__})
    return subclass


def timed_call(stage: Callable[[dict], dict], name: str, batch: dict) -> dict:
    """`stage(batch)` with column `<name>_interval`: [start, end] wall-clock seconds of the whole batch,
    on every row (the job's timeline)."""
    start = time.time()
    out = stage(batch)
    interval = np.array([start, time.time()])
    return {**out, f"{name}_interval": [interval] * len(out["video"])}
