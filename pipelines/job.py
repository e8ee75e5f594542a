"""A whole batch job: check the config, prepare inputs, run the stages, write rows, score, sum up.

Work is skipped for ids already answered in the output (resume; only by a job with the same fingerprint,
see `pipelines.sink`); every question ends as exactly one row, an error row when its video or its
generation failed, with its traceback in `<stem>.errors.log`.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path, PurePosixPath

from tqdm import tqdm
from transformers import PretrainedConfig

from pipelines.config import JobConfig, check, job_problems
from pipelines.datasets import read_questions
from pipelines.fingerprint import job_fingerprint
from pipelines.judge import JudgeError, probe
from pipelines.manifest import Question, VideoItem, group_by_video
from pipelines.runner import (
    conversation_history,
    item_rows,
    question_fields,
    question_rows,
    run_local,
    run_ray,
    unanswerable_turns,
)
from pipelines.score import score_file, write_scoring_record
from pipelines.sink import OutputSink
from pipelines.summary import STAGES, summarize, write_summary
from pipelines.timeline import stage_timeline, write_gantt
from stages.model import ModelConfig, ModelLoadError, read_model_config
from stages.testing import build_tiny_video_llava
from visionzip.video_llava import tokens_per_frame

log = logging.getLogger(__name__)


def run_job(job: JobConfig) -> dict:
    """Run the job described by a config (from `to_job_config`) and return its summary: every row
    written, then scored when the questions have answers. `summary["failed"]` says why the job must
    count as failed (too many error rows), else None; `summary["scoring_failed"]` why the scoring step
    failed, when it did, and `summary["rescore"]` the command that resumes it. A judge that will score
    the job is probed first, before any video is decoded. Ctrl-C stops the stages (and Ray), finishes the
    output and raises `JobInterrupted`: the rows so far are saved, and a rerun resumes."""
    model_config = prepare_model(job.model)
    check(job_problems(job, tokens_per_frame(model_config)))
    questions = read_questions(job.data, require_question=job.pipeline.task == "qa")
    if job.pipeline.task == "caption":
        questions = one_per_clip(questions, job.pipeline.caption_prompt)
    served_model = probe_judge(job, questions)
    with OutputSink(job.output.path, overwrite=job.output.overwrite, retry_errors=job.output.retry_errors,
                    fingerprint=job_fingerprint(job, model_config)) as sink:  # locked till the summary is out
        write_scoring_record(sink.path, job.data.format, job.score.metric_for(job.data.format),
                             job.score.judge, served_model, job.score.rule_for(job.data.format))
        try:
            return answer_into(sink, job, questions)
        except KeyboardInterrupt:  # the stages and Ray are stopped by now: finish the output (unlocked below)
            sink.close()
            raise JobInterrupted(len(sink.rows), sink.path) from None


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) waits till the block ends, then is delivered: a row written to the output but not
    yet recorded in the sink would be miscounted, and dropped from a Parquet output finished after it."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


class JobInterrupted(Exception):  # noqa: N818 - Ctrl-C, not an error
    """Ctrl-C stopped the job after its output was finished: `rows` rows are saved in `path` (the rows of
    earlier runs included), and a rerun on the same output resumes."""

    def __init__(self, rows: int, path: Path) -> None:
        super().__init__(f"{rows} rows saved in {path}")
        self.rows, self.path = rows, path


def probe_judge(job: JobConfig, questions: list[Question]) -> str | None:
    """When the job will be scored by an LLM judge, ask it one question now, before any video is decoded,
    so that a wrong URL, key or model fails in seconds (a JudgeError naming the setting to check); the
    model the endpoint says it served, else None."""
    judged = job.score.metric_for(job.data.format) == "judge" and job.score.judge.url
    return probe(job.score.judge) if judged and any(q.answer for q in questions) else None


def answer_into(sink: OutputSink, job: JobConfig, questions: list[Question]) -> dict:
    """`run_job` once its output is open: ask what `sink` has not done, then finish the output, score it
    and write the summary."""
    done = [row for row in sink.rows if row["id"] in sink.done_ids]  # not the error rows to retry
    history = conversation_history(questions, done, job.pipeline.choice_prompt)  # earlier turns' answers
    pending = unanswerable_turns([q for q in questions if q.id not in sink.done_ids], history)
    log.info("%d %s in %s, %d already answered in %s%s", len(questions),
             "clips to caption" if job.pipeline.task == "caption" else "questions", job.data.describe(),
             len(questions) - len(pending), sink.path,
             f" ({sink.retried} error rows to retry)" if sink.retried else "")
    for question in (q for q in pending if q.error is not None):  # e.g. the set's video is not there
        sink.write({**question_fields(question), "error": question.error})
        sink.log_error([question.id], question.video, question.error, None)
    askable = {q.id: q for q in pending if q.error is None}
    rows = item_rows(group_by_video(list(askable.values())), job.pipeline.choice_prompt, history)
    written: list[dict] = []
    stage_seconds = dict.fromkeys(STAGES, 0.0)
    intervals: dict[str, set[tuple[float, float]]] = {stage: set() for stage in STAGES}
    job_start = time.time()
    start = time.perf_counter()
    with ray_session(job) if rows and job.runner == "ray" else nullcontext(), \
            _Progress(len(askable), "clips" if job.pipeline.task == "caption" else "questions") as progress:

        def on_video(video_row: dict) -> None:
            new = list(question_rows(video_row, askable))
            with interrupts_held():  # a row is in the file and in the sink's rows, or in neither
                for row in new:
                    sink.write(row)
                written.extend(new)
            if new and new[0]["error"]:
                sink.log_error([r["id"] for r in new], new[0]["video"], new[0]["error"],
                               video_row.get("error_traceback"))
            for stage in ("decode", "encode"):  # the clip's, once
                stage_seconds[stage] += (new[0][f"{stage}_seconds"] or 0.0) if new else 0.0
            stage_seconds["answer"] += sum(r["answer_seconds"] or 0.0 for r in new)  # each answer's share
            for stage in STAGES:
                span = video_row.get(f"{stage}_interval")
                if span is not None and len(span) == 2:
                    intervals[stage].add((float(span[0]), float(span[1])))
            progress.update(len(new))

        if rows:
            log.info("starting the stages for %d clips ...", len(rows))
            (run_local if job.runner == "local" else run_ray)(job, rows, on_video)
    sink.close()
    summary = summarize(sink.rows, written, stage_seconds, time.perf_counter() - start)
    summary["output"] = str(sink.path)
    summary["failed"] = failure(summary, job.max_error_fraction)
    summary["timeline"] = stage_timeline(intervals, job_start)
    if any(intervals.values()):
        summary["timeline_plots"] = [str(p) for p in write_gantt(intervals, job_start, sink.path)]
    # scoring is a step of its own: the summary is written before it, and again with its outcome, so a
    # judge that fails midway (or a killed scoring) leaves the rows, the summary and the timeline
    summary["scores"] = None
    summary["summary"] = str(write_summary(summary, sink.path))
    try:
        summary["scores"] = score_output(job, sink)
    except SCORING_ERRORS as err:
        summary["scoring_failed"] = f"{type(err).__name__}: {err}"
        summary["rescore"] = f"python -m pipelines.score {shlex.quote(str(sink.path))}"
        log.error("scoring failed (%s); the rows and the summary are written; resume the scoring with: %s",
                  summary["scoring_failed"], summary["rescore"])
    write_summary(summary, sink.path)
    return summary


def one_per_clip(questions: list[Question], prompt: str) -> list[Question]:
    """Captioning: one row per clip, asked `prompt`, the prompt it records. A clip that the manifest lists
    once, without a question (a captioning manifest's row), is that row: its id and its own columns. A clip
    named by questions (a QA manifest) gets a row of its own, with the clip's id (`clip_ids`) and none of
    the questions' fields (id, category, answer, options, conversation): they describe a question, not
    the clip."""
    clips = group_by_video(questions)
    own = [clip.questions[0] if len(clip.questions) == 1 and clip.questions[0].question is None else None
           for clip in clips]
    ids = clip_ids(clips, taken={row.id for row in own if row is not None})
    if len(clips) < len(questions):
        log.info("captioning: the manifest's %d rows name %d clips, one caption each", len(questions),
                 len(clips))
    return [replace(row, question=prompt) if row is not None
            else Question(clip_id, clip.video, prompt, start=clip.start, end=clip.end)
            for row, clip, clip_id in zip(own, clips, ids, strict=True)]


def clip_ids(clips: list[VideoItem], taken: Collection[str] = ()) -> list[str]:
    """Each clip's id: its video's name without the extension and, for a window, `@START-ENDs`
    (`sample_demo_1`, `sample_demo_1@0-8s`, `talk@30s-end`); the video's whole path (or URL) instead of its
    name when two clips' names would be the same (videos of one name in two folders) or one is `taken`."""
    def window(clip: VideoItem) -> str:
        if clip.start is None and clip.end is None:
            return ""
        return f"@{clip.start or 0:g}-{clip.end:g}s" if clip.end is not None else f"@{clip.start:g}s-end"

    names = [f"{PurePosixPath(clip.video).stem}{window(clip)}" for clip in clips]
    if len(set(names)) == len(names) and not set(taken) & set(names):
        return names
    return [f"{clip.video}{window(clip)}" for clip in clips]


# what can stop the scoring step after the rows are written: the judge (down, or refusing), its verdict store,
# the scores file, a row that cannot be scored
SCORING_ERRORS = (JudgeError, sqlite3.Error, OSError, ValueError)


def score_output(job: JobConfig, sink: OutputSink) -> dict | None:
    """Score the output as `job.score` says, when its questions have answers: {path, metric, overall}."""
    metric = job.score.metric_for(job.data.format)
    if metric == "none" or not any(row.get("answer") for row in sink.rows):
        return None
    if metric == "judge" and not job.score.judge.url:
        log.warning("not scored: %s is scored by an LLM judge; set score.judge.url and score.judge.model, or "
                    "run `python -m pipelines.score %s --judge-url URL --judge-model MODEL`", job.data.format,
                    sink.path)
        return None
    scores = score_file(sink.path, metric=metric, judge=job.score.judge if metric == "judge" else None,
                        rows=sink.rows, rule=job.score.rule_for(job.data.format))
    return {"path": str(scores_path_of(sink.path)), "metric": scores["metric"], "overall": scores["overall"]}


def scores_path_of(output: Path) -> Path:
    return output.with_name(output.stem + ".scores.json")


def failure(summary: dict, max_error_fraction: float) -> str | None:
    """Why the job counts as failed, or None: every row an error, or more than `max_error_fraction`."""
    rows, errors = summary["rows"], summary["error"]
    if rows and errors == rows:
        return f"every one of the {rows} rows failed (see {Path(summary['output']).stem}.errors.log)"
    if rows and errors / rows > max_error_fraction:
        return (f"{errors} of {rows} rows failed ({errors / rows:.0%} > max_error_fraction="
                f"{max_error_fraction}; see {Path(summary['output']).stem}.errors.log)")
    return None


def prepare_model(model: ModelConfig) -> PretrainedConfig:
    """Make `model.path` loadable from any worker (the tiny model built when asked, a local folder made
    absolute) and return its config, read in this process before any work starts: a model that cannot
    be found fails here, in seconds, not inside a worker."""
    local = os.path.expanduser(model.path)
    if model.build_tiny:
        build_tiny_video_llava(local)
    if os.path.isdir(local):  # workers may run in another folder: give them an absolute path
        model.path = os.path.abspath(local)
    try:
        return read_model_config(model.path)
    except ModelLoadError as err:
        raise ModelLoadError(f"{err}\nWays out: model.path=DIR (a folder holding the checkpoint), "
                             "model=synth (the small Video-LLaVA shipped in models/synth), or model=tiny "
                             "(a random one built here: the plumbing without the answers)") from None


class _Progress:
    """The job's one progress bar over its rows (questions, or clips to caption); it appears with the
    first answers, so its clock and rate count the work, not Ray's and the models' start."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.bar = total, what, None

    def __enter__(self) -> _Progress:
        return self

    def update(self, n: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.total, desc=self.what, unit="row", file=sys.stderr)
        self.bar.update(n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def ray_session(job: JobConfig) -> Iterator[None]:
    """Ray for the job: a session the caller already started is used and left running; otherwise an
    embedded Ray (`ray.address` null) or a cluster joined (`auto` or HOST:PORT, starting nothing), and
    disconnected at the end, so the jobs of a Hydra sweep, which run one after another in one process,
    never share a session. The embedded Ray is quiet: its internal warnings (token authentication, the
    core worker's notes, Ray Data's progress and plan lines) do not reach the console; a cluster's own
    settings are left alone.

    The embedded Ray is always this job's own (`address="local"`): another Ray running on the machine,
    the address file a killed one left behind (`ray_current_cluster`) and `RAY_ADDRESS` are ignored. A
    cluster that cannot be joined is a `ConnectionError` of one line saying what to check (`join_cluster`).

    The embedded Ray's workers run at the driver's priority (`RAY_worker_niceness=0` unless set): they do
    the job's work, and at Ray's default niceness of 15 any other busy process on the machine took nearly
    all their CPU (beside two busy loops on 2 cores, a 7-question job took 228 s instead of 29 s).
    """
    running = sys.modules.get("ray")  # a caller's session: Ray is imported already
    if running is not None and running.is_initialized():
        yield
        return
    cfg = job.ray
    start = time.perf_counter()
    log.info("starting Ray (local, usually 10-20 s) ..." if cfg.address is None else
             f"joining the Ray cluster at {cfg.address} ...")
    import ray  # the import alone takes seconds: after the line above
    import torch

    if cfg.address is None:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # C++ notes of the driver's core worker
        os.environ.setdefault(WORKER_NICENESS, "0")  # read by the raylet that ray.init starts
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        with _stderr_without(_RAY_START_NOTES):
            ray.init(
                address="local",  # start our own, whatever else runs here or RAY_ADDRESS says
                num_cpus=cfg.num_cpus or os.cpu_count(),
                num_gpus=cfg.num_gpus if cfg.num_gpus is not None else torch.cuda.device_count(),
                object_store_memory=cfg.object_store_memory,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        import ray.data  # noqa: F401 - it configures its loggers on first import: quiet them after that

        logging.getLogger("ray.data").setLevel(logging.ERROR)
    else:
        join_cluster(cfg.address)
    log.info("Ray ready in %.1f s", time.perf_counter() - start)
    from ray._private import auto_init_hook

    # a Ray call after the shutdown (Ray Data's reading thread, when Ctrl-C stopped the job midway) must
    # fail, not start a new Ray in that thread
    auto_connect, auto_init_hook.enable_auto_connect = auto_init_hook.enable_auto_connect, False
    try:
        yield
    finally:
        ray.shutdown()
        auto_init_hook.enable_auto_connect = auto_connect


WORKER_NICENESS = "RAY_worker_niceness"  # Ray's system setting (default 15) for the workers it starts
_RAY_START_NOTES = ("Set ray log level from environment variable",)
# what the core worker repeats on stderr while a connection to a cluster fails (its message says it once)
_RAY_CONNECT_NOTES = ("Failed to get cluster ID from GCS", "Failed to connect to GCS at address",
                      "Failed to connect to the observability pubsub")
HEAD_PROBE_SECONDS = 5.0


def join_cluster(address: str) -> None:
    """`ray.init` on the cluster at `address` (`auto`: the one Ray finds on this machine), failing in
    seconds with one line saying what to check: no head answers there (checked with a TCP connection
    first, instead of Ray's own retries, which take minutes), or the head refuses this job's token."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address
    from ray.exceptions import AuthenticationError

    status = f"ray status --address {address}" if address != "auto" else "ray status"
    try:
        head = canonicalize_bootstrap_address(address)  # auto: RAY_ADDRESS, the address file, a running GCS
    except (ConnectionError, ValueError) as err:
        raise ConnectionError(f"ray.address={address}: {err} (start a head with `ray start --head`, or give "
                              "ray.address=HOST:PORT of a running one)") from None
    host, _, port = head.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=HEAD_PROBE_SECONDS).close()
    except OSError as err:
        raise ConnectionError(f"ray.address={address}: no Ray head answers at {head} ({err.strerror or err}; "
                              f"check the address and that the head is running: {status})") from None
    try:
        with _stderr_without(_RAY_CONNECT_NOTES):
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, AuthenticationError) as err:
        cause = f"{err} {err.__cause__}"
        if "InvalidAuthToken" in cause or "Unauthenticated" in cause or "authentication" in cause.lower():
            raise ConnectionError(
                f"ray.address={address}: the cluster at {head} refused this job's token (check "
                "RAY_AUTH_MODE, and that RAY_AUTH_TOKEN, or the file RAY_AUTH_TOKEN_PATH names, holds the "
                "head's token)"
            ) from None
        raise ConnectionError(f"ray.address={address}: {head} answers but Ray could not join it ({err}; "
                              f"check that it is a Ray head of this Ray version: {status})") from None


@contextmanager
def _stderr_without(notes: tuple[str, ...]) -> Iterator[None]:
    """Hold back what this process writes to file descriptor 2 (C++ code included) while the block runs,
    then pass it on without the lines that contain one of `notes`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not any(note in line for note in notes)))
