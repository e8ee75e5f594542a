"""The batch job end to end: config composition and validation, local and Ray runners, error rows,
resume after a SIGKILL, a Hydra sweep (an external Ray cluster: tests/test_cluster.py)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from held_url import HeldUrl
from hydra.errors import ConfigCompositionException

from pipelines.config import ConfigError, compose_job, job_problems
from pipelines.job import run_job
from pipelines.score import main as score_main
from synthqa.sample_videos import write_truncated, write_video

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_dir) -> dict:
    """Tiny model, three videos (one truncated) and a manifest with several questions per video."""
    root = tmp_path_factory.mktemp("job")
    model = tiny_dir
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


@pytest.fixture
def caller_ray():
    """A Ray session (2 CPUs) started as a caller would start it, before the job."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def job_config(data: dict, out: Path, *overrides: str):
    return compose_job(
        f"model.path={data['model']}", "model.dtype=float32", f"data.manifest={data['manifest']}",
        f"output.path={out}", "pipeline.generation.max_new_tokens=4", "resources.decode.batch_size=2",
        *overrides,
    )


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def composed(*overrides: str):
    return compose_job("data.manifest=m.jsonl", "output.path=o.jsonl", *overrides)


def test_config_defaults_groups_and_overrides():
    job = composed()
    assert (job.model.path, job.compression.method, job.runner) == ("LanguageBind/Video-LLaVA-7B-hf",
                                                                    "visionzip", "ray")
    assert (job.compression.dominant, job.compression.contextual, job.decode.num_frames) == (14, 3, 8)
    job = composed("compression=visionzip_temporal", "compression.dominant=30", "decode=decord",
                   "decode.num_frames=16", "pipeline=caption", "ray=cluster", "ray.address=10.0.0.1:6379")
    assert job.compression.temporal.enabled and job.compression.dominant == 30
    assert (job.decode.backend, job.decode.num_frames, job.pipeline.task) == ("decord", 16, "caption")
    assert job.ray.address == "10.0.0.1:6379" and job.resources.decode.pool_size is None  # from the cluster
    assert composed("compression=none").compression.method == "none"
    from pipelines.runner import stage_specs

    job = composed("model.projector_path=p.safetensors", "decode.size=null")
    decode, encode, answer = stage_specs(job)
    # each stage gets its own typed section, as composed: nothing renamed on the way
    assert decode.kwargs == {"config": job.decode} and job.decode.size is None
    assert encode.kwargs == {"model": job.model, "compression": job.compression, "frame_batch_size": 64}
    # the visual tokens' own positions (compression.positions=original, the default) are asked of the engine
    assert answer.kwargs == {"model": job.model, "config": job.pipeline, "custom_positions": True}
    assert job.model.projector_path == "p.safetensors"


def test_config_rejects_bad_keys_types_and_values():
    with pytest.raises(ConfigCompositionException, match="compression.colour"):
        composed("compression.colour=1")
    with pytest.raises(ConfigCompositionException, match="compression.dominant"):
        composed("compression.dominant=many")
    with pytest.raises(ConfigError, match="max_tokens=20 is below 24"):
        composed("compression=visionzip_temporal", "compression.temporal.max_tokens=20")
    assert composed("compression=visionzip_temporal", "compression.temporal.max_tokens=24")
    with pytest.raises(ConfigError) as err:
        composed("compression.dominant=0", "decode.num_frames=0", "decode.backend=opencv",
                 "decode.threads=-1", "pipeline.generation.batch_size=0", "model.dtype=float8")
    assert str(err.value).splitlines()[1:] == [
        "  model.dtype='float8' is not one of bfloat16, float16, float32",
        "  decode.backend='opencv': unknown decode backend; choose one of pyav, decord",
        "  decode.num_frames=0 must be >= 1",
        "  decode.threads=-1 must be >= 0 (0 = FFmpeg's choice)",
        "  compression.dominant=0 must be >= 1 (it counts the CLS token)",
        "  pipeline.generation.batch_size=0 must be >= 1",
    ]


def test_token_budgets_are_checked_against_the_models_own_frames(data, tmp_path):
    # the 7B's 257 tokens a frame; the synth model's 65, read from its config.json before any work
    job = composed("compression.dominant=250", "compression.contextual=10")  # no model needed to compose
    assert job_problems(job, tokens_per_frame=257) == [
        "compression.dominant + contextual = 250 + 10 = 260 exceeds the 257 tokens of a frame of this model"]
    out = tmp_path / "out.jsonl"
    synth = job_config(data, out, f"model.path={ROOT / 'models' / 'synth'}", "compression.dominant=70")
    with pytest.raises(ConfigError, match="70 \\+ 3 = 73 exceeds the 65 tokens of a frame of this model"):
        run_job(synth)
    assert not out.exists()  # refused before any work
    temporal = job_config(data, out, f"model.path={ROOT / 'models' / 'synth'}", "compression=none",
                          "compression.temporal.enabled=true", "compression.temporal.max_tokens=50")
    with pytest.raises(ConfigError, match="max_tokens=50 is below 72: .* frame 0's 65 tokens"):
        run_job(temporal)


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
    # a clip is decoded and encoded once for all its questions: its rows carry the same times
    for stage in ("decode_seconds", "encode_seconds"):
        assert rows["a1"][stage] == rows["a2"][stage] != rows["a3"][stage]  # a3 asks about a window
    # the summary counts a clip's decode once (a1 and a2 share a.mp4; failed decodes count too) and sums
    # the answers' shares
    clips = [rows[qid] for qid in ("a1", "a3", "b1", "x1", "m1")]
    stage_seconds = summary["this_run"]["stage_seconds"]
    assert stage_seconds["decode"] == pytest.approx(sum(r["decode_seconds"] for r in clips), abs=1e-3)
    answered = [rows[qid] for qid in ("a1", "a2", "a3", "b1", "b2")]
    assert stage_seconds["answer"] == pytest.approx(sum(r["answer_seconds"] for r in answered), abs=1e-3)
    assert rows["a1"]["answer"] == "blocks" and rows["a2"]["answer"] is None
    assert "broken.mp4" in rows["x1"]["error"] and rows["x1"]["prediction"] is None
    assert "missing.mp4" in rows["m1"]["error"]
    assert (summary["ok"], summary["error"], summary["this_run"]["rows"]) == (5, 2, 7)
    assert summary["visual_tokens_kept_mean"] == 136 and summary["visual_tokens_full_mean"] == 2056
    assert json.loads((tmp_path / "out.summary.json").read_text())["ok"] == 5
    # a rerun asks only the failed questions again (their videos are still broken: errors again)
    again = run_job(job_config(data, out, "runner=local"))
    assert again["this_run"]["rows"] == 2 and len(read_rows(out)) == 7 and again["error"] == 2
    kept = run_job(job_config(data, out, "runner=local", "output.retry_errors=false"))
    assert kept["this_run"]["rows"] == 0


def test_ray_runner_gives_the_local_runner_answers(data, tmp_path, caplog):
    local = tmp_path / "local.parquet"
    run_job(job_config(data, local, "runner=local", "compression=visionzip_temporal"))
    out = tmp_path / "ray.jsonl"
    with caplog.at_level("INFO", logger="pipelines"):
        summary = run_job(job_config(
            data, out, "runner=ray", "compression=visionzip_temporal", "ray.num_cpus=2",
            "resources.encode.batch_size=1", "resources.answer.batch_size=2",
        ))  # fmt: skip
    # the console says what the silent parts are: Ray's start, then the actors' (the first clip ends it)
    said = ["starting Ray (local, usually 10-20 s) ...", "Ray ready in ",
            "starting the actors (1 encode, 1 answer)", "first clip answered "]
    at = [[i for i, message in enumerate(caplog.messages) if message.startswith(line)] for line in said]
    assert all(len(found) == 1 for found in at) and sorted(at) == at, caplog.messages
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
    """run.py on `data`'s manifest, 2 of whose 7 rows fail on purpose: allowed here."""
    cwd = kwargs.pop("cwd", ROOT)
    return subprocess.run([PYTHON, str(ROOT / "run.py"), *args, "max_error_fraction=0.5"],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, **kwargs)


