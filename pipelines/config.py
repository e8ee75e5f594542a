"""Structured (typed) configuration of the two entry points: the batch job (`run.py`, conf/config.yaml)
and projector tuning (`tune.py`, conf/tune.yaml).

Each stage owns the dataclass of its section (`ModelConfig`, `DecodeConfig`, `CompressionConfig`,
`AnswerConfig`) with the checks of its values (`problems()`); this module composes them with the job's own
sections (data, output, resources, ray, tune). Every default is defined once, in these dataclasses:
`register` puts them in Hydra's ConfigStore as the schema, and the YAML files of conf/ only pick the groups,
set what a group option changes, and bind the values known per job (the job's Hydra output folder, the
set's own prompts). Hydra merges them into these dataclasses, so an unknown key or a wrong type fails at
start naming it. `job_problems` / `tune_problems` gather every value
problem at once; run with the model's tokens per frame (read from its `config.json` before any work),
they also check the token budgets against the model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import get_type_hints

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipelines.datasets import DataConfig
from pipelines.score import ScoreConfig
from stages.answer import AnswerConfig
from stages.decode import DecodeConfig
from stages.encode import CompressionConfig
from stages.model import ModelConfig
from tasks import TASKS

RUNNERS = ("ray", "local")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """Settings a job cannot run with; the message lists every problem, each naming its key."""


@dataclass
class StageResources:
    """One stage's actors: a pool of `pool_size` actors taking batches of `batch_size` videos (see
    `ResourcesConfig` for what None resolves to)."""

    num_cpus: float = 0.5
    num_gpus: float | None = None  # None: encode and answer share each GPU by their model halves' sizes
    pool_size: int | None = None  # None: from the cluster (decode: the spare CPUs; answer: one per GPU)
    batch_size: int = 4


@dataclass
class ResourcesConfig:
    """Per-stage Ray resources. None = planned node by node on the cluster's alive nodes
    (`pipelines.runner.placement`, logged at start): without GPUs nothing asks for one, one encode and one
    answer actor a node; with GPUs encode and answer share each GPU, each asking the fraction its half of
    the model takes (the 7B: 0.1 and 0.9), one encode actor a GPU node and one answer actor a GPU; decode
    gets each node's spare CPUs (at most 8 a node). Numbers given are used as they are (a pool_size is the
    cluster's total). Ray Data restarts an actor that dies and retries its batch; a node lost mid-job is
    survived (`pipelines.runner`)."""

    decode: StageResources = field(default_factory=lambda: StageResources(num_cpus=1.0, num_gpus=0.0))
    encode: StageResources = field(default_factory=StageResources)
    answer: StageResources = field(default_factory=StageResources)
    frame_batch_size: int = 64  # frames per CLIP tower call in the encoder (bounds encoder memory)


@dataclass
class RayConfig:
    address: str | None = None  # None: start an embedded Ray; "auto" or HOST:PORT: join a cluster
    num_cpus: int | None = None  # embedded Ray only; None = this machine's cores
    num_gpus: int | None = None  # embedded Ray only; None = what torch sees
    object_store_memory: int | None = None  # bytes; None = Ray's default


@dataclass
class OutputConfig:
    path: str = MISSING  # JSONL or Parquet; conf/config.yaml: predictions.jsonl in the job's Hydra folder
    overwrite: bool = False  # start over: drop the rows (and fingerprint) already there
    retry_errors: bool = True  # a rerun asks again the questions whose rows are errors


@dataclass
class JobConfig:
    """The batch job: decode -> encode + compress -> answer, one output row per question."""

    runner: str = "ray"  # ray | local (the same stages in this process, no Ray)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    pipeline: AnswerConfig = field(default_factory=AnswerConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    max_error_fraction: float = 0.25  # more error rows than this (of the whole output): exit non-zero


@dataclass
class TuneConfig:
    """Projector-only tuning on compressed tokens (`pipelines.tune`)."""

    # folder: projector.safetensors (for model.projector_path), checkpoint, tune.json; conf/tune.yaml: tuned/
    # in the run's Hydra folder
    out: str = MISSING
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # questions per forward pass
    grad_accum: int = 1  # forward passes per optimizer step
    lr: float = 2e-5  # peak learning rate (LLaVA-1.5's fine-tuning rate)
    warmup_steps: int = 30  # linear warm-up, then cosine decay to zero
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 100  # steps between checkpoints (projector + optimizer state)
    resume: bool = True  # continue from `out`'s checkpoint when there is one
    seed: int = 0  # order of the questions
    frame_batch_size: int = 64  # frames per CLIP tower call while the videos are encoded

    def problems(self) -> list[str]:
        found = [f"{key}={getattr(self, key)} must be >= 1"
                 for key in ("steps", "batch_size", "grad_accum", "checkpoint_every", "frame_batch_size")
                 if getattr(self, key) < 1]  # fmt: skip
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            found.append(f"needs lr > 0, warmup_steps >= 0, weight_decay >= 0 and max_grad_norm > 0 "
                         f"(got {self.lr}, {self.warmup_steps}, {self.weight_decay}, {self.max_grad_norm})")
        return found


@dataclass
class TuneJobConfig:
    """Projector tuning: the videos and questions of a manifest with answers, the job's model, decode and
    compression settings, and the tuning knobs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


