"""The batch job end to end: config composition and validation, local and Ray runners, error rows,
resume after a SIGKILL, a Hydra sweep, and an external Ray cluster."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipelines.config import register, to_job_config
from pipelines.evaluate import main as evaluate_main
from pipelines.job import run_job
from pipelines.sample_videos import write_truncated, write_video
from stages.model import build_tiny_video_llava

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
register()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Tiny model, three videos (one truncated) and a manifest with several questions per video."""
    root = tmp_path_factory.mktemp("job")
    model = build_tiny_video_llava(root / "tiny")
    write_video(root / "a.mp4", num_frames=40, width=160, height=120)
    write_video(root / "b.mp4", num_frames=30, width=120, height=160)
    write_truncated(root / "a.mp4", root / "broken.mp4", keep=0.5)
    rows = [
        {"id": "a1", "video": "a.mp4", "question": "What is moving?", "answer": "blocks"},
        {"id": "a2", "video": "a.mp4", "question": "What color is the bottom?"},
        {"id": "b1", "video": "b.mp4", "question": "How many objects are there?"},
        {"id": "b2", "video": "b.mp4", "question": "Describe the video in detail."},
        {"id": "a3", "video": "a.mp4", "question": "Is this the top half?", "start": 0.4, "end": 1.2},
        {"id": "x1", "video": "broken.mp4", "question": "What is moving?"},
        {"id": "m1", "video": "missing.mp4", "question": "What is moving?"},
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": model, "manifest": manifest, "ids": [r["id"] for r in rows]}


def job_config(data: dict, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=[
            f"model.path={data['model']}", "model.dtype=float32", f"data.manifest={data['manifest']}",
            f"output.path={out}", "pipeline.generation.max_new_tokens=4", "resources.decode.batch_size=2",
            *overrides,
        ])  # fmt: skip
    return to_job_config(cfg)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def compose_job(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_job_config(compose("config", overrides=["data.manifest=m.jsonl", "output.path=o.jsonl",
                                                          *overrides]))


def test_config_defaults_groups_and_overrides():
    job = compose_job()
    assert (job.model.path, job.compression.method, job.runner) == ("LanguageBind/Video-LLaVA-7B-hf",
                                                                    "visionzip", "ray")
    assert (job.compression.dominant, job.compression.contextual, job.decode.num_frames) == (14, 3, 8)
    job = compose_job("compression=visionzip_temporal", "compression.dominant=30", "decode=decord",
                      "decode.num_frames=16", "pipeline=caption", "ray=cluster", "ray.address=10.0.0.1:6379")
    assert job.compression.temporal.enabled and job.compression.dominant == 30
    assert (job.decode.backend, job.decode.num_frames, job.pipeline.task) == ("decord", 16, "caption")
    assert job.ray.address == "10.0.0.1:6379" and job.resources.decode.pool_size == 4
    assert compose_job("compression=none").compression.method == "none"
    from pipelines.runner import stage_specs

    job = compose_job("model.projector_path=p.safetensors", "decode.size=null")
    decode, encode, answer = stage_specs(job)
    assert encode.kwargs["projector_path"] == "p.safetensors" and decode.kwargs["size"] is None
    assert answer.kwargs["model"] == encode.kwargs["model"] == "LanguageBind/Video-LLaVA-7B-hf"


def test_config_rejects_bad_keys_types_and_values():
    with pytest.raises(Exception, match="compression.colour"):
        compose_job("compression.colour=1")
    with pytest.raises(Exception, match="dominant"):
        compose_job("compression.dominant=many")
    with pytest.raises(ValueError, match="max_tokens=20 is below 24"):
        compose_job("compression=visionzip_temporal", "compression.temporal.max_tokens=20")
    assert compose_job("compression=visionzip_temporal", "compression.temporal.max_tokens=24")
    with pytest.raises(ValueError) as err:
        compose_job("compression.dominant=250", "compression.contextual=10", "decode.num_frames=0",
                    "decode.backend=opencv", "decode.threads=-1")
    message = str(err.value)
    assert "250 + 10 = 260 exceeds the 257 tokens" in message
    assert "decode.num_frames=0 must be >= 1" in message
    assert "decode.backend='opencv' is not one of pyav, decord" in message
    assert "decode.threads=-1 must be >= 0" in message


def test_local_runner_writes_one_row_per_question_with_error_rows(data, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_job(job_config(data, out, "runner=local"))
    rows = {r["id"]: r for r in read_rows(out)}
    assert sorted(rows) == sorted(data["ids"])
    for qid in ("a1", "a2", "a3", "b1", "b2"):
        row = rows[qid]
        assert row["error"] is None and isinstance(row["prediction"], str)
        assert (row["visual_tokens_full"], row["visual_tokens_kept"]) == (8 * 257, 8 * 17)
        assert row["generated_tokens"] >= 1 and row["prompt_tokens"] > 8 * 17
        assert row["decode_seconds"] > 0 and row["encode_seconds"] > 0 and row["answer_seconds"] > 0
    assert rows["a1"]["answer"] == "blocks" and rows["a2"]["answer"] is None
    assert "broken.mp4" in rows["x1"]["error"] and rows["x1"]["prediction"] is None
    assert "missing.mp4" in rows["m1"]["error"]
    assert (summary["ok"], summary["error"], summary["rows_this_run"]) == (5, 2, 7)
    assert summary["visual_tokens_kept_mean"] == 136 and summary["visual_tokens_full_mean"] == 2056
    assert json.loads((tmp_path / "out.summary.json").read_text())["ok"] == 5
    # a rerun has nothing left to do
    again = run_job(job_config(data, out, "runner=local"))
    assert again["rows_this_run"] == 0 and len(read_rows(out)) == 7


def test_ray_runner_gives_the_local_runner_answers(data, tmp_path):
    local = tmp_path / "local.parquet"
    run_job(job_config(data, local, "runner=local", "compression=visionzip_temporal"))
    out = tmp_path / "ray.jsonl"
    summary = run_job(job_config(
        data, out, "runner=ray", "compression=visionzip_temporal", "ray.num_cpus=2",
        "resources.encode.batch_size=1", "resources.answer.batch_size=2",
    ))  # fmt: skip
    import pyarrow.parquet as pq

    expected = {r["id"]: r for r in pq.read_table(local).to_pylist()}
    rows = {r["id"]: r for r in read_rows(out)}
    assert sorted(rows) == sorted(expected)
    for qid, row in rows.items():
        assert row["prediction"] == expected[qid]["prediction"], qid
        assert row["visual_tokens_kept"] == expected[qid]["visual_tokens_kept"], qid
        assert (row["error"] is None) == (expected[qid]["error"] is None), qid
    kept = rows["b1"]["visual_tokens_kept"]
    assert kept < 8 * 17  # temporal merging folded repeats
    assert summary["ok"] == 5 and summary["error"] == 2


def _run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", ROOT), **kwargs)


def test_a_killed_run_resumes_with_every_id_exactly_once(data, tmp_path):
    out = tmp_path / "out.jsonl"
    args = [f"model.path={data['model']}", "model.dtype=float32", f"data.manifest={data['manifest']}",
            f"output.path={out}", "runner=local", "resources.decode.batch_size=1",
            f"hydra.run.dir={tmp_path / 'hydra'}", "pipeline.generation.max_new_tokens=4"]
    proc = subprocess.Popen([PYTHON, str(ROOT / "run.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_rows(out))
    assert 2 <= done_before < 7
    result = _run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    ids = [r["id"] for r in read_rows(out)]
    assert sorted(ids) == sorted(data["ids"])  # every id exactly once
    assert json.loads((tmp_path / "out.summary.json").read_text())["rows_this_run"] == 7 - done_before


def test_sweep_runs_each_job_in_its_own_folder_with_its_own_ray(data, tmp_path):
    result = _run_cli(
        "-m", "compression=none,visionzip", f"model.path={data['model']}", "model.dtype=float32",
        f"data.manifest={data['manifest']}", "ray.num_cpus=2", "pipeline.generation.max_new_tokens=2",
        f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${hydra.job.num}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    kept = {}
    for job in ("0", "1"):
        rows = read_rows(tmp_path / job / "predictions.jsonl")
        assert sorted(r["id"] for r in rows) == sorted(data["ids"])
        kept[job] = {r["visual_tokens_kept"] for r in rows if r["error"] is None}
    assert kept == {"0": {8 * 257}, "1": {8 * 17}}
    # the sweep's table: one row per job, retention against the compression=none job
    table = evaluate_main([str(tmp_path)])
    assert [(r["setting"].split()[0], r["visual_tokens"]) for r in table] == [
        ("compression=none", 8 * 257), ("compression=visionzip", 8 * 17)]
    # the random tiny model answers its one answered question wrong: no reference to retain against
    assert table[0]["overall"] == 0.0 and table[0]["retention"] is None
    assert (tmp_path / "accuracy_table.md").read_text().count("\n") == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_external_two_node_cluster(data, tmp_path):
    ray = str(Path(PYTHON).parent / "ray")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # a loopback test cluster: no token authentication between its nodes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    common = ["--disable-usage-stats", "--num-gpus=0"]
    try:
        subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--num-cpus=1", "--include-dashboard=false", *common],
                       check=True, capture_output=True, env=env, timeout=120)
        subprocess.run([ray, "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=2", *common], check=True, capture_output=True, env=env, timeout=120)
        out = tmp_path / "out.jsonl"
        result = _run_cli(
            "ray=cluster", f"ray.address={address}", f"model.path={data['model']}", "model.dtype=float32",
            f"data.manifest={data['manifest']}", f"output.path={out}", "pipeline.generation.max_new_tokens=2",
            "resources.decode.pool_size=1", f"hydra.run.dir={tmp_path / 'hydra'}", env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        rows = read_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(data["ids"])
        assert sum(r["error"] is None for r in rows) == 5
        status = subprocess.run([ray, "status", f"--address={address}"], capture_output=True, text=True,
                                env=env, timeout=60)
        assert "3.0 CPU" in status.stdout  # both nodes still up: the job started and stopped nothing
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_a_dead_worker_is_restarted_and_its_batch_retried(data, tmp_path):
    import psutil

    from pipelines.job import ray_session
    from pipelines.manifest import group_by_video, read_manifest
    from pipelines.runner import item_rows, question_rows, run_ray

    job = job_config(data, tmp_path / "unused.jsonl", "ray.num_cpus=2", "resources.decode.batch_size=1",
                     "resources.encode.batch_size=1", "resources.answer.batch_size=1")
    rows = item_rows(group_by_video(read_manifest(data["manifest"])))
    done, killed = [], []

    def kill_the_encoder_once(video_row: dict) -> None:
        done.extend(question_rows(video_row))
        if not killed:
            for proc in psutil.process_iter(["cmdline"]):
                if "MapBatches(EncodeStage)" in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(len(done))  # rows out when the worker died

    with ray_session(job):
        run_ray(job, rows, kill_the_encoder_once)
    assert len(killed) == 1 and killed[0] < len(data["ids"])  # it died with work still to do
    assert sorted(r["id"] for r in done) == sorted(data["ids"])
    assert sum(r["error"] is None for r in done) == 5


def test_demo_job_answers_next_to_the_ground_truth(tmp_path):
    result = _run_cli("+experiment=demo", "demo.videos=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(tmp_path / "predictions.jsonl")
    assert sorted(r["id"].split("-")[1] for r in rows) == ["color", "color", "count", "direction", "half",
                                                            "shape"]
    assert [r["id"] for r in rows if r["error"]] == ["broken-color"]
    assert all(r["answer"] and r["visual_tokens_kept"] == 8 * 17 for r in rows if not r["error"])
    assert "(truth " in result.stdout and "overall" in result.stdout
