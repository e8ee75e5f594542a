"""Projector tuning (`tune.py`): only the projector learns, the loss falls, checkpoints resume to
the same weights, grad accumulation equals a bigger batch, bad inputs are named, and the tuned file is
what a QA job loads with `model.projector_path`."""

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from safetensors.torch import load_file, save_file

import pipelines.tune as tune
from pipelines.config import ConfigError, TuneConfig, compose_tune
from pipelines.manifest import ManifestError
from pipelines.tune import run_tune
from stages.encode import CompressedVideo, CompressionConfig, EncodeStage
from stages.model import ModelConfig, load_projector, load_video_llava
from synthqa.dataset import write_dataset
from synthqa.model import new_model, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A small synth-shaped model (112 px, 65 tokens per frame), 4 clips x 5 questions, and the same
    manifest with a row about a file that is not a video."""
    root = tmp_path_factory.mktemp("tune")
    model, tokenizer = new_model(5, width=32, lm_width=64, lm_layers=1)
    folder = save_checkpoint(model, tokenizer, root / "model", torch.float32)
    manifest = write_dataset(root / "clips", seed=11, clips=4)
    (root / "clips" / "junk.mp4").write_bytes(b"not a video")
    broken = root / "clips" / "with_junk.jsonl"
    junk = {"id": "junk-color", "video": "junk.mp4", "question": "What color is the circle?", "answer": "red"}
    broken.write_text(manifest.read_text() + json.dumps(junk) + "\n")
    return {"model": folder, "manifest": manifest, "broken": broken, "root": root}


def tune_job(data: dict, out: Path, *overrides: str, manifest: Path | None = None):
    return compose_tune(
        f"model.path={data['model']}", "model.dtype=float32", "decode.size=null",
        f"data.manifest={manifest or data['manifest']}", f"tune.out={out}", "tune.steps=6",
        "tune.batch_size=4", "tune.lr=3e-3", "tune.warmup_steps=1", "tune.checkpoint_every=2",
        "compression=visionzip", "compression.dominant=4", "compression.contextual=1", *overrides,
    )


def projector_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "projector.safetensors"))


def test_tuning_through_the_job_lowers_the_loss_and_lists_the_bad_video(data, tmp_path):
    # the shipped synth model (a randomly initialised LLM hardly responds to its projector), starting from
    # a scrambled projector (`model.projector_path`: tuning continues from it), so there is a loss to lower
    shipped, _ = load_video_llava(ROOT / "models" / "synth", dtype="float32", device="cpu")
    generator = torch.Generator().manual_seed(0)
    weights = {k: v[torch.randperm(len(v), generator=generator)] if v.dim() == 2 else v
               for k, v in shipped.model.multi_modal_projector.state_dict().items()}  # fmt: skip
    save_file(weights, str(tmp_path / "scrambled.safetensors"))
    job = tune_job(data, tmp_path / "t", f"model.path={ROOT / 'models' / 'synth'}", "tune.steps=30",
                   f"model.projector_path={tmp_path / 'scrambled.safetensors'}", manifest=data["broken"])
    summary = run_tune(job)
    assert (summary["questions"], summary["videos"]) == (20, 4)
    assert [e["ids"] for e in summary["errors"]] == [["junk-color"]]
    assert summary["errors"][0]["video"].endswith("junk.mp4")
    assert "not a readable video" in summary["errors"][0]["error"]
    written = json.loads(Path(summary["summary"]).read_text())
    losses = written["losses"]
    assert len(losses) == 30 and sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert summary["loss_last"] == losses[-1] and written["compression"]["dominant"] == 4


def tune_directly(data: dict, out: Path, dtype: str) -> tuple[torch.nn.Module, dict, list[float]]:
    """`tune_projector` for 3 steps on 2 random token sets of the small model loaded in `dtype`, into
    `out`: (the tuned model, its weights before, the step losses)."""
    model, tokenizer = load_video_llava(data["model"], dtype=dtype, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    videos = [CompressedVideo(torch.randn(8 * 5, 32, generator=torch.Generator().manual_seed(i)))
              for i in range(2)]
    examples = [(0, "What color is the circle?", "red"), (1, "How many objects are there?", "two")]
    cfg = TuneConfig(out=str(out), steps=3, batch_size=2, lr=1e-2, warmup_steps=0)
    return model, before, tune.tune_projector(model, tokenizer, videos, examples, cfg)


def test_only_the_projector_changes_and_a_qa_job_loads_it(data, tmp_path):
    model, before, _ = tune_directly(data, tmp_path / "t", "float32")
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("model.multi_modal_projector.")}
    saved = projector_of(tmp_path / "t")
    assert all(torch.equal(saved[k], after[f"model.multi_modal_projector.{k}"]) for k in saved)
    # the QA job answers with the tuned projector: its embeddings are the tuned projector's
    model_config = ModelConfig(str(data["model"]), dtype="float32", device="cpu")
    full = CompressionConfig(method="none")
    plain = EncodeStage(model_config, compression=full)
    tuned_projector = str(tmp_path / "t" / "projector.safetensors")
    tuned = EncodeStage(ModelConfig(str(data["model"]), "float32", "cpu", projector_path=tuned_projector),
                        compression=full)
    frames = torch.randint(0, 255, (8, 112, 112, 3), dtype=torch.uint8).numpy()
    with torch.no_grad():
        expected = model.model.multi_modal_projector(plain.compressed_tokens([frames])[0].clone())
    torch.testing.assert_close(tuned.encode([frames])[0].embeds, expected)
    assert not torch.allclose(plain.encode([frames])[0].embeds, tuned.encode([frames])[0].embeds)


def test_a_bfloat16_model_tunes_its_projector_in_float32(data, tmp_path):
    # the 7B's setting (bf16 weights), on the CPU: the projector learns in float32, the rest stays bf16
    # and bit-identical, and a bf16 QA model loads the result
    model, before, losses = tune_directly(data, tmp_path / "t", "bfloat16")
    _, _, float32_losses = tune_directly(data, tmp_path / "f", "float32")
    assert losses == pytest.approx(float32_losses, rel=0.02)  # the same run, to bf16's precision
    assert losses[-1] < losses[0]
    after = model.state_dict()
    projector = {k for k in before if k.startswith("model.multi_modal_projector.")}
    assert {k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))} == projector
    assert {after[k].dtype for k in projector} == {torch.float32}
    assert {after[k].dtype for k in after if k not in projector} == {torch.bfloat16}
    qa, _ = load_video_llava(data["model"], dtype="bfloat16", device="cpu")
    load_projector(qa, tmp_path / "t" / "projector.safetensors")
    for k, v in qa.model.multi_modal_projector.state_dict().items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, after[f"model.multi_modal_projector.{k}"].to(torch.bfloat16))


def test_a_killed_run_resumes_to_the_same_weights(data, tmp_path, monkeypatch):
    run_tune(tune_job(data, tmp_path / "straight"))
    real_loss, calls = tune.answer_loss, []

    def dies_in_step_four(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(tune, "answer_loss", dies_in_step_four)
    with pytest.raises(KeyboardInterrupt):
        run_tune(tune_job(data, tmp_path / "killed"))
    state = torch.load(tmp_path / "killed" / tune.STATE, weights_only=True)
    assert state["step"] == 2  # the checkpoint every 2 steps; step 3 was lost with the process
    monkeypatch.setattr(tune, "answer_loss", real_loss)
    run_tune(tune_job(data, tmp_path / "killed"))
    resumed = json.loads((tmp_path / "killed" / "tune.json").read_text())
    straight = json.loads((tmp_path / "straight" / "tune.json").read_text())
    assert resumed["losses"] == straight["losses"]
    a, b = projector_of(tmp_path / "straight"), projector_of(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="checkpoint of another tuning run"):
        run_tune(tune_job(data, tmp_path / "killed", "tune.lr=1e-3"))
    # same model path and settings, other starting weights (as after retraining the checkpoint in place)
    tuned = tmp_path / "straight" / "projector.safetensors"
    with pytest.raises(ValueError, match='"projector": "[0-9a-f]{64}"'):  # this run's, in the message
        run_tune(tune_job(data, tmp_path / "killed", f"model.projector_path={tuned}"))
    run_tune(tune_job(data, tmp_path / "killed", "tune.lr=1e-3", "tune.resume=false"))
    fresh = json.loads((tmp_path / "killed" / "tune.json").read_text())
    assert fresh["losses"][0] == straight["losses"][0] and fresh["losses"][1:] != straight["losses"][1:]


def test_gradient_accumulation_equals_one_bigger_batch(data, tmp_path):
    run_tune(tune_job(data, tmp_path / "one", "tune.steps=2", "tune.batch_size=8"))
    run_tune(tune_job(data, tmp_path / "two", "tune.steps=2", "tune.grad_accum=2"))
    one, two = (json.loads((tmp_path / name / "tune.json").read_text()) for name in ("one", "two"))
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)
    a, b = projector_of(tmp_path / "one"), projector_of(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=5e-5, rtol=1e-4)  # Adam steps are ~lr = 3e-3


def test_bad_tuning_inputs_are_named(data, tmp_path):
    unanswered = tmp_path / "q.jsonl"
    rows = [json.loads(line) for line in data["manifest"].read_text().splitlines()]
    rows[1].pop("answer")
    unanswered.write_text("".join(json.dumps({**r, "video": str(data["manifest"].parent / r["video"])}) + "\n"
                                  for r in rows))  # fmt: skip
    with pytest.raises(ManifestError, match=f"none for 1 ids: {rows[1]['id']}"):
        run_tune(tune_job(data, tmp_path / "t", manifest=unanswered))
    with pytest.raises(ConfigError, match=r"tune.steps=0 must be >= 1"):
        tune_job(data, tmp_path / "t", "tune.steps=0")
    with pytest.raises(ConfigError, match=r"tune.needs lr > 0"):
        tune_job(data, tmp_path / "t", "tune.lr=0")
    with pytest.raises(ConfigError, match="dominant \\+ contextual = 70 \\+ 1 = 71 exceeds the 65 tokens"):
        run_tune(tune_job(data, tmp_path / "t", "compression.dominant=70"))  # the model's, before any work
    # the tuning config has no question-answering fields
    with pytest.raises(ConfigCompositionException, match="output"):
        tune_job(data, tmp_path / "t", "output.path=x.jsonl")


def test_question_order_is_a_function_of_seed_and_position():
    order = tune.QuestionOrder(5, seed=3)
    stream = order.batch(0, 15)
    assert sorted(stream[:5]) == sorted(stream[5:10]) == list(range(5)) and stream[:5] != stream[5:10]
    assert tune.QuestionOrder(5, seed=3).batch(7, 4) == stream[7:11]


def test_tune_py_tunes_into_the_hydra_output_folder(data, tmp_path):
    import subprocess
    import sys

    subprocess.run([
        sys.executable, str(ROOT / "tune.py"), "model=synth", f"model.path={data['model']}",
        "decode.size=null", f"data.manifest={data['manifest']}", "tune.steps=2", "compression.dominant=4",
        "compression.contextual=1", f"hydra.run.dir={tmp_path}",
    ], check=True, cwd=tmp_path, capture_output=True, timeout=300)  # fmt: skip
    summary = json.loads((tmp_path / "tuned" / "tune.json").read_text())
    assert summary["steps"] == 2 and summary["questions"] == 20
    assert set(projector_of(tmp_path / "tuned")) == {"linear_1.weight", "linear_1.bias", "linear_2.weight",
                                                     "linear_2.bias"}
