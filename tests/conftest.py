"""Shared fixtures: one tiny random Video-LLaVA for the whole session. (Configs are composed with
`pipelines.config.compose_job` / `compose_tune`, as the benches do.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.model import load_video_llava
from stages.testing import build_tiny_video_llava

# One thread for torch's CPU kernels in the test process: the tests' models are tiny, and two threads on a
# machine whose cores are taken (CI neighbours, `make test-loaded`) spin against each other (measured on a
# busy 2-core machine: tests/test_train.py 39 s with torch's default, 7 s with one thread). Not through
# OMP_NUM_THREADS, which would also change what decord's reader does in the background (test_decode.py).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random Video-LLaVA (257 tokens per frame, like the 7B), built once into a folder."""
    return build_tiny_video_llava(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) loaded in float32 on the CPU, so comparisons with HF's own path can be tight.
    Shared by every test: a test must not change its weights."""
    return load_video_llava(tiny_dir, dtype="float32", device="cpu")
