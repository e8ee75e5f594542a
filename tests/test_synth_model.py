"""The shipped synth checkpoints (models/synth, models/synth-full) load and answer their fixed set as their
metrics.json says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.encode import CompressionConfig
from synthqa.scoring import fixed_set_accuracy

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.parametrize("name", ["synth", "synth-full"])
def test_shipped_checkpoint_is_small_and_answers_its_fixed_set_as_recorded(name: str):
    model = MODELS / name
    assert (model / "model.safetensors").stat().st_size < 20 * 2**20
    recorded = json.loads((model / "metrics.json").read_text())["fixed_set"]
    result = fixed_set_accuracy(model, recorded["seed"], recorded["clips"])
    assert result["overall"]["n"] == recorded["n"] == 5 * recorded["clips"]
    assert {t: g["correct"] for t, g in result["by_category"].items()} == recorded["per_type_correct"]
    assert result["overall"]["correct"] == recorded["correct"]
    assert recorded["correct"] >= 0.5 * recorded["n"]  # far above chance (about 1/3): the model learned


def test_the_shipped_tuned_projector_wins_back_what_visionzip_costs_the_full_token_model():
    # models/synth-full never read a reduced sequence in its last phase: VisionZip at 5 of 65 tokens a
    # frame costs it answers (mostly direction); its projector, tuned on VisionZip's tokens (pipeline=tune,
    # bench_tuning), wins them back on this fixed set it never saw
    model = MODELS / "synth-full"
    zipped = CompressionConfig("visionzip", dominant=4, contextual=1, positions="compact")  # as it was tuned
    full = json.loads((model / "metrics.json").read_text())["fixed_set"]["correct"]  # checked above
    untuned = fixed_set_accuracy(model, compression=zipped)
    projector = model / "projector-visionzip-5.safetensors"
    tuned = fixed_set_accuracy(model, compression=zipped, projector_path=projector)
    assert untuned["overall"]["correct"] <= full - 4
    assert untuned["by_category"]["direction"]["correct"] <= 6
    assert tuned["overall"]["correct"] >= full - 1
    assert tuned["by_category"]["direction"]["correct"] >= 9
