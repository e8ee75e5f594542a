"""A whole batch job: check the config, prepare inputs, run the stages, write rows, sum up.

Work is skipped for ids already in the output (resume); every question ends as exactly one row, an
error row when its video or its generation failed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

from pipelines.config import JobConfig, check, job_problems, model_tokens_per_frame
from pipelines.datasets import read_questions
from pipelines.manifest import group_by_video
from pipelines.runner import item_rows, question_fields, question_rows, run_local, run_ray
from pipelines.sink import OutputSink
from pipelines.summary import summarize, write_summary
from stages.model import ModelConfig
from stages.testing import build_tiny_video_llava

log = logging.getLogger(__name__)


def run_job(job: JobConfig) -> dict:
    """Run the job described by a config (from `to_job_config`) and return its summary."""
    check(job_problems(job, prepare_model(job.model)))
    questions = read_questions(job.data, require_question=job.pipeline.task == "qa")
    sink = OutputSink(job.output.path, overwrite=job.output.overwrite)
    pending = [q for q in questions if q.id not in sink.done_ids]
    log.info("%d questions in %s, %d already done in %s", len(questions), job.data.describe(),
             len(questions) - len(pending), sink.path)
    unaskable = [q for q in pending if q.error is not None]  # e.g. the set's video is not there
    for question in unaskable:
        sink.write({**question_fields(question), "error": question.error})
    askable = {q.id: q for q in pending if q.error is None}
    rows = item_rows(group_by_video(list(askable.values())), job.pipeline.choice_prompt)
    start = time.perf_counter()
    with tqdm(total=len(askable), desc="questions", unit="row", file=sys.stderr,
              disable=not askable) as progress:

        def on_video(video_row: dict) -> None:
            for row in question_rows(video_row, askable):
                sink.write(row)
                progress.update(1)

        if rows:
            if job.runner == "local":
                run_local(job, rows, on_video)
            else:
                with ray_session(job):
                    run_ray(job, rows, on_video)
    sink.close()
    summary = summarize(sink.rows, time.perf_counter() - start, rows_this_run=len(pending))
    summary["output"] = str(sink.path)
    summary["summary"] = str(write_summary(summary, sink.path))
    return summary


def prepare_model(model: ModelConfig) -> int:
    """Make `model.path` loadable from any worker (the tiny model built when asked, a local folder made
    absolute) and return its tokens per frame, read from its config before any work starts."""
    local = os.path.expanduser(model.path)
    if model.build_tiny:
        build_tiny_video_llava(local)
    if os.path.isdir(local):  # workers may run in another folder: give them an absolute path
        model.path = os.path.abspath(local)
    return model_tokens_per_frame(model)


@contextmanager
def ray_session(job: JobConfig) -> Iterator[None]:
    """Start an embedded Ray (`ray.address` null) or join a cluster (`auto` or HOST:PORT, starting
    nothing); always disconnect at the end, so the jobs of a Hydra sweep, which run one after another in
    one process, never share a session."""
    import ray
    import torch

    cfg = job.ray
    if ray.is_initialized():
        ray.shutdown()
    if cfg.address is None:
        ray.init(
            num_cpus=cfg.num_cpus or os.cpu_count(),
            num_gpus=cfg.num_gpus if cfg.num_gpus is not None else torch.cuda.device_count(),
            object_store_memory=cfg.object_store_memory,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(address=cfg.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