def test_a_killed_run_resumes_with_every_id_exactly_once(data, tmp_path):
    out, manifest = tmp_path / "out.jsonl", tmp_path / "manifest.jsonl"
    with HeldUrl() as held:  # the third clip: the job waits there, the two clips before it written
        rows = data["manifest"].read_text().splitlines(keepends=True)
        held_row = json.dumps({"id": "h1", "video": held.url, "question": "What is moving?"}) + "\n"
        manifest.write_text("".join(rows[:4]) + held_row + "".join(rows[4:]))  # after a1 a2 (a), b1 b2 (b)
        args = [f"model.path={data['model']}", "model.dtype=float32", f"data.manifest={manifest}",
                f"data.video_root={data['root']}", f"output.path={out}", "resources.decode.batch_size=1",
                f"hydra.run.dir={tmp_path / 'hydra'}", "pipeline.generation.max_new_tokens=4",
                "decode.remote.tries=1", "decode.remote.timeout=600"]
        proc = subprocess.Popen([PYTHON, str(ROOT / "run.py"), *args, "runner=local"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        held.wait_for_reader(lambda: proc.poll() is None)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [r["id"] for r in read_rows(out)] == ["a1", "a2", "b1", "b2"]
    # resumed by the Ray runner (the runner changes speed, not answers), in an embedded Ray of its own; the
    # held URL is closed now, so its clip is an error row
    result = _run_cli(*args, "runner=ray", "ray.num_cpus=2")
    assert result.returncode == 0, result.stderr[-3000:]
    ids = [r["id"] for r in read_rows(out)]
    assert sorted(ids) == sorted([*data["ids"], "h1"])  # every id exactly once
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["this_run"]["rows"] == 4  # a3, and the three clips that fail: h1, x1, m1
    # the console shows the job, not Ray's internals (its embedded session is quieted)
    for noise in ("Token authentication", "core_worker", "Progress bars disabled", "streaming_executor",
                  "Set ray log level"):
        assert noise not in result.stderr, noise
    assert "8 rows, 5 answered, 3 errors" in result.stdout  # the job's summary, as a short table


def test_sweep_runs_each_job_in_its_own_folder(data, tmp_path):
    # the local runner: a job's own Ray and its quiet console are the resume test's (above)
    result = _run_cli(
        "-m", "compression=none,visionzip", f"model.path={data['model']}", "model.dtype=float32",
        f"data.manifest={data['manifest']}", "runner=local", "pipeline.generation.max_new_tokens=2",
        f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${hydra.job.num}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("7 rows, 5 answered, 2 errors") == 2  # each job's summary, as a short table
    kept = {}
    for job in ("0", "1"):
        rows = read_rows(tmp_path / job / "predictions.jsonl")
        assert sorted(r["id"] for r in rows) == sorted(data["ids"])
        kept[job] = {r["visual_tokens_kept"] for r in rows if r["error"] is None}
    assert kept == {"0": {8 * 257}, "1": {8 * 17}}
    # the sweep's table: one row per job, retention against the compression=none job
    table = score_main([str(tmp_path)])
    assert [(r["setting"].split()[0], r["visual_tokens"]) for r in table] == [
        ("compression=none", 8 * 257), ("compression=visionzip", 8 * 17)]
    # the random tiny model answers its one answered question wrong: no reference to retain against
    assert table[0]["overall"] == 0.0 and table[0]["retention"] is None
    assert (tmp_path / "scores_table.md").read_text().count("\n") == 4


def test_a_dead_worker_is_restarted_and_its_batch_retried_in_a_callers_ray_left_running(data, tmp_path,
                                                                                        caller_ray):
    from pipelines.job import ray_session
    from pipelines.manifest import group_by_video, read_manifest
    from pipelines.runner import item_rows, question_rows, run_ray

    job = job_config(data, tmp_path / "unused.jsonl", "ray.num_cpus=2", "resources.decode.batch_size=1",
                     "resources.encode.batch_size=1", "resources.answer.batch_size=1")
    questions = read_manifest(data["manifest"])
    rows = item_rows(group_by_video(questions))
    done, killed = [], []

    def kill_the_encoder_once(video_row: dict) -> None:
        done.extend(question_rows(video_row, {q.id: q for q in questions}))
        if not killed:
            for proc in psutil.process_iter(["cmdline"]):
                if "MapBatches(EncodeStage)" in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(len(done))  # rows out when the worker died

    with ray_session(job):  # the caller's session: used, and left running
        run_ray(job, rows, kill_the_encoder_once)
    assert caller_ray.is_initialized()
    assert len(killed) == 1 and killed[0] < len(data["ids"])  # it died with work still to do
    assert sorted(r["id"] for r in done) == sorted(data["ids"])
    assert sum(r["error"] is None for r in done) == 5
