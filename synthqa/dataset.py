"""The synthetic clips as a dataset on disk: mp4 files and a manifest the batch job reads.

Training reads clips in memory (`synthqa.clips`), but answer quality is measured through the whole job,
decoding included, so held-out sets are written as real H.264 files. Manifest rows have
`id = "<clip>-<type>"` and `category = <type>`, so scores per question type (`pipelines.score`) come from
the column.

    python -m synthqa.dataset .cache/synth/val500 --set val500
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pipelines.files import write_jsonl
from synthqa.clips import synth_sample

# Held-out sets: (seed, clips); 5 questions per clip. Training seeds start at 0 and stay far below these.
HELDOUT = {"val500": (1_000_500, 100), "test2000": (1_002_000, 400)}


def write_frames(path: str | Path, frames: np.ndarray, fps: int = 8, crf: int = 12) -> Path:
    """Frames uint8 [T, H, W, 3] -> H.264 mp4 (near-lossless crf, one encoder thread)."""
    path = Path(path)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        # one encoder thread, lookahead included
        stream.codec_context.thread_count = 1
        stream.options = {"preset": "veryfast", "crf": str(crf), "threads": "1",
                          "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0"}
        mux_frames(out, stream, frames, fps)
    return path


def mux_frames(out: av.container.OutputContainer, stream: av.VideoStream, frames: np.ndarray,
               fps: int) -> None:
    """Encode RGB frames [T, H, W, 3] into `stream` at `fps`, one frame per tick, and flush it."""
    for n, img in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        frame.pts, frame.time_base = n, Fraction(1, fps)
        out.mux(stream.encode(frame))
    out.mux(stream.encode())


def write_dataset(folder: str | Path, seed: int, clips: int) -> Path:
    """Write `clips` mp4 files and `manifest.jsonl` with one question of every type per clip.

    Manifest rows: `id` (`"<clip>-<type>"`), `video` (relative to the manifest), `question`, `answer`,
    `category` (the question type, for scores per type).
    Returns the manifest's path.
    """
    if clips < 1:
        raise ValueError(f"clips must be >= 1, got {clips}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(clips):
        sample = synth_sample(seed, index)
        name = f"clip_{index:05d}.mp4"
        write_frames(folder / name, sample.clip.frames)
        rows += [
            {"id": f"{index:05d}-{q.type}", "video": name, "question": q.question, "answer": q.answer,
             "category": q.type}
            for q in sample.questions
        ]
    return write_jsonl(folder / "manifest.jsonl", rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic video-QA clips (mp4) and their manifest.")
    parser.add_argument("folder", help="where to write the mp4 files and manifest.jsonl")
    parser.add_argument("--set", choices=sorted(HELDOUT), help="a fixed held-out set (seed and size)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--clips", type=int, default=None, help="5 questions per clip")
    args = parser.parse_args(argv)
    if args.set:
        seed, clips = HELDOUT[args.set]
    elif args.seed is not None and args.clips is not None:
        seed, clips = args.seed, args.clips
    else:
        parser.error("give --set, or both --seed and --clips")
    print(write_dataset(args.folder, seed, clips))


if __name__ == "__main__":
    main()
