"""The shipped synth checkpoint (models/synth) loads and answers its fixed set as its metrics.json says."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.train import fixed_set_accuracy

MODEL = Path(__file__).resolve().parent.parent / "models" / "synth"


def test_shipped_checkpoint_is_small_and_answers_its_fixed_set_as_recorded():
    assert (MODEL / "model.safetensors").stat().st_size < 20 * 2**20
    recorded = json.loads((MODEL / "metrics.json").read_text())["fixed_set"]
    result = fixed_set_accuracy(MODEL, recorded["seed"], recorded["clips"])
    assert result["overall"]["n"] == recorded["n"] == 5 * recorded["clips"]
    assert {t: g["correct"] for t, g in result["types"].items()} == recorded["per_type_correct"]
    assert result["overall"]["correct"] == recorded["correct"]
    assert recorded["correct"] >= 0.5 * recorded["n"]  # far above chance (about 1/3): the model learned
