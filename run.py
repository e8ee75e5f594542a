"""The batch job: `python run.py data.manifest=q.jsonl [overrides]` (conf/config.yaml; see the README)."""

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
    summary = run_job(to_job_config(cfg))
    logging.getLogger("vzpipe").info("summary:\n%s", json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
