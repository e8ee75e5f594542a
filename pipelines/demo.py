"""Sample data for `make demo`: held-out clips of the synthetic video QA (whose answers the shipped
`models/synth` model was trained to give), one question of every type per clip with its ground truth,
plus one row pointing at a truncated file, which must come out as an error row while the rest completes."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.config import DemoConfig
from pipelines.sample_videos import write_truncated
from pipelines.synth import write_dataset

DEMO_SEED = 7_000_000  # apart from the training and held-out seeds


def write_demo_data(demo: DemoConfig, manifest: str | Path) -> Path:
    """Write `demo.videos` clips into `demo.folder` and the manifest to `manifest`."""
    folder = Path(demo.folder)
    written = write_dataset(folder, DEMO_SEED, demo.videos)
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    if demo.broken_video:
        broken = folder / "broken.mp4"
        write_truncated(folder / rows[0]["video"], broken, keep=0.5)
        rows.append({"id": "broken-color", "video": broken.name, "question": rows[0]["question"],
                     "answer": rows[0]["answer"]})
    manifest = Path(manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest
