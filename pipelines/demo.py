"""Sample data for `make demo`: generated videos and a manifest with several questions per video, plus
one row pointing at a truncated file, which must come out as an error row while the rest completes."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.config import DemoConfig
from pipelines.sample_videos import write_truncated, write_video

QUESTIONS = (
    "What is moving in the video?",
    "Describe the video in detail.",
    "What color is the bottom of the frame?",
    "How many objects are there?",
)


def write_demo_data(demo: DemoConfig, manifest: str | Path) -> Path:
    """Write the videos into `demo.folder` and the manifest to `manifest` (idempotent: same bytes)."""
    folder = Path(demo.folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in range(demo.videos):
        video = folder / f"video_{v}.mp4"
        if not video.exists():
            write_video(video, num_frames=50 + 25 * v, width=320, height=240, fps=25)
        for q in range(demo.questions_per_video):
            question = QUESTIONS[q % len(QUESTIONS)]
            rows.append({"id": f"video_{v}-q{q}", "video": video.name, "question": question})
    if demo.broken_video and demo.videos:
        broken = folder / "broken.mp4"
        write_truncated(folder / "video_0.mp4", broken, keep=0.5)
        rows.append({"id": "broken-q0", "video": broken.name, "question": QUESTIONS[0]})
    manifest = Path(manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest
