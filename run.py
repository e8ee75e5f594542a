"""vzpipe batch job entry point: `python run.py data.manifest=q.jsonl [overrides]` (see conf/)."""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

from pipelines.config import register, to_job_config
from pipelines.job import run_job

register()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    job = to_job_config(cfg)
    summary = run_job(job)
    logging.getLogger("vzpipe").info("summary:\n%s", json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
