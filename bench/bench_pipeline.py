"""Pipeline benchmark: do the Ray stages truly overlap?

With the tiny model on 32 generated videos (one question each), side by side in one run:
- `sequential`: decode, encode and answer one video after another in this process (`runner=local`
  with batches of one video), the baseline without overlap;
- `ray`: the Ray Data pipeline (`runner=ray`, an actor pool per stage, streaming), with Ray already
  started (`ray_start` is reported apart);
- each stage alone over the same videos in this process, as a Ray actor with num_cpus <= 1 runs it
  (one torch thread); the slowest of them bounds what a pipeline can reach.
Every case runs torch with one thread, as Ray gives an actor with num_cpus <= 1, and decodes with one
FFmpeg thread (`decode.threads=1`, the default), so that each stage's rate alone is what one core gives.
(With FFmpeg's own thread count the decode actor oversubscribed the 2 cores: 0.62 instead of 0.85.)

Rates: a run has a fixed start-up cost (Ray starts an actor process per stage, which imports torch and
loads the model: seconds, while the tiny model's stages take milliseconds per video), so each runner
also runs the 32 videos over twice (64 rows, a new id each) and four times (128 rows); the marginal
rate 64 / (t128 - t64) is its throughput once started - what a job over thousands of videos sees.
End-to-end rates for the 32 videos are reported too. `ray_one_gpu` is the same pipeline with one GPU
declared to Ray (`ray.num_gpus=1`, the model on the CPU): the placement a one-GPU box gets, encode and
answer sharing the GPU by fractions. Goals, on marginal rates: ray >= 0.8 x the slowest stage alone
(with and without the declared GPU), and ray > sequential.

    .venv/bin/python -m bench.bench_pipeline [--videos 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `stages`, `pipelines` and `bench` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import CACHE_DIR, goal, print_table, write_result  # noqa: E402
from pipelines.config import JobConfig, compose_job  # noqa: E402
from pipelines.files import write_jsonl  # noqa: E402
from pipelines.job import ray_session  # noqa: E402
from pipelines.manifest import group_by_video, read_manifest  # noqa: E402
from pipelines.runner import batches_of, item_rows, run_local, run_ray, stage_specs  # noqa: E402
from stages.testing import build_tiny_video_llava  # noqa: E402
from synthqa.sample_videos import write_video  # noqa: E402

QUESTION = "What is moving in the video?"


def make_inputs(videos: int) -> tuple[Path, Path]:
    folder = CACHE_DIR / "pipeline_640x360_150f"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in range(videos):
        path = folder / f"video_{v}.mp4"
        if not path.exists():
            write_video(path, num_frames=150, width=640, height=360, fps=25)
        rows.append({"id": f"v{v}", "video": path.name, "question": QUESTION})
    manifest = folder / f"manifest_{videos}.jsonl"
    write_jsonl(manifest, rows)
    return manifest, build_tiny_video_llava(CACHE_DIR / "tiny-video-llava")


def job_config(manifest: Path, model: Path, *overrides: str) -> JobConfig:
    return compose_job(
        f"data.manifest={manifest}", f"model.path={model}", "model.dtype=float32",
        f"output.path={tempfile.gettempdir()}/unused.jsonl", "pipeline.generation.max_new_tokens=16",
        "ray.num_cpus=2", *overrides,
    )


def time_run(runner, job: JobConfig, rows: list[dict]) -> float:
    done: list[dict] = []
    start = time.perf_counter()
    runner(job, rows, done.append)
    seconds = time.perf_counter() - start
    assert len(done) == len(rows) and all(r.get("error") is None for r in done), "a video failed"
    return seconds


def stage_alone_seconds(job: JobConfig, rows: list[dict]) -> dict[str, float]:
    """Each stage over all videos in this process, fed by the previous stage's output (computed by it,
    timed apart)."""
    seconds: dict[str, float] = {}
    batches = batches_of(rows, job.resources.decode.batch_size)
    for spec in stage_specs(job):
        stage = spec.cls(**spec.kwargs)
        start = time.perf_counter()
        batches = [stage(batch) for batch in batches]
        seconds[spec.name] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest, model = make_inputs(args.videos)
    sequential_job = job_config(manifest, model, "runner=local", "resources.decode.batch_size=1")
    ray_job = job_config(manifest, model, "runner=ray")
    # one GPU declared to Ray (the model stays on the CPU): encode and answer share it by fractions
    one_gpu_job = job_config(manifest, model, "runner=ray", "ray.num_gpus=1", "model.device=cpu")
    rows = item_rows(group_by_video(read_manifest(manifest)))
    twice, four_times = (
        [{**row, "ids": [f"{i}-{k}" for i in row["ids"]]} for k in range(copies) for row in rows]
        for copies in (2, 4)
    )
    n = len(rows)

    times: dict[str, list[float]] = {}
    alone: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    for _ in range(args.repeats):  # alternate the cases so drifts of a shared machine cancel out
        record("sequential", time_run(run_local, sequential_job, rows))
        record("sequential_twice", time_run(run_local, sequential_job, twice))
        record("sequential_four_times", time_run(run_local, sequential_job, four_times))
        for name, s in stage_alone_seconds(ray_job, rows).items():
            alone.setdefault(name, []).append(s)
        start = time.perf_counter()
        with ray_session(ray_job):
            record("ray_start", time.perf_counter() - start)
            record("ray", time_run(run_ray, ray_job, rows))
            record("ray_twice", time_run(run_ray, ray_job, twice))
            record("ray_four_times", time_run(run_ray, ray_job, four_times))
        with ray_session(one_gpu_job):
            record("ray_one_gpu", time_run(run_ray, one_gpu_job, rows))
            record("ray_one_gpu_twice", time_run(run_ray, one_gpu_job, twice))
            record("ray_one_gpu_four_times", time_run(run_ray, one_gpu_job, four_times))

    med = {k: statistics.median(v) for k, v in times.items()}
    med_alone = {k: statistics.median(v) for k, v in alone.items()}
    slowest = max(med_alone, key=med_alone.get)
    rate = {name: n / med_alone[name] for name in med_alone}
    for runner in ("sequential", "ray", "ray_one_gpu"):
        rate[runner] = n / med[runner]
        rate[f"{runner}_marginal"] = 2 * n / (med[f"{runner}_four_times"] - med[f"{runner}_twice"])
    table = [
        {"case": "sequential", "rows": n, "seconds": med["sequential"], "rows_per_s": rate["sequential"],
         "marginal_rows_per_s": rate["sequential_marginal"]},
        *({"case": f"{name}_alone", "rows": n, "seconds": med_alone[name], "rows_per_s": rate[name],
           "marginal_rows_per_s": None} for name in med_alone),
        {"case": "ray", "rows": n, "seconds": med["ray"], "rows_per_s": rate["ray"],
         "marginal_rows_per_s": rate["ray_marginal"]},
        {"case": "ray_one_gpu", "rows": n, "seconds": med["ray_one_gpu"], "rows_per_s": rate["ray_one_gpu"],
         "marginal_rows_per_s": rate["ray_one_gpu_marginal"]},
        {"case": "ray_start", "rows": 0, "seconds": med["ray_start"], "rows_per_s": None,
         "marginal_rows_per_s": None},
    ]
    ratios = {
        "ray_over_slowest_stage": rate["ray_marginal"] / rate[slowest],
        "ray_over_sequential": rate["ray_marginal"] / rate["sequential_marginal"],
        "ray_over_sequential_end_to_end_32": rate["ray"] / rate["sequential"],
        "ray_one_gpu_over_slowest_stage": rate["ray_one_gpu_marginal"] / rate[slowest],
    }
    goals = {
        "ray_over_slowest_stage": goal(ratios["ray_over_slowest_stage"], ">=", 0.8),
        "ray_over_sequential": goal(ratios["ray_over_sequential"], ">", 1.0),
        "ray_one_gpu_over_slowest_stage": goal(ratios["ray_one_gpu_over_slowest_stage"], ">=", 0.8),
    }
    print_table(table)
    print(f"slowest stage alone: {slowest}")
    for name, value in ratios.items():
        verdict = f"  (goal {goals[name]['op']} {goals[name]['target']}: " + (
            "met)" if goals[name]["met"] else "NOT met)") if name in goals else ""
        print(f"{name}: {value:.3f}{verdict}")
    path = write_result("pipeline", table, ratios, goals)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
