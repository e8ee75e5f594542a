"""`make demo`: the whole batch job on a few synthetic clips, predictions printed beside the truth.

    python -m synthqa.demo +experiment=demo [overrides]

A Hydra app on the job's own config (conf/, `+experiment=demo`): it writes held-out clips of the
synthetic video QA (whose answers the shipped `models/synth` model was trained to give), one question of
every type per clip, plus one row pointing at a truncated file, next to `data.manifest`; runs the job on
them (the Ray pipeline, VisionZip on); then prints every row's prediction beside its ground truth and
the accuracy per question type. The truncated file must come out as one error row while the rest
completes. The batch job itself knows nothing of this: to it the demo is a manifest like any other.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipelines.cli import check_command_line, exit_if_failed, plain_errors
from pipelines.config import JobConfig, register, to_job_config
from pipelines.files import read_jsonl, write_jsonl
from pipelines.job import run_job
from pipelines.score import format_table, read_rows, score_rows
from pipelines.summary import format_summary
from synthqa.dataset import write_dataset
from synthqa.sample_videos import write_truncated

DEMO_SEED = 7_000_000  # apart from the training and held-out seeds
DEMO_CLIPS = 6  # x 5 questions, one of each type

register()


def write_demo_data(manifest: str | Path, clips: int = DEMO_CLIPS, broken_video: bool = True) -> Path:
    """Write `clips` clips (5 questions each) into the folder of `manifest`, and with `broken_video` a
    truncated copy of the first (`broken.mp4`, asked the first clip's colour question), then the manifest
    itself. Returns its path."""
    manifest = Path(manifest)
    folder = manifest.parent
    rows = read_jsonl(write_dataset(folder, DEMO_SEED, clips))
    if broken_video:
        broken = write_truncated(folder / rows[0]["video"], folder / "broken.mp4", keep=0.5)
        rows.append({"id": "broken-color", "video": broken.name, "question": rows[0]["question"],
                     "answer": rows[0]["answer"], "category": rows[0]["category"]})
    return write_jsonl(manifest, rows)


def print_rows(output: str | Path) -> None:
    """Each row's prediction beside its ground truth (an error row: its error), then the scores per
    question type, error rows counted apart from wrong answers."""
    rows = read_rows(output)
    for row in rows:
        if row["error"]:
            print(f"{row['id']:>14}  {row['question']!r:<48} -> ERROR {row['error']}")
        else:
            tokens = f"{row['visual_tokens_kept']} of {row['visual_tokens_full']} visual tokens"
            print(f"{row['id']:>14}  {tokens}  {row['question']!r:<48} -> "
                  f"{row['prediction']!r:>10} (truth {row['answer']!r})")
    print(format_table(score_rows(rows, metric="exact")))


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    with plain_errors():
        job = to_job_config(cfg)
        write_demo_data(job.data.manifest)
        summary = run_job(job)
    print_rows(summary["output"])
    print(format_summary(summary))
    exit_if_failed(summary)
    return summary


if __name__ == "__main__":
    check_command_line("config", JobConfig, sys.argv[1:])  # a config mistake: one line, exit 2
    main()
