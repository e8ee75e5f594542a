"""Structured (typed) configuration of a vzpipe job.

The dataclasses are the schema of `conf/`: Hydra merges the YAML groups into them, so an unknown key or a
wrong type fails at start with a message naming it. `validate` adds the value checks that types cannot
express, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from visionzip.video_llava import COMPRESSION_METHODS

TOKENS_PER_FRAME = 257  # CLIP ViT-L/14 at 224 px: 16 x 16 patches + CLS, as in Video-LLaVA


@dataclass
class ModelConfig:
    path: str = "LanguageBind/Video-LLaVA-7B-hf"
    dtype: str = "bfloat16"
    device: str = "auto"
    build_tiny: bool = False  # build the tiny random model into `path` first (tests, demo)
    projector_path: str | None = None  # tuned projector weights (`pipeline=tune` writes them)


@dataclass
class TemporalConfig:
    enabled: bool = False
    threshold: float = 0.9
    max_tokens: int | None = None


@dataclass
class CompressionConfig:
    method: str = "visionzip"
    dominant: int = 14
    contextual: int = 3
    temporal: TemporalConfig = field(default_factory=TemporalConfig)


@dataclass
class DecodeConfig:
    backend: str = "pyav"
    num_frames: int = 8
    strategy: str = "uniform"
    fps: float | None = None
    max_frames: int = 64
    size: int | None = 224
    recover: bool = False  # leave out frames that cannot be decoded instead of failing the video
    threads: int = 1  # decoder threads per video (0 = FFmpeg's choice); 1 matches a decode actor's 1 CPU


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8  # prompts per `generate` call (left-padded together)


@dataclass
class TuneConfig:
    """`pipeline=tune`: projector-only tuning on compressed tokens (`pipelines.tune`)."""

    out: str | None = None  # folder: projector.safetensors (model.projector_path), checkpoint, tune.json
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


@dataclass
class PipelineConfig:
    task: str = "qa"
    caption_prompt: str = "Describe the video in detail."
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


@dataclass
class StageResources:
    num_cpus: float = 1.0
    num_gpus: float | None = 0.0  # None: one per actor when the cluster has GPUs
    pool_size: int = 1
    batch_size: int = 4


@dataclass
class ResourcesConfig:
    decode: StageResources = field(default_factory=StageResources)
    encode: StageResources = field(default_factory=StageResources)
    answer: StageResources = field(default_factory=StageResources)
    frame_batch_size: int = 64  # frames per CLIP tower call in the encoder


@dataclass
class RayConfig:
    address: str | None = None  # None: start an embedded Ray; "auto" or HOST:PORT: join a cluster
    num_cpus: int | None = None  # embedded Ray only; None = this machine's cores
    num_gpus: int | None = None
    object_store_memory: int | None = None


@dataclass
class DataConfig:
    manifest: str = MISSING
    video_root: str | None = None


@dataclass
class OutputConfig:
    path: str = MISSING
    overwrite: bool = False


@dataclass
class DemoConfig:
    """`+experiment=demo`: generate sample clips and a manifest before the job reads it."""

    enabled: bool = False
    folder: str = "demo_data"
    videos: int = 4  # synthetic clips, one question of each of the 5 types per clip
    broken_video: bool = True  # one manifest row points at a corrupt file: it must become an error row


@dataclass
class JobConfig:
    runner: str = "ray"
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


CHOICES = {
    "runner": ("ray", "local"),
    "compression.method": COMPRESSION_METHODS,
    "decode.backend": ("pyav", "decord"),
    "decode.strategy": ("uniform", "fps"),
    "model.dtype": ("bfloat16", "float16", "float32"),
    "pipeline.task": ("qa", "caption", "tune"),
}


def register() -> None:
    """Put the schema in Hydra's ConfigStore (conf/config.yaml lists `job_schema` first in its defaults)."""
    ConfigStore.instance().store(name="job_schema", node=JobConfig)


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Resolve and type a composed config, then check its values."""
    job = OmegaConf.to_object(cfg)
    assert isinstance(job, JobConfig)
    validate(job)
    return job


def validate(job: JobConfig) -> None:
    """Reject values a job cannot run with, each problem named, all at once."""
    problems: list[str] = []
    for key, allowed in CHOICES.items():
        value = _get(job, key)
        if value not in allowed:
            problems.append(f"{key}={value!r} is not one of {', '.join(allowed)}")
    c = job.compression
    if c.method != "none":  # visionzip, and the baselines that keep the same dominant + contextual tokens
        if c.dominant < 1:
            problems.append(f"compression.dominant={c.dominant} must be >= 1 (it counts the CLS token)")
        if c.contextual < 0:
            problems.append(f"compression.contextual={c.contextual} must be >= 0")
        if c.dominant + c.contextual > TOKENS_PER_FRAME:
            problems.append(
                f"compression.dominant + compression.contextual = {c.dominant} + {c.contextual} = "
                f"{c.dominant + c.contextual} exceeds the {TOKENS_PER_FRAME} tokens of a frame"
            )
    if (c.temporal.enabled and c.temporal.max_tokens is not None and job.decode.strategy == "uniform"
            and c.method != "none"):  # with `none` the tokens per frame are the model's: checked at load
        per_frame = c.dominant + c.contextual
        floor = per_frame + job.decode.num_frames - 1  # frame 0 whole + every later frame's CLS
        if c.temporal.max_tokens < floor:
            problems.append(
                f"compression.temporal.max_tokens={c.temporal.max_tokens} is below {floor}: temporal "
                f"merging keeps frame 0's {per_frame} tokens and the CLS of each of the other "
                f"{job.decode.num_frames - 1} frames"
            )
    d = job.decode
    if d.num_frames < 1:
        problems.append(f"decode.num_frames={d.num_frames} must be >= 1")
    if d.strategy == "fps" and (d.fps is None or d.fps <= 0):
        problems.append(f"decode.strategy=fps needs decode.fps > 0 (got {d.fps})")
    if d.threads < 0:
        problems.append(f"decode.threads={d.threads} must be >= 0 (0 = FFmpeg's choice)")
    if d.max_frames < 1:
        problems.append(f"decode.max_frames={d.max_frames} must be >= 1")
    if d.size is not None and d.size < 1:
        problems.append(f"decode.size={d.size} must be >= 1 or null")
    g = job.pipeline.generation
    if g.batch_size < 1:
        problems.append(f"pipeline.generation.batch_size={g.batch_size} must be >= 1")
    if g.max_new_tokens < 1:
        problems.append(f"pipeline.generation.max_new_tokens={g.max_new_tokens} must be >= 1")
    if g.do_sample and (g.temperature <= 0 or not 0 < g.top_p <= 1):
        problems.append(
            f"sampling needs pipeline.generation.temperature > 0 and 0 < top_p <= 1 "
            f"(got {g.temperature}, {g.top_p})"
        )
    t = job.pipeline.tune
    if job.pipeline.task == "tune":
        if not t.out:
            problems.append("pipeline.tune.out must name the folder the tuned projector goes to")
        for key in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(t, key) < 1:
                problems.append(f"pipeline.tune.{key}={getattr(t, key)} must be >= 1")
        if t.lr <= 0 or t.warmup_steps < 0 or t.weight_decay < 0 or t.max_grad_norm <= 0:
            problems.append(
                f"pipeline.tune needs lr > 0, warmup_steps >= 0, weight_decay >= 0 and max_grad_norm > 0 "
                f"(got {t.lr}, {t.warmup_steps}, {t.weight_decay}, {t.max_grad_norm})"
            )
    for name in ("decode", "encode", "answer"):
        r: StageResources = getattr(job.resources, name)
        if r.num_cpus < 0 or (r.num_gpus or 0) < 0:
            problems.append(f"resources.{name}: num_cpus and num_gpus must be >= 0")
        if r.pool_size < 1 or r.batch_size < 1:
            problems.append(f"resources.{name}: pool_size and batch_size must be >= 1")
    if job.resources.frame_batch_size < 1:
        problems.append(f"resources.frame_batch_size={job.resources.frame_batch_size} must be >= 1")
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def _get(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
