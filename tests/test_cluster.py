"""The job on an external two-node Ray cluster on loopback (its own temp dir, stopped by its processes,
never by `ray stop`): both nodes decode, encode and answer; a node killed mid-job still leaves every id
answered once; an embedded job beside that cluster starts its own Ray."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from held_url import HeldUrl

from pipelines.config import compose_job
from pipelines.job import ray_session
from synthqa.sample_videos import write_video

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RAY = str(Path(PYTHON).parent / "ray")
CLIPS = 16
# a lost node is declared dead after ~6 s of missed health checks instead of Ray's default ~15 s; not
# sooner, or a node merely slowed by a busy machine would be declared dead too
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5",
                   "RAY_health_check_timeout_ms": "2000", "RAY_health_check_initial_delay_ms": "1000"}


@dataclass
class Cluster:
    address: str
    env: dict
    temp_dir: str
    worker_port: int  # the worker node's raylet port: what names its processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head and a worker node, 2 CPUs each, no GPU; shared by this module's tests (the node-loss test,
    last, kills the worker)."""
    port, worker_port = _free_port(), _free_port()
    # a loopback test cluster: no token authentication between its nodes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **FAST_NODE_DEATH}
    common = ["--disable-usage-stats", "--num-gpus=0", "--num-cpus=2", "--node-ip-address=127.0.0.1"]
    temp_dir = tempfile.mkdtemp(prefix="vzray", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                        f"--temp-dir={temp_dir}", *common],
                       check=True, capture_output=True, env=env, timeout=120)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", f"--node-manager-port={worker_port}",
                        *common], check=True, capture_output=True, env=env, timeout=120)
        yield Cluster(f"127.0.0.1:{port}", env, temp_dir, worker_port)
    finally:
        stop_processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_processes_of(temp_dir: str) -> None:
    """Stop the test cluster's processes only (`ray stop` would end every Ray on the machine): those
    whose command line names its temp dir (both nodes' raylets, GCS, workers), and their children."""
    _end([p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])],
         signal_first="terminate")


def kill_worker_node(cluster: Cluster) -> None:
    """SIGKILL the worker node, as a machine lost: its raylet and everything it started."""
    mark = f"--node_manager_port={cluster.worker_port}"
    _end([p for p in psutil.process_iter(["cmdline"]) if mark in " ".join(p.info["cmdline"] or [])],
         signal_first="kill")


def _end(processes: list[psutil.Process], signal_first: str) -> None:
    family = {p.pid: p for p in processes}
    for proc in processes:
        try:
            family.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for proc in family.values():
        try:
            getattr(proc, signal_first)()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(family.values()), timeout=5)
    for proc in alive:
        proc.kill()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """16 small clips, two questions each."""
    root = tmp_path_factory.mktemp("clips")
    rows = []
    for i in range(CLIPS):
        write_video(root / f"v{i}.mp4", num_frames=40, width=96, height=64)
        rows += [{"id": f"q{i}a", "video": f"v{i}.mp4", "question": "What is it?"},
                 {"id": f"q{i}b", "video": f"v{i}.mp4", "question": "Why?"}]
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "m.jsonl"


def job_args(cluster: Cluster, tiny_dir: Path, clips: Path, folder: Path) -> list[str]:
    return [str(ROOT / "run.py"), "ray=cluster", f"ray.address={cluster.address}", f"model.path={tiny_dir}",
            "model.dtype=float32", f"data.manifest={clips}", f"output.path={folder / 'out.jsonl'}",
            "pipeline.generation.max_new_tokens=2", "resources.decode.batch_size=1",
            "resources.encode.batch_size=1", "resources.answer.batch_size=1",
            f"hydra.run.dir={folder / 'hydra'}"]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def job_log(folder: Path) -> str:
    return "".join(p.read_text() for p in (folder / "hydra").glob("*.log"))


