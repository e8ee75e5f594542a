"""Shared fixtures: one tiny random Video-LLaVA for the whole session. (Configs are composed with
`pipelines.config.compose_job` / `compose_tune`, as the benches do.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.model import load_video_llava
from stages.testing import build_tiny_video_llava


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random Video-LLaVA (257 tokens per frame, like the 7B), built once into a folder."""
    return build_tiny_video_llava(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) loaded in float32 on the CPU, so comparisons with HF's own path can be tight.
    Shared by every test: a test must not change its weights."""
    return load_video_llava(tiny_dir, dtype="float32", device="cpu")
