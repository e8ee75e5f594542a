"""`python -m bench.gpu_check`: the GPU check's steps, run on the CPU with the tiny geometry, and the 7B
geometry it builds on a GPU (counted on the meta device, nothing allocated)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import spans_overlap, video_llava_7b_config
from pipelines.runner import gpu_shares
from stages.model import ModelConfig, half_parameters
from stages.testing import tiny_tokenizer
from visionzip.video_llava import tokens_per_frame

ROOT = Path(__file__).resolve().parents[1]


def is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_tiny_check_on_the_cpu_writes_every_number(tmp_path: Path) -> None:
    """The whole check on the CPU (no GPU visible, as on a machine without one): the checkpoint, both
    prefills, the job with automatic placement and each stage actor's memory, vLLM skipped with its reason;
    gpu.json in the benchmarks' format with real numbers where the CPU has them."""
    command = [sys.executable, "-m", "bench.gpu_check", "--tiny", "--workdir", str(tmp_path / "work"),
               "--results", str(tmp_path), "--cpus", "2", "--clips", "2", "--questions", "2",
               "--new-tokens", "2", "--repeats", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert set(result) == {"bench", "when", "machine", "rows", "ratios", "goals"}
    assert result["bench"] == "gpu" and result["machine"]["gpu"] is None
    rows = {row["case"]: row for row in result["rows"]}
    assert list(rows) == ["checkpoint", "prefill_full", "prefill_visionzip", "job_hf", "job_vllm"]

    built = rows["checkpoint"]
    assert built["geometry"] == "tiny" and built["device"] == "cpu"
    assert built["parameters"] > 100_000 and built["safetensors_gb"] > 0
    assert (rows["prefill_full"]["visual_tokens"], rows["prefill_full"]["tokens"]) == (8 * 257, 8 * 257 + 50)
    assert (rows["prefill_visionzip"]["visual_tokens"], rows["prefill_visionzip"]["tokens"]) == (136, 186)
    assert all(is_real(rows[case]["seconds"]) and rows[case]["seconds"] > 0
               for case in ("checkpoint", "prefill_full", "prefill_visionzip"))

    job = rows["job_hf"]
    assert (job["rows"], job["errors"]) == (4, 0)
    for key in ("seconds", "rows_per_s", "answer_rows_per_s", "encode_answer_overlap_s",
                "encode_gpu_max_allocated_mb", "answer_gpu_max_allocated_mb"):
        assert is_real(job[key]) and job[key] >= 0, key
    assert job["rows_per_s"] > 0 and job["answer_rows_per_s"] > 0
    assert job["device_gpu_used_peak_mb"] is None  # no GPU to sample
    assert {stage: p["num_gpus"] for stage, p in job["placement"].items()} == {
        "decode": 0.0, "encode": 0.0, "answer": 0.0}
    # one report per stage actor, from its own process: no CUDA used, the RSS of a process holding torch
    assert sorted(actor["stage"] for actor in job["actors"]) == ["answer", "decode", "encode"]
    assert len({actor["pid"] for actor in job["actors"]}) == 3
    for actor in job["actors"]:
        assert actor["gpu_max_allocated_mb"] == 0.0 and actor["gpu_max_reserved_mb"] == 0.0
        assert is_real(actor["peak_rss_mb"]) and actor["peak_rss_mb"] > 100
        assert 0 < actor["peak_anon_rss_mb"] <= actor["peak_rss_mb"]
    assert set(job["timeline"]) == {"decode", "encode", "answer"}
    assert job["encode_answer_overlap_s"] == round(spans_overlap(job["timeline"], "encode", "answer"), 3)
    assert rows["job_vllm"] == {"case": "job_vllm", "skipped": "no CUDA GPU (this check measures vLLM on a "
                                                                "GPU; its CPU build is covered by the tests)"}

    ratios = result["ratios"]
    assert set(ratios) == {"prefill_full_over_visionzip", "steps_s_checkpoint", "steps_s_prefill",
                           "steps_s_job_hf", "steps_s_total"}
    assert all(is_real(value) and value > 0 for value in ratios.values())
    measured = rows["prefill_full"]["seconds"] / rows["prefill_visionzip"]["seconds"]
    assert math.isclose(ratios["prefill_full_over_visionzip"], measured, rel_tol=1e-2)
    assert ratios["steps_s_total"] >= ratios["steps_s_job_hf"] + ratios["steps_s_prefill"]
    assert set(result["goals"]) == {"total_seconds", "job_hf_error_rows"}
    assert result["goals"]["total_seconds"]["value"] == ratios["steps_s_total"]
    assert result["goals"]["job_hf_error_rows"] == {"op": "<=", "target": 0, "value": 0, "met": True}


def test_the_7b_geometry_is_video_llava_7b(tmp_path: Path) -> None:
    """What the check builds on a GPU: Video-LLaVA-7B's towers (257 tokens a frame) and LLaMA-7B, so that
    placement gives encode and answer the 7B's shares of the GPU."""
    config = video_llava_7b_config(tiny_tokenizer())
    assert tokens_per_frame(config) == 257
    assert half_parameters(config) == {"vision": 324_159_488, "language": 6_738_939_904}
    config.save_pretrained(tmp_path)
    assert gpu_shares(ModelConfig(path=str(tmp_path))) == {"encode": 0.1, "answer": 0.9}


def test_spans_overlap() -> None:
    timeline = {"encode": {"first_start": 1.0, "last_end": 5.0},
                "answer": {"first_start": 3.0, "last_end": 9.0},
                "decode": {"first_start": 0.0, "last_end": 0.5}}
    assert spans_overlap(timeline, "encode", "answer") == 2.0
    assert spans_overlap(timeline, "answer", "encode") == 2.0
    assert spans_overlap(timeline, "decode", "answer") == 0.0  # one after the other
    assert spans_overlap({"encode": timeline["encode"]}, "encode", "answer") == 0.0  # answer never ran