def register() -> None:
    """Put both schemas in Hydra's ConfigStore (conf/config.yaml and conf/tune.yaml list theirs first), and
    the `data_task` resolver (`set_default`)."""
    ConfigStore.instance().store(name="job_schema", node=JobConfig)
    ConfigStore.instance().store(name="tune_schema", node=TuneJobConfig)
    OmegaConf.register_new_resolver("data_task", set_default, replace=True)


def set_default(key: str, *, _root_: DictConfig) -> str | None:
    """`${data_task:KEY}`: the `KEY` of the task of the config's `data.format` (`tasks.TASKS`: its
    `prompt` or `choice_prompt`: conf/pipeline/qa.yaml), what a job asks with unless the key is set.
    Resolved per job when its config is built, so each job of a `-m` sweep over `data.format` gets its
    set's own, and the fingerprint holds the resolved text. (`score.rule` null is the set's own rule by
    `ScoreConfig.rule_for`.) An unknown format gets the manifest's
    (`data.problems()` names the format)."""
    task = TASKS.get(_root_.data.format, TASKS["manifest"])
    return getattr(task, key)


def compose_job(*overrides: str) -> JobConfig:
    """The batch job's config composed from conf/config.yaml with command-line style overrides, typed and
    checked: what `run.py` gets, for tests, benches and notebooks."""
    return to_job_config(_compose("config", overrides))


def compose_tune(*overrides: str) -> TuneJobConfig:
    """Projector tuning's config from conf/tune.yaml (as `compose_job`)."""
    return to_tune_config(_compose("tune", overrides))


