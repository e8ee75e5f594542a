"""GPU check (issue 25): the whole pipeline at Video-LLaVA-7B's geometry on one GPU, offline, in one command.

    python -m bench.gpu_check            # one CUDA GPU, no internet: writes bench/results/gpu.json
    python -m bench.gpu_check --tiny     # anywhere, the CPU too: the same steps on the tiny geometry

Steps, each timed (`steps_s` in the ratios):
1. checkpoint: a random Video-LLaVA built directly in bf16 on the device (`--tiny`: stages.testing's tiny
   geometry; else the 7B's: CLIP ViT-L/14 at 224 px + a LLaMA-7B, vocabulary 32064, ~7.1 B parameters),
   saved with safetensors under `--workdir` (about 14 GB for the 7B; nothing is downloaded).
2. prefill: the built LLM's prefill of 8 frames' 2056 visual tokens against VisionZip's 136 (+50 text
   tokens each), timed side by side on the device (interleaved medians): `bench_prefill`'s ratio, measured
   there on two CPU layers, here on all 32 layers of the GPU.
3. job_hf: the batch job (`run_job`, as `run.py` runs it) on `--clips` generated clips x `--questions`,
   `--new-tokens` new tokens, with automatic placement: on one GPU encode and answer share it (0.1 and
   0.9 for the 7B). Reported: rows per second (the summary's, whole job with the actors' model loads;
   and answering alone, from its timeline span), the stage timeline and how long encode's and answer's
   spans overlap, the placement, each stage actor's peak GPU memory (`torch.cuda.max_memory_allocated`
   and `max_memory_reserved`) and peak RSS, and the device's peak used memory (all processes).
4. job_vllm: the same job with `pipeline.engine=vllm` (eager, its export under `--workdir`), or `skipped`
   with the reason: no CUDA GPU, vllm not importable, or a vllm build without CUDA. vLLM's engine runs in
   a process of its own, so the answer actor's own GPU memory leaves it out: the device's peak shows it.

Actor memory: a thread in each Ray worker process (Ray's `worker_process_setup_hook`) writes its actor's
stage and peak memories to `<job>/actor_memory/<pid>.json` every 0.2 s; the check reads them after the job.
A step that fails is recorded with its error (and the check exits 1); the JSON is written either way.
Goal: the whole check within 480 s on one H200-class GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `stages`, `pipelines` and `bench` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerBase,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

from bench.bench_prefill import (  # noqa: E402
    CONTEXTUAL,
    DOMINANT,
    FRAMES,
    HEADS,
    LLM_LAYERS,
    MLP,
    TEXT_TOKENS,
    VIT_L14,
    WIDTH,
)
from bench.common import (  # noqa: E402
    CACHE_DIR,
    RESULTS_DIR,
    goal,
    interleaved_medians,
    print_ratios,
    print_table,
    status_mb,
    write_result,
)
from pipelines.config import JobConfig, compose_job  # noqa: E402
from pipelines.files import write_jsonl  # noqa: E402
from pipelines.job import run_job  # noqa: E402
from pipelines.runner import cluster_nodes, placement  # noqa: E402
from stages.answer import AnswerStage  # noqa: E402
from stages.decode import DecodeStage  # noqa: E402
from stages.encode import EncodeStage  # noqa: E402
from stages.testing import tiny_config, tiny_tokenizer, video_llava_config, write_checkpoint  # noqa: E402
from synthqa.sample_videos import write_video  # noqa: E402
from visionzip.video_llava import tokens_per_frame  # noqa: E402

TIME_GOAL_S = 480.0
VOCAB_7B = 32064  # Video-LLaVA-7B's (LLaMA's 32000 + its added tokens, padded)
QUESTIONS = ("What is moving in the video?", "Which color is the square?", "Where does the object move?",
             "How many objects are there?", "Describe the scene in detail.")
STAGE_OF_CLASS = {cls.__name__: stage for cls, stage in
                  ((DecodeStage, "decode"), (EncodeStage, "encode"), (AnswerStage, "answer"))}
REPORT_EVERY_S = 0.2
MEMORY_DIR_ENV = "VZPIPE_ACTOR_MEMORY_DIR"  # where the Ray workers' memory reports go
MB = 2**20


def video_llava_7b_config(tokenizer: PreTrainedTokenizerBase) -> VideoLlavaConfig:
    """Video-LLaVA-7B's geometry: CLIP ViT-L/14 at 224 px (257 tokens per frame, layer -2) and a LLaMA-7B
    (width 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32064), around the offline tiny tokenizer."""
    vision = CLIPVisionConfig(**VIT_L14, projection_dim=768)
    text = LlamaConfig(
        vocab_size=VOCAB_7B, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LLM_LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    return video_llava_config(tokenizer, vision, text)


GEOMETRIES: dict[str, Callable[[PreTrainedTokenizerBase], VideoLlavaConfig]] = {
    "7b": video_llava_7b_config,
    "tiny": tiny_config,
}


def build_checkpoint(folder: Path, geometry: str, device: torch.device
                     ) -> tuple[VideoLlavaForConditionalGeneration, dict]:
    """A random Video-LLaVA of `geometry`, initialised directly in bf16 on `device` (seed 0), saved into
    `folder` (replaced); the model (still on `device`) and what was built."""
    tokenizer = tiny_tokenizer()
    config = GEOMETRIES[geometry](tokenizer)
    torch.manual_seed(0)
    with torch.device(device):
        model = VideoLlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    shutil.rmtree(folder, ignore_errors=True)
    write_checkpoint(model, tokenizer, folder)
    files = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    return model, {"parameters": sum(p.numel() for p in model.parameters()),
                   "safetensors_gb": round(sum(p.stat().st_size for p in files) / 1e9, 3)}


def prefill_seconds(model: VideoLlavaForConditionalGeneration, tokens: dict[str, int], repeats: int
                    ) -> dict[str, float]:
    """Median seconds of one prefill (KV cache kept, as generation does) of each prompt length, run side by
    side on the model's device, each call waited for; a non-finite output is an error."""
    llm = model.model.language_model
    device = llm.device
    hidden = llm.config.hidden_size
    embeds = {name: torch.randn(1, count, hidden, generator=torch.Generator().manual_seed(count)
                                ).to(device=device, dtype=torch.bfloat16)
              for name, count in tokens.items()}

    def prefill(e: torch.Tensor) -> torch.Tensor:
        out = llm(inputs_embeds=e, use_cache=True).last_hidden_state
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    with torch.inference_mode():
        for name, e in embeds.items():
            if not torch.isfinite(prefill(e)).all():
                raise RuntimeError(f"the random LLM's prefill of {tokens[name]} tokens is not finite")
        return interleaved_medians({name: partial(prefill, e) for name, e in embeds.items()}, repeats=repeats)