def stage_actor_nodes(cluster: Cluster, monkeypatch) -> tuple[set[str], dict[str, set[str]]]:
    """The cluster's node ids, and per stage the nodes its actors ran on (from the GCS's actor table,
    which keeps dead actors)."""
    import ray
    from ray._private.state import actors

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        nodes = {node["NodeID"] for node in ray.nodes()}
        placed: dict[str, set[str]] = {}
        for actor in actors().values():
            for stage in ("decode", "encode", "answer"):
                if f"({stage.capitalize()}Stage)" in actor["ActorClassName"]:
                    placed.setdefault(stage, set()).add(actor["Address"]["NodeID"])
        return nodes, placed
    finally:
        ray.shutdown()


def test_both_nodes_decode_encode_and_answer_by_a_plan_per_node(cluster, tiny_dir, clips, tmp_path,
                                                                 monkeypatch):
    result = subprocess.run([PYTHON, *job_args(cluster, tiny_dir, clips, tmp_path)], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env=cluster.env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}{q}" for i in range(CLIPS) for q in "ab")
    assert all(r["error"] is None for r in rows)
    nodes, placed = stage_actor_nodes(cluster, monkeypatch)
    assert len(nodes) == 2 and placed == {"decode": nodes, "encode": nodes, "answer": nodes}
    for stage in ("decode", "encode", "answer"):  # each row names the nodes that ran its stages
        assert {r[f"{stage}_node"] for r in rows} <= nodes
    # the plan, logged: each node's own pools (2 CPUs each: one decoder beside an encoder and an answerer)
    log = job_log(tmp_path)
    assert ("placement: decode 2 x (cpu 1, gpu 0), encode 2 x (cpu 0.5, gpu 0), "
            "answer 2 x (cpu 0.5, gpu 0)") in log
    assert log.count("(2 CPUs, 0 GPUs): decode 1, encode 1, answer 1") == 2
    status = subprocess.run([RAY, "status", f"--address={cluster.address}"], capture_output=True, text=True,
                            env=cluster.env, timeout=60)
    assert "4.0 CPU" in status.stdout  # both nodes still up: the job started and stopped nothing


def test_an_embedded_job_beside_a_running_cluster_starts_its_own_ray(cluster, tiny_dir, monkeypatch):
    # RAY_ADDRESS names the cluster, as a shell that used it would: the default job still runs its own Ray
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    job = compose_job(f"model.path={tiny_dir}", "data.manifest=m.jsonl", "output.path=o.jsonl",
                      "ray.num_cpus=1")
    import ray

    with ray_session(job):
        assert ray.cluster_resources()["CPU"] == 1.0  # not the cluster's 4
        assert len(ray.nodes()) == 1
    assert not ray.is_initialized()


def test_a_node_lost_mid_job_leaves_every_id_answered_once(cluster, tiny_dir, clips, tmp_path):
    out, manifest = tmp_path / "out.jsonl", tmp_path / "m.jsonl"
    with HeldUrl() as held:  # a clip the job cannot finish while it is held: the node is lost mid-job
        manifest.write_text(clips.read_text() + json.dumps({"id": "held", "video": held.url,
                                                              "question": "What is it?"}) + "\n")
        args = [*job_args(cluster, tiny_dir, manifest, tmp_path), f"data.video_root={clips.parent}",
                "decode.remote.tries=1", "decode.remote.timeout=600"]
        job = subprocess.Popen([PYTHON, *args], cwd=ROOT, env=cluster.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 600  # a hang guard only: a loaded machine starts the pools slowly
            while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 4):
                assert job.poll() is None, job.stderr.read()[-3000:]
                time.sleep(0.05)
            answered_before = len(out.read_text().splitlines())
            kill_worker_node(cluster)
            held.close()  # from now on a read of the held clip fails at once: an error row
            _, stderr = job.communicate(timeout=600)
        finally:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    rows = read_rows(out)
    assert answered_before < len(rows)
    assert sorted(r["id"] for r in rows) == sorted(  # each once
        [f"q{i}{q}" for i in range(CLIPS) for q in "ab"] + ["held"])
    assert [r["id"] for r in rows if r["error"] is not None] == ["held"]
    assert "(2 CPUs, 0 GPUs) left the cluster" in job_log(tmp_path)