def _compose(name: str, overrides: tuple[str, ...]) -> DictConfig:
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(name, overrides=list(overrides))


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Resolve and type a composed batch-job config, then check the values that need no model."""
    check(unknown_keys(OmegaConf.to_container(cfg, resolve=False), JobConfig))
    job = OmegaConf.to_object(cfg)
    assert isinstance(job, JobConfig)
    check(job_problems(job))
    return job


def to_tune_config(cfg: DictConfig) -> TuneJobConfig:
    """Resolve and type a composed tuning config, then check the values that need no model."""
    check(unknown_keys(OmegaConf.to_container(cfg, resolve=False), TuneJobConfig))
    job = OmegaConf.to_object(cfg)
    assert isinstance(job, TuneJobConfig)
    check(tune_problems(job))
    return job


def check(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def unknown_keys(values: dict, schema: type, prefix: str = "") -> list[str]:
    """The keys of a composed config (`values`, unresolved) that its schema (a dataclass) lacks, each with
    the nearest known key: Hydra adds a `+key=value` override to a typed config without a word, and
    `OmegaConf.to_object` then drops it, so a typo after the `+` would otherwise run as if never given."""
    hints = get_type_hints(schema)
    problems = []
    for key, value in values.items():
        if key not in hints:
            near = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            problems.append(f"{prefix}{key}: no such key in {prefix.rstrip('.') or 'the config'}{hint}")
        elif is_dataclass(hints[key]) and isinstance(value, dict):
            problems += unknown_keys(value, hints[key], f"{prefix}{key}.")
    return problems


def job_problems(job: JobConfig, tokens_per_frame: int | None = None) -> list[str]:
    """Every value the batch job cannot run with, each naming its key. With the model's
    `tokens_per_frame`, the token budgets are checked against it too."""
    problems = _input_problems(job.data, job.model, job.decode, job.compression, tokens_per_frame)
    if job.runner not in RUNNERS:
        problems.append(f"runner={job.runner!r} is not one of {', '.join(RUNNERS)}")
    problems += [f"pipeline.{problem}" for problem in job.pipeline.problems()]
    problems += [f"compression.positions=original with pipeline.{problem} (or compression.positions=compact)"
                 for problem in job.pipeline.position_problems(job.compression.positions == "original")]
    problems += [f"score.{problem}" for problem in job.score.problems()]
    if not 0 <= job.max_error_fraction <= 1:
        problems.append(f"max_error_fraction={job.max_error_fraction} must be in [0, 1]")
    for name in ("decode", "encode", "answer"):
        r: StageResources = getattr(job.resources, name)
        if r.num_cpus < 0 or (r.num_gpus or 0) < 0:
            problems.append(f"resources.{name}: num_cpus and num_gpus must be >= 0")
        if (r.pool_size is not None and r.pool_size < 1) or r.batch_size < 1:
            problems.append(f"resources.{name}: pool_size and batch_size must be >= 1")
    if job.resources.frame_batch_size < 1:
        problems.append(f"resources.frame_batch_size={job.resources.frame_batch_size} must be >= 1")
    ray = job.ray
    if ray.num_cpus is not None and ray.num_cpus < 1:
        problems.append(f"ray.num_cpus={ray.num_cpus} must be >= 1 or null")
    if ray.num_gpus is not None and ray.num_gpus < 0:
        problems.append(f"ray.num_gpus={ray.num_gpus} must be >= 0 or null")
    if ray.object_store_memory is not None and ray.object_store_memory < 1:
        problems.append(f"ray.object_store_memory={ray.object_store_memory} must be > 0 bytes or null")
    return problems


def tune_problems(job: TuneJobConfig, tokens_per_frame: int | None = None) -> list[str]:
    """Every value projector tuning cannot run with (as `job_problems`)."""
    problems = _input_problems(job.data, job.model, job.decode, job.compression, tokens_per_frame)
    return problems + [f"tune.{problem}" for problem in job.tune.problems()]


def _input_problems(data: DataConfig, model: ModelConfig, decode: DecodeConfig,
                    compression: CompressionConfig, tokens_per_frame: int | None) -> list[str]:
    """The sections both entry points share, and the one check that spans two of them."""
    problems = [f"data.{p}" for p in data.problems()]
    problems += [f"model.{p}" for p in model.problems()]
    problems += [f"decode.{p}" for p in decode.problems()]
    problems += [f"compression.{p}" for p in compression.problems(tokens_per_frame)]
    temporal = compression.temporal
    known = compression.method != "none" or tokens_per_frame is not None
    if temporal.enabled and temporal.max_tokens is not None and decode.strategy == "uniform" and known:
        per_frame = compression.per_frame(tokens_per_frame or 0)
        floor = per_frame + decode.num_frames - 1  # frame 0 whole + every later frame's CLS
        if temporal.max_tokens < floor:
            problems.append(
                f"compression.temporal.max_tokens={temporal.max_tokens} is below {floor}: temporal "
                f"merging keeps frame 0's {per_frame} tokens and the CLS of each of the other "
                f"{decode.num_frames - 1} frames"
            )
    return problems