def write_clips(folder: Path, clips: int, questions: int) -> Path:
    """`clips` short generated videos and a manifest asking each `questions` questions."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for clip in range(clips):
        path = write_video(folder / f"clip_{clip}.mp4", num_frames=48, width=320, height=240)
        rows += [{"id": f"c{clip}-q{q}", "video": path.name, "question": QUESTIONS[q % len(QUESTIONS)]}
                 for q in range(questions)]
    return write_jsonl(folder / "manifest.jsonl", rows)


def report_actor_memory() -> None:
    """Ray's `worker_process_setup_hook`: in each worker process, a daemon thread that writes, every
    `REPORT_EVERY_S`, the stage of the actor the process runs (once it runs one) and the process's peak
    memories to `<folder>/<pid>.json`, the folder named by the environment variable `MEMORY_DIR_ENV`."""
    path = Path(os.environ[MEMORY_DIR_ENV]) / f"{os.getpid()}.json"
    partial = path.with_suffix(".partial")  # written, then renamed: the reader never sees half a report

    def report() -> None:
        while True:
            stage = stage_of_this_actor()
            if stage is not None:
                partial.write_text(json.dumps({"stage": stage, "pid": os.getpid(), **process_memory()}))
                os.replace(partial, path)
            time.sleep(REPORT_EVERY_S)

    threading.Thread(target=report, name="vzpipe-actor-memory", daemon=True).start()


def stage_of_this_actor() -> str | None:
    """The pipeline stage this Ray worker's actor runs (Ray Data names its actor classes
    `MapWorker(MapBatches(<stage class>))`), or None: not an actor yet, or not a stage."""
    import ray

    context = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return None
    name = context.current_actor._ray_actor_creation_function_descriptor.class_name
    found = re.search(r"MapBatches\((\w+)\)", name)
    return STAGE_OF_CLASS.get(found.group(1)) if found else None


_peak_anon_mb = 0.0  # this process's largest `RssAnon` seen by `process_memory` so far


def process_memory() -> dict[str, float]:
    """This process's peak GPU memory by torch's allocator (0 when it never used CUDA), its peak RSS, and
    the largest anonymous RSS seen at the calls so far (the reporter calls it every `REPORT_EVERY_S`). The
    peak RSS counts the checkpoint's memory-mapped pages too, which the OS reclaims; the anonymous peak is
    the host memory a load really holds (e.g. a half copied to host memory before it moves to the GPU)."""
    global _peak_anon_mb
    _peak_anon_mb = max(_peak_anon_mb, status_mb("RssAnon"))
    used = torch.cuda.is_initialized()
    return {"gpu_max_allocated_mb": round(torch.cuda.max_memory_allocated() / MB, 1) if used else 0.0,
            "gpu_max_reserved_mb": round(torch.cuda.max_memory_reserved() / MB, 1) if used else 0.0,
            "peak_rss_mb": round(status_mb("VmHWM"), 1), "peak_anon_rss_mb": round(_peak_anon_mb, 1)}


class DeviceMemorySampler:
    """The GPU's peak used memory (all processes: total - free, by `torch.cuda.mem_get_info`) while the block
    runs, sampled every `REPORT_EVERY_S` by a thread; `peak_mb` stays None without a GPU."""

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DeviceMemorySampler:
        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(REPORT_EVERY_S):
            free, total = torch.cuda.mem_get_info()
            self.peak_mb = max(self.peak_mb or 0.0, round((total - free) / MB, 1))


@contextmanager
def ray_reporting_memory(memory_dir: Path, cpus: int | None) -> Iterator[None]:
    """An embedded Ray whose worker processes report their actors' memory into `memory_dir` (the job then
    uses this session, `pipelines.job.ray_session`); shut down at the end. Reports left in `memory_dir` by
    an earlier check in the same `--workdir` are removed first (they would count as this job's actors)."""
    import ray

    shutil.rmtree(memory_dir, ignore_errors=True)
    memory_dir.mkdir(parents=True)
    # the workers import this module (by name) for the hook: give them the repository's root
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    runtime_env = {"worker_process_setup_hook": report_actor_memory,
                   "env_vars": {MEMORY_DIR_ENV: str(memory_dir), "PYTHONPATH": python_path}}
    ray.init(num_cpus=cpus or os.cpu_count(), num_gpus=torch.cuda.device_count(), include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING, runtime_env=runtime_env)
    import ray.data  # noqa: F401 - it configures its loggers on first import: quiet them after that

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        yield
    finally:
        ray.shutdown()


def spans_overlap(timeline: dict, a: str, b: str) -> float:
    """Seconds during which stage `a`'s span (first start to last end) and stage `b`'s overlap."""
    if a not in timeline or b not in timeline:
        return 0.0
    start = max(timeline[a]["first_start"], timeline[b]["first_start"])
    return max(0.0, min(timeline[a]["last_end"], timeline[b]["last_end"]) - start)


def run_check_job(name: str, job: JobConfig, memory_dir: Path, cpus: int | None) -> dict:
    """Run `job` on an embedded Ray whose actors report their memory, and sum it up as one result row."""
    with ray_reporting_memory(memory_dir, cpus), DeviceMemorySampler() as device:
        placed = placement(job, cluster_nodes()).stages  # as run_ray plans it
        summary = run_job(job)
    actors = sorted((json.loads(p.read_text()) for p in memory_dir.glob("*.json")),
                    key=lambda a: (a["stage"], a["pid"]))
    run, timeline = summary["this_run"], summary["timeline"]
    answer_span = timeline["answer"]["last_end"] - timeline["answer"]["first_start"] if "answer" in timeline \
        else 0.0

    def stage_peak(stage: str, key: str) -> float | None:
        values = [a[key] for a in actors if a["stage"] == stage]
        return max(values) if values else None

    return {
        "case": name, "rows": run["rows"], "errors": run["error"], "seconds": run["wall_seconds"],
        "rows_per_s": run["rows_per_second"],
        "answer_rows_per_s": round(run["rows"] / answer_span, 3) if answer_span > 0 else None,
        "encode_answer_overlap_s": round(spans_overlap(timeline, "encode", "answer"), 3),
        "encode_gpu_max_allocated_mb": stage_peak("encode", "gpu_max_allocated_mb"),
        "answer_gpu_max_allocated_mb": stage_peak("answer", "gpu_max_allocated_mb"),
        "device_gpu_used_peak_mb": device.peak_mb,
        "placement": {stage: {"num_gpus": r.num_gpus, "num_cpus": r.num_cpus, "pool_size": r.pool_size}
                      for stage, r in placed.items()},
        "actors": actors,
        "timeline": timeline,
    }  # fmt: skip


def vllm_unavailable() -> str | None:
    """Why the vLLM engine cannot be checked here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (this check measures vLLM on a GPU; its CPU build is covered by the tests)"
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except Exception as err:  # an import of vllm fails in many ways: missing, or built for another torch
        return f"vllm cannot be imported: {type(err).__name__}: {err}"
    if not current_platform.is_cuda():
        return f"this vllm build runs on {current_platform.device_type!r}, not CUDA"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny geometry (runs on the CPU)")
    parser.add_argument("--workdir", type=Path, default=CACHE_DIR / "gpu_check",
                        help="checkpoint, clips, outputs and the vLLM export (~30 GB for the 7B)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where gpu.json goes")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--questions", type=int, default=4, help="questions per clip")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills of each length")
    parser.add_argument("--cpus", type=int, help="CPUs for Ray (default: the machine's)")
    args = parser.parse_args(argv)
    for key in ("clips", "questions", "new_tokens", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("the 7B geometry needs a CUDA GPU (about 15 GB of bf16 weights, built there); "
                     "on the CPU run it with --tiny")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    geometry = "tiny" if args.tiny else "7b"
    workdir = args.workdir.resolve()
    steps: dict[str, float] = {}

    def step_done(name: str, since: float) -> None:
        steps[name] = round(time.perf_counter() - since, 2)

    t = time.perf_counter()
    model_dir = workdir / f"model-{geometry}"
    model, built = build_checkpoint(model_dir, geometry, device)
    step_done("checkpoint", t)
    t = time.perf_counter()
    per_frame = tokens_per_frame(model.config)
    visual = {"full": FRAMES * per_frame, "visionzip": FRAMES * (DOMINANT + CONTEXTUAL)}
    prefill = prefill_seconds(model, {name: n + TEXT_TOKENS for name, n in visual.items()}, args.repeats)
    step_done("prefill", t)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    manifest = write_clips(workdir / "clips", args.clips, args.questions)
    common = (f"data.manifest={manifest}", f"model.path={model_dir}", "model.dtype=bfloat16",
              "model.build_tiny=false", "output.overwrite=true",
              f"pipeline.generation.max_new_tokens={args.new_tokens}")
    engines = {"hf": (), "vllm": ("pipeline.engine=vllm", "compression.positions=compact",  # vLLM: no ids
                                  "pipeline.vllm.enforce_eager=true",
                                  f"pipeline.vllm.export_dir={workdir / 'vllm'}")}
    rows = [{"case": "checkpoint", "geometry": geometry, "device": str(device), **built,
             "seconds": steps["checkpoint"]},
            *({"case": f"prefill_{name}", "visual_tokens": n, "tokens": n + TEXT_TOKENS,
               "seconds": round(prefill[name], 5)} for name, n in visual.items())]
    failed = []
    for engine, overrides in engines.items():
        name = f"job_{engine}"
        skipped = vllm_unavailable() if engine == "vllm" else None
        if skipped:
            rows.append({"case": name, "skipped": skipped})
            continue
        t = time.perf_counter()
        job = compose_job(*common, *overrides, f"output.path={workdir / name / 'predictions.jsonl'}")
        try:
            rows.append(run_check_job(name, job, workdir / name / "actor_memory", args.cpus))
        except Exception as err:  # the check goes on and records it: the JSON says what failed
            logging.getLogger(__name__).exception("%s failed", name)
            rows.append({"case": name, "error": f"{type(err).__name__}: {err}"})
            failed.append(name)
        step_done(name, t)
    steps["total"] = round(time.perf_counter() - started, 2)

    ratios = {"prefill_full_over_visionzip": prefill["full"] / prefill["visionzip"],
              **{f"steps_s_{k}": v for k, v in steps.items()}}
    goals = {"total_seconds": goal(steps["total"], "<=", TIME_GOAL_S)}
    hf = next(r for r in rows if r["case"] == "job_hf")
    if "errors" in hf:
        goals["job_hf_error_rows"] = goal(hf["errors"], "<=", 0)
    print(f"{geometry} geometry ({built['parameters']:,} parameters) on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print_table(rows, ["case", "rows", "errors", "seconds", "rows_per_s", "encode_answer_overlap_s",
                       "encode_gpu_max_allocated_mb", "answer_gpu_max_allocated_mb",
                       "device_gpu_used_peak_mb", "skipped", "error"])
    print_ratios(ratios, goals)
    print(f"wrote {write_result('gpu', rows, ratios, goals, folder=args.results)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
