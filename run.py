"""The batch job: `python run.py data.manifest=q.jsonl [overrides]` (conf/config.yaml; see docs/running.md).

Exit status (`pipelines.cli`): 0 done; 1 the job ran but failed (more error rows than `max_error_fraction`,
or all of them); 2 nothing ran (a config mistake, or a data, model, output or Ray problem, printed as one
message); 3 the rows are written but the scoring failed; 130 interrupted (Ctrl-C: the rows so far are saved,
a rerun resumes).

The pipeline's modules (torch, transformers) take seconds to import: they are imported after the console's
first line, in the functions below.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

QUIET_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "--shell-completion", "-sc"}


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    from pipelines.cli import exit_if_failed, files_written, plain_errors, stop_on_interrupt
    from pipelines.config import to_job_config
    from pipelines.job import run_job
    from pipelines.summary import format_summary

    with plain_errors(), stop_on_interrupt(cfg):
        summary = run_job(to_job_config(cfg))
    print(format_summary(summary))
    print(files_written(summary))
    exit_if_failed(summary)
    return summary


def start(argv: list[str]) -> None:
    """Say that the job starts, import the pipeline, refuse a config mistake (`check_command_line`), run."""
    if not QUIET_FLAGS & set(argv):
        print("vzpipe: loading the pipeline (torch, transformers: a few seconds) ...", file=sys.stderr,
              flush=True)
    from pipelines.cli import check_command_line
    from pipelines.config import JobConfig, register

    register()
    check_command_line("config", JobConfig, argv)
    main()


if __name__ == "__main__":
    start(sys.argv[1:])
