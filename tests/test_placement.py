"""GPU-ready placement: stages sharing a GPU by their model halves, each loading only its half, embeddings
in the model's dtype between stages, a timeline; on this CPU machine by declaring GPUs to Ray."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlamaConfig

import stages.model as model_module
from pipelines.config import compose_job
from pipelines.job import run_job
from pipelines.runner import gpu_shares, placement
from stages.answer import AnswerConfig, AnswerStage, GenerateConfig
from stages.columns import from_column, to_column
from stages.encode import EncodeStage
from stages.model import ModelConfig, checkpoint_tensors, half_parameters, load_video_llava
from stages.testing import tiny_tokenizer, video_llava_config
from synthqa.sample_videos import write_video


def job_for(tiny_dir: Path, *overrides: str):
    return compose_job(f"model.path={tiny_dir}", "data.manifest=m.jsonl", "output.path=o.jsonl", *overrides)


def test_placement_shares_a_gpu_by_model_halves_and_scales_answer_actors(tiny_dir):
    job = job_for(tiny_dir)
    shares = gpu_shares(job.model)
    no_gpu = placement(job, gpus=0, cpus=2)
    assert {name: (r.num_gpus, r.pool_size) for name, r in no_gpu.items()} == {
        "decode": (0.0, 1), "encode": (0.0, 1), "answer": (0.0, 1)}
    one = placement(job, gpus=1, cpus=16)
    assert (one["encode"].num_gpus, one["answer"].num_gpus) == (shares["encode"], shares["answer"])
    assert one["encode"].num_gpus + one["answer"].num_gpus <= 1.0  # both fit on the one GPU at once
    assert (one["encode"].pool_size, one["answer"].pool_size, one["decode"].pool_size) == (1, 1, 8)
    two = placement(job, gpus=2, cpus=4)
    assert (two["answer"].pool_size, two["encode"].pool_size, two["decode"].pool_size) == (2, 1, 2)
    # what the config sets is kept
    pinned = placement(job_for(tiny_dir, "resources.answer.num_gpus=1", "resources.answer.pool_size=3"),
                       gpus=2, cpus=4)
    assert (pinned["answer"].num_gpus, pinned["answer"].pool_size) == (1, 3)


def test_the_7b_shares_its_gpu_one_tenth_to_nine_tenths(monkeypatch):
    tokenizer = tiny_tokenizer()
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, tie_word_embeddings=False)
    config = video_llava_config(tokenizer, vision, text)
    halves = half_parameters(config)  # counted without memory
    assert 0.30e9 < halves["vision"] < 0.33e9 and 6.7e9 < halves["language"] < 6.8e9
    monkeypatch.setattr("pipelines.runner.read_model_config", lambda path: config)  # the 7B's, offline
    assert gpu_shares(ModelConfig("LanguageBind/Video-LLaVA-7B-hf")) == {"encode": 0.1, "answer": 0.9}


def hub_style_sharded(tiny_dir: Path, folder: Path) -> Path:
    """The tiny checkpoint as Video-LLaVA-7B-hf ships: CLIP's tensors under `vision_model.`, in two
    shards (tower and projector in one, the LLM in the other) with an index."""
    folder.mkdir()
    for name in tiny_dir.iterdir():
        if name.suffix == ".json" or name.name.startswith("tokenizer"):
            (folder / name.name).write_bytes(name.read_bytes())
    hub_names = {}
    for name, tensor in load_file(str(tiny_dir / "model.safetensors")).items():  # saved: `video_tower.x`
        tower = name.split(".", 1)[0]
        renamed = f"{tower}.vision_model.{name.split('.', 1)[1]}" if tower.endswith("_tower") else name
        hub_names[renamed] = tensor
    llm = {k: v for k, v in hub_names.items() if k.startswith("language_model.")}
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in hub_names.items() if k not in llm},
              "model-00002-of-00002.safetensors": llm}
    for shard, part in shards.items():
        save_file(part, str(folder / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_each_stage_reads_only_its_half(tiny_dir, tiny, tmp_path, monkeypatch):
    folder = hub_style_sharded(tiny_dir, tmp_path / "hub")
    opened = []
    real_open = model_module.safe_open
    monkeypatch.setattr(model_module, "safe_open", lambda file, *a, **k: opened.append(Path(file).name)
                        or real_open(file, *a, **k))
    vision, _ = load_video_llava(folder, dtype="float32", device="cpu", keep="vision")
    assert opened == ["model-00001-of-00002.safetensors"]  # the LLM's shard is never opened
    opened.clear()
    language, _ = load_video_llava(folder, dtype="float32", device="cpu", keep="language")
    assert opened == ["model-00002-of-00002.safetensors"]
    full = tiny[0].state_dict()
    for half in (vision, language):  # the same weights as transformers' own loading of the whole model
        for name, value in half.state_dict().items():
            assert torch.equal(value, full[name]), name
    assert sum(p.numel() for p in vision.parameters()) == half_parameters(tiny[0].config)["vision"]
    names = checkpoint_tensors(str(folder), "vision")
    assert names and all(n.startswith(("model.video_tower.", "model.multi_modal_projector.")) for n in names)


def test_bfloat16_embeddings_travel_between_stages_bit_exact(tiny_dir):
    model, tokenizer = load_video_llava(tiny_dir, dtype="bfloat16", device="cpu")
    encode = EncodeStage(model)
    answer = AnswerStage(model, tokenizer, config=AnswerConfig(generation=GenerateConfig(max_new_tokens=4)))
    video = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    in_process = encode.encode([video])[0].embeds
    encoded = encode({"video": ["v"], "frames": [video], "questions": [["What?", "Why?"]]})
    column = encoded["visual_embeds"][0]
    assert encoded["visual_embeds_dtype"] == ["bfloat16"] and column.dtype == np.int16
    assert column.nbytes == in_process.numel() * 2  # half of float32's bytes
    assert torch.equal(from_column(column, "bfloat16"), in_process)  # lossless
    answered = answer(encoded)
    direct = answer.answer([in_process, in_process], ["What?", "Why?"])
    assert answered["predictions"][0] == [a.text for a in direct]
    assert to_column(torch.ones(2, dtype=torch.float16))[1] == "float16"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    rows = []
    for i in range(12):
        write_video(root / f"v{i}.mp4", num_frames=40, width=96, height=64)
        rows.append({"id": f"q{i}", "video": f"v{i}.mp4", "question": "What is it?"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "m.jsonl"


@pytest.mark.parametrize("gpus", [1, 2])
def test_jobs_finish_on_declared_gpus_and_overlap_on_one(tiny_dir, clips, tmp_path, gpus):
    job = compose_job(f"model.path={tiny_dir}", "model.dtype=float32", "model.device=cpu",
                      f"data.manifest={clips}", f"output.path={tmp_path / 'out.jsonl'}",
                      f"ray.num_gpus={gpus}",
                      "ray.num_cpus=2", "decode.num_frames=64", "pipeline.generation.max_new_tokens=2",
                      "resources.decode.batch_size=1", "resources.encode.batch_size=1",
                      "resources.answer.batch_size=1")  # fmt: skip
    summary = run_job(job)
    assert (summary["ok"], summary["error"]) == (12, 0)
    timeline = summary["timeline"]
    assert [timeline[s]["batches"] for s in ("decode", "encode", "answer")] == [12, 12, 12]
    if gpus == 1:  # encode and answer share the GPU: answering starts while encoding goes on (64 frames a
        # video keep the encoder busy long enough to see it, whichever actor finishes loading first)
        assert timeline["answer"]["first_end"] < timeline["encode"]["last_start"], timeline
    assert (tmp_path / "out.timeline.txt").read_text().count("#") >= 3


def test_vllm_answer_actors_split_the_answer_share(tiny_dir):
    job = job_for(tiny_dir, "pipeline.engine=vllm", "pipeline.vllm.actors_per_gpu=2")
    shares = gpu_shares(job.model)
    placed = placement(job, gpus=2, cpus=8)
    assert placed["answer"].pool_size == 4 and placed["answer"].num_gpus == round(shares["answer"] / 2, 4)
    assert placed["encode"].num_gpus + 2 * placed["answer"].num_gpus <= 1.0
