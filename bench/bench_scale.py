"""Scale benchmark: one job of 20,000 questions, and what its driver keeps as the rows go by (issue 25).

The job (`pipelines.job.run_job`, as `run.py` runs it) runs in this process, which is its driver, on an
embedded Ray with 2 CPUs, over 1,000 short generated clips (16 frames, 128x96, cached under
`bench/.cache/`) with 20 questions each, 2 frames decoded per clip, answered by the tiny random
Video-LLaVA (`model=tiny`'s recipe) with one new token: the plumbing of a big job at full rate, the
model's work kept small. (20 questions a clip, not 100: rows reach the driver a whole answer batch at a
time, 4 clips, and 80-row steps keep the 10% windows below smooth.) A thread samples, every `--every`
seconds, the driver's RSS and the rows the output file holds (its lines, counted as they are appended):

- memory: the driver's RSS when 10%, 50% and 100% of the rows are written; goal: it grows by less than
  `--bound-mb` (64 MB) from 10% to 100%. What the driver keeps grows with the rows: every output row
  (`OutputSink.rows`, read by the summary and the scoring at the end, with its id index and done ids;
  `run_job`'s `written` list holds the same dicts), while the manifest's questions are all read before
  the first row and the timeline keeps one interval per batch, not per row. So the growth is O(rows),
  reported per row too (`rss_growth_per_row_kb`); the bound holds for 20,000 rows.
- rate: rows per second over the first 10% of the rows (from the first row written) and over the last
  10%; goal: the last within 20% of the first (`last_over_first_10pct_rate` in [0.8, 1.2]). Each 10% of
  the rows has its rate in the table. The end of a job is the pipeline's drain: decode runs ahead of
  answering (its clips wait in the object store) and finishes first, then encode, and answering has the
  CPUs to itself for the last `answer_alone_at_end_s`: on a machine whose cores the three actors share,
  the last 10% can run faster than the first without anything on the driver changing.
- `peak`: the RSS peak of the whole run, which comes after the last row (the summary, the Gantt chart).

    .venv/bin/python -m bench.bench_scale [--questions 20000] [--per-clip 20]   (about 1.5 minutes)
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `stages`, `pipelines` and `bench` importable
    sys.path.insert(0, str(ROOT))

from bench.common import CACHE_DIR, goal, print_ratios, print_table, status_mb, write_result  # noqa: E402
from pipelines.config import compose_job  # noqa: E402
from pipelines.files import write_jsonl  # noqa: E402
from pipelines.job import run_job  # noqa: E402
from synthqa.sample_videos import write_video  # noqa: E402

CLIP_FRAMES, CLIP_WIDTH, CLIP_HEIGHT = 16, 128, 96
QUESTIONS = (
    "What is moving in the video?", "Which color is the square?", "Where does the object move?",
    "How many objects are there?", "Is the circle moving left or right?", "Describe the scene in detail.",
)  # fmt: skip
FRACTIONS = (0.1, 0.5, 1.0)


def make_manifest(questions: int, per_clip: int) -> Path:
    """`questions` rows over ceil(questions / per_clip) short clips (generated once, cached)."""
    folder = CACHE_DIR / f"scale_{CLIP_WIDTH}x{CLIP_HEIGHT}_{CLIP_FRAMES}f"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for clip in range(math.ceil(questions / per_clip)):
        path = folder / f"clip_{clip}.mp4"
        if not path.exists():
            write_video(path, num_frames=CLIP_FRAMES, width=CLIP_WIDTH, height=CLIP_HEIGHT)
        asked = min(per_clip, questions - clip * per_clip)
        rows += [{"id": f"c{clip}-q{q}", "video": path.name, "question": QUESTIONS[q % len(QUESTIONS)]}
                 for q in range(asked)]
    manifest = folder / f"manifest_{questions}_{per_clip}.jsonl"
    write_jsonl(manifest, rows)
    return manifest


@dataclass
class Sample:
    seconds: float  # since the job started
    rows: int  # lines in the output file
    rss_mb: float  # the driver's RSS


class DriverSampler:
    """A thread that records, every `every` seconds, this process's RSS and the output file's line count
    (read incrementally: only the bytes appended since the last look)."""

    def __init__(self, output: Path, every: float) -> None:
        self.output, self.every = output, every
        self.samples: list[Sample] = []
        self._offset, self._rows = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DriverSampler:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        if self.output.exists():
            with self.output.open("rb") as f:
                f.seek(self._offset)
                appended = f.read()
            self._offset += len(appended)
            self._rows += appended.count(b"\n")
        self.samples.append(Sample(time.perf_counter() - self._start, self._rows, status_mb("VmRSS")))


def first_at(samples: list[Sample], rows: float) -> Sample:
    """The first sample whose row count reached `rows`."""
    return next(s for s in samples if s.rows >= rows)


def rate(start: Sample, end: Sample) -> float:
    return (end.rows - start.rows) / (end.seconds - start.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=20_000)
    parser.add_argument("--per-clip", type=int, default=20, help="questions per clip")
    parser.add_argument("--every", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--bound-mb", type=float, default=64.0,
                        help="the memory goal: the driver's RSS growth from 10%% to 100%% of the rows")
    args = parser.parse_args()
    if args.questions < 10 or args.per_clip < 1:
        parser.error("--questions must be >= 10 and --per-clip >= 1")
    manifest = make_manifest(args.questions, args.per_clip)
    with tempfile.TemporaryDirectory(prefix="bench_scale.") as tmp:
        output = Path(tmp) / "predictions.jsonl"
        job = compose_job(
            f"data.manifest={manifest}", "model=tiny", f"model.path={CACHE_DIR / 'tiny-video-llava'}",
            f"output.path={output}", "runner=ray", "ray.num_cpus=2", "ray.num_gpus=0",
            "ray.object_store_memory=300000000", "decode.num_frames=2",
            "pipeline.generation.max_new_tokens=1",
        )  # fmt: skip
        before = status_mb("VmRSS")
        with DriverSampler(output, args.every) as sampler:
            summary = run_job(job)
        samples = sampler.samples
    run = summary["this_run"]
    n = run["rows"]
    if n != args.questions or run["error"]:
        raise SystemExit(f"the job wrote {n} rows ({run['error']} errors), expected {args.questions} answers")

    first = first_at(samples, 1)
    marks = [first, *(first_at(samples, k / 10 * n) for k in range(1, 11))]  # the first row, then each 10%
    decile_rates = [rate(start, end) for start, end in pairwise(marks)]
    at = {fraction: marks[round(fraction * 10)] for fraction in FRACTIONS}
    rows = [
        {"case": "before_job", "rows": 0, "seconds": 0.0, "rss_mb": round(before, 1), "rows_per_s": None},
        {"case": "first_row", "rows": first.rows, "seconds": round(first.seconds, 2),
         "rss_mb": round(first.rss_mb, 1), "rows_per_s": None},
        *({"case": f"rows_{10 * k}pct", "rows": mark.rows, "seconds": round(mark.seconds, 2),
           "rss_mb": round(mark.rss_mb, 1), "rows_per_s": round(decile_rate, 1)}
          for k, (mark, decile_rate) in enumerate(zip(marks[1:], decile_rates, strict=True), start=1)),
        {"case": "peak", "rows": n, "seconds": round(samples[-1].seconds, 2),
         "rss_mb": round(max(s.rss_mb for s in samples), 1), "rows_per_s": None},
    ]  # fmt: skip
    growth = at[1.0].rss_mb - at[0.1].rss_mb
    timeline = summary["timeline"]
    ratios = {
        "rss_growth_10_to_100_mb": growth,
        "rss_growth_per_row_kb": growth * 1024 / (at[1.0].rows - at[0.1].rows),
        "rows_per_s_first_10pct": decile_rates[0],
        "rows_per_s_last_10pct": decile_rates[-1],
        "last_over_first_10pct_rate": decile_rates[-1] / decile_rates[0],
        # the drain: answering goes on alone (decode and encode done) this long at the end
        "answer_alone_at_end_s": timeline["answer"]["last_end"] - timeline["encode"]["last_end"],
        "decode_done_before_answer_s": timeline["answer"]["last_end"] - timeline["decode"]["last_end"],
        "rows_per_s_whole_job": run["rows_per_second"],
    }
    goals = {
        "rss_growth_10_to_100_mb": goal(growth, "<", args.bound_mb),
        "last_over_first_10pct_rate_min": goal(ratios["last_over_first_10pct_rate"], ">=", 0.8),
        "last_over_first_10pct_rate_max": goal(ratios["last_over_first_10pct_rate"], "<=", 1.2),
    }
    print(f"{n} questions on {math.ceil(n / args.per_clip)} clips ({args.per_clip} per clip), tiny model, "
          f"{job.decode.num_frames} frames, {job.pipeline.generation.max_new_tokens} new token, 2 Ray CPUs")
    print_table(rows)
    print_ratios(ratios, goals)
    print(f"wrote {write_result('scale', rows, ratios, goals)}")


if __name__ == "__main__":
    main()
