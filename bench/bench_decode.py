"""Decode benchmark: sampling a few frames from long videos vs decoding every frame, both backends.

Videos: generated H.264 (libx264 superfast, crf 28, 2 B-frames, keyframe every 2 s, 25 fps) at 640x360
and 1280x720, 1 and 10 minutes long, cached under bench/.cache/. Cases per video: 8 and 64 uniform
frames with each backend, and `full` = decode every frame with PyAV (keeping the same 8), the
baseline a reader without seeking pays.

Each measurement runs in a fresh subprocess so its peak RSS belongs to that case alone: the child
imports the decoders (no torch), resets its RSS high-water mark, then times only the decode call;
peak = the high-water mark during the call (VmHWM), growth = peak - RSS before the call. Runs
alternate over videos and cases, repeated; the table shows medians. Goals (issue 3): 8 frames from
the 10-minute 720p video >= 20x faster than `full`; peak RSS when sampling the 10-minute file within
1.2x of the 1-minute file.

    .venv/bin/python -m bench.bench_decode [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `stages`, `pipelines` and `bench` importable
    sys.path.insert(0, str(ROOT))

FPS = 25
SIZES = [(640, 360), (1280, 720)]
CASES = ["pyav_8", "decord_8", "pyav_64", "decord_64", "full"]


def video_path(width: int, height: int, seconds: int) -> Path:
    from bench.common import CACHE_DIR

    path = CACHE_DIR / f"decode_{width}x{height}_{seconds}s_{FPS}fps.mp4"
    if not path.exists():
        from pipelines.files import atomic_path
        from synthqa.sample_videos import write_video

        print(f"generating {path.name} (once; cached) ...", flush=True)
        with atomic_path(path) as partial:
            write_video(
                partial,
                seconds * FPS,
                width,
                height,
                FPS,
                preset="superfast",
                crf=28,
                bframes=2,
                gop=2 * FPS,
                threads=2,
            )
    return path


# ---------------------------------------------------------------- child: one measurement


def _child(spec: dict) -> dict:
    """Run one case in this fresh process; report its decode seconds and peak RSS."""
    import av
    import decord  # noqa: F401 - imported before timing, like a worker that has been running a while
    import numpy as np

    import stages.decode_decord  # noqa: F401
    import stages.decode_pyav  # noqa: F401
    from bench.common import reset_peak_rss, status_mb
    from stages.decode import even_spread, read_frames

    path, case = spec["video"], spec["case"]
    rss_before = reset_peak_rss()
    t0 = time.perf_counter()
    if case == "full":
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_type = "AUTO"
            wanted = set(even_spread(0, stream.frames - 1, 8).tolist())
            kept = [
                f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(stream)) if i in wanted
            ]
        frames = np.stack(kept)
    else:
        backend, n = case.split("_")
        frames = read_frames(path, num_frames=int(n), backend=backend).frames
    seconds = time.perf_counter() - t0
    peak = status_mb("VmHWM")
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": rss_before, "frames": len(frames)}


def _measure(video: Path, case: str) -> dict:
    spec = json.dumps({"video": str(video), "case": case})
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", spec],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    if proc.returncode:
        raise RuntimeError(f"{case} on {video.name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- parent: the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 s and 60 s videos, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    from bench.common import goal, print_table, write_result

    short, long = (10, 60) if args.quick else (60, 600)
    repeats = args.repeats or (1 if args.quick else 3)
    videos = {(w, h, s): video_path(w, h, s) for (w, h) in SIZES for s in (short, long)}
    samples: dict[tuple, list[dict]] = {(v, c): [] for v in videos for c in CASES}
    for rep in range(repeats):  # alternate videos and cases so slow drifts hit all of them alike
        for key, path in videos.items():
            for case in CASES:
                samples[(key, case)].append(_measure(path, case))
        print(f"repeat {rep + 1}/{repeats} done", flush=True)

    rows = []
    for (key, case), runs in samples.items():
        rows.append(
            {
                "video": _label(*key),
                "case": case,
                "seconds": statistics.median(r["seconds"] for r in runs),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                "rss_growth_mb": statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in runs),
                "file_mb": round(videos[key].stat().st_size / 2**20, 1),
            }
        )
    cell = {(r["video"], r["case"]): r for r in rows}

    ratios = {}
    for w, h in SIZES:
        lng, sht = _label(w, h, long), _label(w, h, short)
        for case in CASES[:-1]:
            ratios[f"full_over_{case}_{h}p_long"] = cell[lng, "full"]["seconds"] / cell[lng, case]["seconds"]
            ratios[f"rss_long_over_short_{case}_{h}p"] = (
                cell[lng, case]["peak_rss_mb"] / cell[sht, case]["peak_rss_mb"]
            )
        for n in (8, 64):
            ratios[f"decord_over_pyav_{n}_{h}p_long"] = (
                cell[lng, f"decord_{n}"]["seconds"] / cell[lng, f"pyav_{n}"]["seconds"]
            )
    rss_worst = max(v for k, v in ratios.items() if k.startswith("rss_long_over_short"))
    goals = {
        "full_over_pyav_8_720p_long": goal(ratios["full_over_pyav_8_720p_long"], ">=", 20),
        "full_over_decord_8_720p_long": goal(ratios["full_over_decord_8_720p_long"], ">=", 20),
        "rss_long_over_short_worst_sampling_case": goal(rss_worst, "<=", 1.2),
    }
    print_table(rows, ["video", "case", "seconds", "peak_rss_mb", "rss_growth_mb", "file_mb"])
    print()
    for name, value in ratios.items():
        print(f"{name:40s} {value:8.3f}")
    for name, g in goals.items():
        print(f"goal {name}: {g['value']} {g['op']} {g['target']} -> {'met' if g['met'] else 'NOT met'}")
    path = write_result("decode", rows, ratios, goals)
    print(f"wrote {path}")


def _label(width: int, height: int, seconds: int) -> str:
    return f"{width}x{height} {seconds // 60}min" if seconds >= 60 else f"{width}x{height} {seconds}s"


if __name__ == "__main__":
    main()
