"""Jobs that are safe for experiments: fingerprinted resume, retried failures with their tracebacks,
exit codes, plain setup errors, a quiet console, rows that say what happened."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.cli import exit_if_failed, plain_errors
from pipelines.config import ConfigError, compose_job, compose_tune
from pipelines.files import InUseError, exclusive_lock
from pipelines.job import run_job
from pipelines.judge import PROBE
from pipelines.score import main as score_main
from pipelines.sink import OutputError, OutputSink
from pipelines.tune import LOCK, run_tune
from synthqa.sample_videos import write_truncated, write_video
from tests.test_judge import JudgeServer, always

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    write_video(root / "a.mp4", num_frames=30, width=160, height=120)
    write_video(root / "b.mp4", num_frames=30, width=120, height=160)
    write_truncated(root / "a.mp4", root / "broken.mp4", keep=0.5)
    return root


def manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job(tiny_dir: Path, data: Path, out: Path, *overrides: str):
    return compose_job(f"model.path={tiny_dir}", "model.dtype=float32", f"data.manifest={data}",
                       f"output.path={out}", "runner=local", "pipeline.generation.max_new_tokens=3",
                       "decode.num_frames=4", *overrides)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_a_rerun_with_other_settings_stops_before_work(tiny_dir, clips, tmp_path):
    data = manifest(tmp_path, [{"id": "a1", "video": str(clips / "a.mp4"), "question": "What?"}])
    out = tmp_path / "out.jsonl"
    run_job(job(tiny_dir, data, out))
    with pytest.raises(OutputError, match="compression.dominant differ"):
        run_job(job(tiny_dir, data, out, "compression.dominant=30"))
    with pytest.raises(OutputError, match="pipeline.prompt differ"):
        run_job(job(tiny_dir, data, out, "pipeline.prompt='USER: <video> {question} ASSISTANT:'"))
    assert len(read(out)) == 1  # nothing mixed in
    data.write_text(data.read_text() + json.dumps({"id": "b1", "video": str(clips / "b.mp4"),
                                                   "question": "Why?"}) + "\n")
    with pytest.raises(OutputError, match="data.files.manifest.sha256 differ"):
        run_job(job(tiny_dir, data, out))
    again = run_job(job(tiny_dir, data, out, "compression.dominant=30", "output.overwrite=true"))
    assert again["rows"] == 2 and {r["visual_tokens_kept"] for r in read(out)} == {4 * 33}
    # resources change speed, not answers: the same output resumes
    assert run_job(job(tiny_dir, data, out, "compression.dominant=30", "pipeline.generation.batch_size=1",
                       "decode.threads=2"))["this_run"]["rows"] == 0


def test_failures_are_logged_retried_and_counted(tiny_dir, clips, tmp_path):
    missing = tmp_path / "later.mp4"
    data = manifest(tmp_path, [
        {"id": "ok", "video": str(clips / "a.mp4"), "question": "What?", "shot": "3"},
        {"id": "late", "video": str(missing), "question": "What?"},
        {"id": "torn", "video": str(clips / "broken.mp4"), "question": "What?"},
    ])  # fmt: skip
    out = tmp_path / "out.jsonl"
    first = run_job(job(tiny_dir, data, out, "max_error_fraction=0.5"))
    assert (first["ok"], first["error"]) == (1, 2)
    assert first["failed"] == "2 of 3 rows failed (67% > max_error_fraction=0.5; see out.errors.log)"
    rows = {r["id"]: r for r in read(out)}
    assert rows["ok"]["shot"] == "3"  # the manifest's own column, passed through
    log = (tmp_path / "out.errors.log").read_text()
    assert "(ids late)" in log and "(ids torn)" in log
    assert "Traceback (most recent call last)" in log and "DecodeError" in log  # the whole traceback
    write_video(missing, num_frames=30, width=160, height=120)  # the video is back
    kept = run_job(job(tiny_dir, data, out, "output.retry_errors=false"))
    assert kept["this_run"]["rows"] == 0 and kept["error"] == 2
    retried = run_job(job(tiny_dir, data, out))
    assert retried["this_run"]["rows"] == 2 and (retried["ok"], retried["error"]) == (2, 1)
    assert retried["failed"].startswith("1 of 3 rows failed (33% > max_error_fraction=0.25")
    assert sorted(r["id"] for r in read(out)) == ["late", "ok", "torn"]  # each id once


def test_exit_status_and_plain_messages(tiny_dir, clips, tmp_path):
    data = manifest(tmp_path, [{"id": "x", "video": str(clips / "broken.mp4"), "question": "What?"}])
    common = [f"model.path={tiny_dir}", "model.dtype=float32", f"data.manifest={data}", "runner=local",
              f"hydra.run.dir={tmp_path / 'run'}", "pipeline.generation.max_new_tokens=2"]
    every_row_failed = cli(*common, f"output.path={tmp_path / 'all.jsonl'}")
    assert every_row_failed.returncode == 1
    assert "job failed: every one of the 1 rows failed" in every_row_failed.stderr
    bad_value = cli(*common, "compression.temporal.threshold=-3", f"output.path={tmp_path / 'v.jsonl'}")
    assert bad_value.returncode == 2 and "Traceback" not in bad_value.stderr
    assert "compression.temporal.threshold=-3.0 must be in [-1, 1]" in bad_value.stderr
    offline = cli(*common[2:], "model.path=someorg/no-such-model", f"output.path={tmp_path / 'o.jsonl'}")
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    last = offline.stderr.strip().splitlines()
    assert "Ways out: model.path=DIR" in "\n".join(last[-3:]) and "model=tiny" in last[-2]
    assert not (tmp_path / "o.jsonl").exists()  # before any work
    sweep = cli("-m", "compression=none,visionzip", *common[:4], f"output.path={tmp_path / 'one.jsonl'}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert sweep.returncode == 2 and "every job would write output.path=" in sweep.stderr
    assert not (tmp_path / "one.jsonl").exists() and not (tmp_path / "sweep" / "0").exists()


def test_a_second_job_on_an_output_exits_2_naming_the_first(tiny_dir, clips, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    data = manifest(tmp_path, [{"id": "x", "video": str(clips / "a.mp4"), "question": "What?"}])
    out = tmp_path / "held.jsonl"
    with OutputSink(out) as first:  # the first job (another process in real life: see test_sink.py)
        first.write({"id": "w", "prediction": "p", "error": None})
        before = out.read_bytes()
        with pytest.raises(SystemExit) as second, plain_errors():  # as run.py runs a job
            run_job(job(tiny_dir, data, out))
    assert second.value.code == 2
    holder = f"pid {os.getpid()} on {socket.gethostname()}, started "
    assert f"error: output.path={out} is in use by another job: {holder}" in capsys.readouterr().err
    assert out.read_bytes() == before and not (tmp_path / "held.summary.json").exists()


def test_a_second_tuning_run_into_a_folder_stops_before_work(tiny_dir, clips, tmp_path):
    data = manifest(tmp_path, [{"id": "x", "video": str(clips / "a.mp4"), "question": "What?",
                                "answer": "y"}])
    out = tmp_path / "tuned"
    tuning = compose_tune(f"model.path={tiny_dir}", "model.dtype=float32", f"data.manifest={data}",
                          f"tune.out={out}")
    with exclusive_lock(out / LOCK, "the first tuning run"):
        with pytest.raises(InUseError, match=rf"^tune.out={out} is in use by another job: pid {os.getpid()}"):
            run_tune(tuning)
    assert [p.name for p in out.iterdir()] == [LOCK]  # no checkpoint, no tune.json


def test_a_retried_conversation_is_asked_again_from_its_first_error_turn(tiny_dir, clips, tmp_path):
    later = tmp_path / "later.mp4"
    data = manifest(tmp_path, [{"id": f"t{turn}", "video": str(later), "question": "What?",
                                "conversation": "c", "turn": turn} for turn in (1, 2)])
    out = tmp_path / "out.jsonl"
    assert run_job(job(tiny_dir, data, out, "max_error_fraction=1"))["error"] == 2  # no video yet
    write_video(later, num_frames=30, width=160, height=120)
    # the error rows stay in the output until replaced, but are no earlier turns: turn 2 is asked too
    retried = run_job(job(tiny_dir, data, out))
    assert retried["this_run"]["rows"] == 2 and (retried["ok"], retried["error"]) == (2, 0)
    assert [(r["id"], r["error"]) for r in read(out)] == [("t1", None), ("t2", None)]


def test_captions_are_one_row_per_clip_with_the_prompt_asked(tiny_dir, clips, tmp_path, capsys):
    data = manifest(tmp_path, [
        {"id": "a1", "video": str(clips / "a.mp4")}, {"id": "a2", "video": str(clips / "a.mp4")},
        {"id": "b1", "video": str(clips / "b.mp4"), "question": "never asked"},
    ])  # fmt: skip
    out = tmp_path / "captions.jsonl"
    run_job(job(tiny_dir, data, out, "pipeline=caption", "pipeline.caption_prompt=Describe it."))
    rows = read(out)
    # one row per clip: the clip's id (its video's name), not its first question's
    assert [(r["id"], r["question"]) for r in rows] == [("a", "Describe it."), ("b", "Describe it.")]
    assert all(isinstance(r["prediction"], str) for r in rows)
    assert "clips: 100%" in capsys.readouterr().err  # the progress bar counts clips, not questions
    # an output whose caption rows were named otherwise (by a question's id, before) is not resumed
    fingerprint = out.with_name("captions.fingerprint.json")
    recorded = json.loads(fingerprint.read_text())
    assert recorded["pipeline"]["caption_ids"] == "clip"
    del recorded["pipeline"]["caption_ids"]
    fingerprint.write_text(json.dumps(recorded))
    with pytest.raises(OutputError, match="pipeline.caption_ids differ"):
        run_job(job(tiny_dir, data, out, "pipeline=caption", "pipeline.caption_prompt=Describe it."))


def test_every_numeric_knob_is_range_checked_before_work():
    with pytest.raises(ConfigError) as err:
        compose_job("data.manifest=m.jsonl", "output.path=o.jsonl", "compression.temporal.threshold=1.5",
                    "pipeline.generation.top_p=0", "pipeline.generation.temperature=0", "decode.max_frames=0",
                    "ray.num_cpus=0", "max_error_fraction=2", "resources.encode.pool_size=0")
    assert str(err.value).splitlines()[1:] == [
        "  decode.max_frames=0 must be >= 1",
        "  compression.temporal.threshold=1.5 must be in [-1, 1] (a cosine similarity)",
        "  pipeline.generation.temperature=0.0 must be > 0",
        "  pipeline.generation.top_p=0.0 must be in (0, 1]",
        "  max_error_fraction=2.0 must be in [0, 1]",
        "  resources.encode: pool_size and batch_size must be >= 1",
        "  ray.num_cpus=0 must be >= 1 or null",
    ]


def _judged_job(tiny_dir: Path, clips: Path, tmp_path: Path, url: str, *overrides: str):
    """Two answerable clips, scored by the judge at `url` (retried once, quickly)."""
    data = manifest(tmp_path, [
        {"id": "a1", "video": str(clips / "a.mp4"), "question": "What?", "answer": "red"},
        {"id": "b1", "video": str(clips / "b.mp4"), "question": "Why?", "answer": "rain"},
    ])  # fmt: skip
    return job(tiny_dir, data, tmp_path / "out.jsonl", "score.metric=judge", f"score.judge.url='{url}'",
               "score.judge.model=judge-m", "score.judge.retries=1", "score.judge.backoff=0.01", *overrides)


def test_a_wrong_judge_key_fails_in_seconds_before_any_video(tiny_dir, clips, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with JudgeServer(always("Incorrect API key provided.", 401)) as server:
        config = _judged_job(tiny_dir, clips, tmp_path, server.url)
        start = time.monotonic()
        with pytest.raises(SystemExit) as exited, plain_errors():  # as run.py runs a job
            run_job(config)
        seconds = time.monotonic() - start
    assert exited.value.code == 2 and seconds < 10
    assert capsys.readouterr().err.splitlines()[0] == (
        f"error: judge {server.url} (model judge-m): HTTP 401, the key was refused (Incorrect API key "
        "provided.); check the key in $OPENAI_API_KEY (score.judge.key_env / --judge-key-env)")
    assert list(server.seen.elements()) == [PROBE[0]]  # one request: the probe
    assert not (tmp_path / "out.jsonl").exists()  # nothing decoded, nothing written


def test_a_scoring_that_fails_keeps_the_job_and_resumes_from_the_record(tiny_dir, clips, tmp_path, capsys,
                                                                         monkeypatch):  # fmt: skip
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    judge_down = True

    def script(question, attempt):  # up for the probe, then down until the test brings it back
        if question == PROBE[0] or not judge_down:
            return 200, "{'pred': 'no', 'score': 2}", 0.0
        return 503, "overloaded", 0.0

    out = tmp_path / "out.jsonl"
    with JudgeServer(script, served="judge-m-0125") as server:
        summary = run_job(_judged_job(tiny_dir, clips, tmp_path, server.url,
                                      "score.judge.key_env=MY_JUDGE_KEY", "score.judge.temperature=0"))
        assert summary["scores"] is None and summary["failed"] is None
        assert summary["scoring_failed"].startswith(f"JudgeError: judge {server.url} (model judge-m): "
                                                    "InternalServerError (HTTP 503) on 2 attempts")
        assert summary["rescore"] == f"python -m pipelines.score {out}"
        assert sorted(r["id"] for r in read(out)) == ["a1", "b1"]  # every row written
        written = json.loads((tmp_path / "out.summary.json").read_text())
        assert written["scoring_failed"] == summary["scoring_failed"]
        assert written["timeline"] == summary["timeline"]
        assert set(summary["timeline"]) == {"decode", "encode", "answer"}
        assert (tmp_path / "out.timeline.txt").exists()
        with pytest.raises(SystemExit) as exited:  # as run.py ends
            exit_if_failed(summary)
        assert exited.value.code == 3
        assert f"resume the scoring with: python -m pipelines.score {out}" in capsys.readouterr().err
        record = (tmp_path / "out.scoring.json").read_text()
        assert "sk-secret" not in record
        recorded = json.loads(record)
        assert (recorded["data_format"], recorded["metric"]) == ("manifest", "judge")
        assert recorded["served_model"] == "judge-m-0125"  # what the probe was answered by
        judge_down = False
        asked = len(server.bodies)
        rescored = score_main([str(out)])  # no flag: the recorded metric and judge
        assert [b["temperature"] for b in server.bodies[asked:]] == [0, 0]
    assert (rescored["metric"], rescored["requests"]) == ("judge", 2)
    assert rescored["judge"]["key_env"] == "MY_JUDGE_KEY"
    overall = rescored["overall"]
    assert [overall[k] for k in ("n", "correct", "wrong", "errors", "score")] == [2, 0, 2, 0, 2]
    assert json.loads((tmp_path / "out.scores.json").read_text()) == rescored
