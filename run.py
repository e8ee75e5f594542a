"""vzpipe batch job entry point: `python run.py data.manifest=q.jsonl [overrides]` (see conf/)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipelines.config import register, to_job_config
from pipelines.job import run_job

register()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    job = to_job_config(cfg)
    summary = run_job(job)
    if job.demo.enabled:
        print_rows(summary["output"], limit=8)
    logging.getLogger("vzpipe").info("summary:\n%s", json.dumps(summary, indent=2))
    return summary


def print_rows(output: str, limit: int) -> None:
    """A few result rows, for a first look at what a job wrote."""
    lines = Path(output).read_text().splitlines() if output.endswith(".jsonl") else []
    for row in map(json.loads, lines[:limit]):
        result = f"ERROR {row['error']}" if row["error"] else repr(row["prediction"])
        print(f"{row['id']:>12}  {row['visual_tokens_kept']} of {row['visual_tokens_full']} visual tokens  "
              f"{row['question']!r} -> {result}")


if __name__ == "__main__":
    main()
