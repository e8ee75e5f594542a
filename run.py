"""vzpipe batch job entry point: `python run.py data.manifest=q.jsonl [overrides]` (see conf/)."""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

from pipelines.config import register, to_job_config
from pipelines.evaluate import evaluate, format_table, read_rows
from pipelines.job import run_job

register()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    job = to_job_config(cfg)
    summary = run_job(job)
    if job.demo.enabled:
        print_rows(summary["output"])
    logging.getLogger("vzpipe").info("summary:\n%s", json.dumps(summary, indent=2))
    return summary


def print_rows(output: str) -> None:
    """Each row's prediction beside its ground truth, then accuracy per question type."""
    rows = read_rows(output)
    for row in rows:
        truth = f"{row['prediction']!r:>10} (truth {row['answer']!r})"
        result = f"ERROR {row['error']}" if row["error"] else truth
        print(f"{row['id']:>14}  {row['visual_tokens_kept']} of {row['visual_tokens_full']} visual tokens  "
              f"{row['question']!r:<48} -> {result}")
    print(format_table(evaluate(rows)))


if __name__ == "__main__":
    main()
