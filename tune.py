"""Projector tuning: `python tune.py data.manifest=train.jsonl [overrides]` (conf/tune.yaml; docs/quality.md).

Writes OUT/projector.safetensors, which a batch job loads with `model.projector_path`.
"""

from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import DictConfig

from pipelines.cli import check_command_line, plain_errors
from pipelines.config import TuneJobConfig, register, to_tune_config
from pipelines.tune import run_tune

register()


@hydra.main(config_path="conf", config_name="tune", version_base=None)
def main(cfg: DictConfig) -> dict:
    with plain_errors():
        summary = run_tune(to_tune_config(cfg))
    logging.getLogger("vzpipe").info("tuning summary:\n%s", json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    check_command_line("tune", TuneJobConfig, sys.argv[1:])  # a config mistake: one line, exit 2
    main()
