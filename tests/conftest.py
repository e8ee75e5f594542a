"""Shared fixtures: one tiny random Video-LLaVA for the whole session. (Configs are composed with
`pipelines.config.compose_job` / `compose_tune`, as the benches do.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipelines.job import WORKER_NICENESS
from stages.model import load_video_llava
from stages.testing import build_tiny_video_llava

# One thread for torch's CPU kernels in the test process: the tests' models are tiny, and two threads on a
# machine whose cores are taken (CI neighbours, `make test-loaded`) spin against each other (measured on a
# busy 2-core machine: tests/test_train.py 39 s with torch's default, 7 s with one thread). Not through
# OMP_NUM_THREADS, which would also change what decord's reader does in the background (test_decode.py).
torch.set_num_threads(1)

# Ray's workers at normal priority in the Rays the tests start themselves (the job's embedded Ray does
# this itself: pipelines.job.ray_session). At Ray's default niceness of 15, a busy neighbour took nearly
# all their CPU: one Ray job test went from 29 s to 228 s beside two busy loops.
os.environ.setdefault(WORKER_NICENESS, "0")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random Video-LLaVA (257 tokens per frame, like the 7B), built once into a folder."""
    return build_tiny_video_llava(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) loaded in float32 on the CPU, so comparisons with HF's own path can be tight.
    Shared by every test: a test must not change its weights."""
    return load_video_llava(tiny_dir, dtype="float32", device="cpu")
