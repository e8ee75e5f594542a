"""The shipped synth checkpoints (models/synth, models/synth-full) load and answer their fixed set as their
metrics.json says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.train import fixed_set_accuracy

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.parametrize("name", ["synth", "synth-full"])
def test_shipped_checkpoint_is_small_and_answers_its_fixed_set_as_recorded(name: str):
    model = MODELS / name
    assert (model / "model.safetensors").stat().st_size < 20 * 2**20
    recorded = json.loads((model / "metrics.json").read_text())["fixed_set"]
    result = fixed_set_accuracy(model, recorded["seed"], recorded["clips"])
    assert result["overall"]["n"] == recorded["n"] == 5 * recorded["clips"]
    assert {t: g["correct"] for t, g in result["types"].items()} == recorded["per_type_correct"]
    assert result["overall"]["correct"] == recorded["correct"]
    assert recorded["correct"] >= 0.5 * recorded["n"]  # far above chance (about 1/3): the model learned
