"""Jobs that are safe for experiments: fingerprinted resume, retried failures with their tracebacks,
exit codes, plain setup errors, a quiet console, rows that say what happened."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import ConfigError, compose_job
from pipelines.job import run_job
from pipelines.sink import OutputError
from synthqa.sample_videos import write_truncated, write_video

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


def test_captions_are_one_row_per_clip_with_the_prompt_asked(tiny_dir, clips, tmp_path):
    data = manifest(tmp_path, [
        {"id": "a1", "video": str(clips / "a.mp4")}, {"id": "a2", "video": str(clips / "a.mp4")},
        {"id": "b1", "video": str(clips / "b.mp4"), "question": "never asked"},
    ])  # fmt: skip
    out = tmp_path / "captions.jsonl"
    run_job(job(tiny_dir, data, out, "pipeline=caption", "pipeline.caption_prompt=Describe it."))
    rows = read(out)
    assert [(r["id"], r["question"]) for r in rows] == [("a1", "Describe it."), ("b1", "Describe it.")]
    assert all(isinstance(r["prediction"], str) for r in rows)


def test_a_callers_ray_session_is_left_running(tiny_dir, clips, tmp_path):
    import ray

    data = manifest(tmp_path, [{"id": "a", "video": str(clips / "a.mp4"), "question": "What?"}])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_job(job(tiny_dir, data, tmp_path / "out.jsonl", "runner=ray"))
        assert summary["ok"] == 1 and ray.is_initialized()
    finally:
        ray.shutdown()


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
