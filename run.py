"""The batch job: `python run.py data.manifest=q.jsonl [overrides]` (conf/config.yaml; see the README).

Exit status: 0 done; 1 the job ran but failed (more error rows than `max_error_fraction`, or all of them);
2 nothing ran (a config, data, model, output or Ray problem, printed as one message).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipelines.cli import exit_if_failed, plain_errors
from pipelines.config import register, to_job_config
from pipelines.job import run_job
from pipelines.summary import format_summary

register()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    with plain_errors():
        summary = run_job(to_job_config(cfg))
    print(format_summary(summary))
    exit_if_failed(summary)
    return summary


if __name__ == "__main__":
    main()
