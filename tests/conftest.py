"""Shared fixtures: one tiny random Video-LLaVA for the whole session. (Configs are composed with
`pipelines.config.compose_job` / `compose_tune`, as the benches do.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per process for torch's (OpenMP's) CPU kernels, in this process and, through the environment,
# in every process a test starts (run.py, Ray's workers): the tests' models are tiny, and two threads a
# process on a machine whose cores are taken (a parallel job, CI neighbours, `make test-loaded`) spin
# against each other: measured, tests/test_train.py took 39 s with torch's default on a busy 2-core machine,
# 7 s with one thread. Set before torch is imported; a value already set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from stages.model import load_video_llava  # noqa: E402
from stages.testing import build_tiny_video_llava  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random Video-LLaVA (257 tokens per frame, like the 7B), built once into a folder."""
    return build_tiny_video_llava(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) loaded in float32 on the CPU, so comparisons with HF's own path can be tight.
    Shared by every test: a test must not change its weights."""
    return load_video_llava(tiny_dir, dtype="float32", device="cpu")
