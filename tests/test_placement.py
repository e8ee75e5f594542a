"""GPU-ready placement: stages sharing a GPU by their model halves, each loading only its half, embeddings
in the model's dtype between stages, a timeline; on this CPU machine by declaring GPUs to Ray."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlamaConfig

import pipelines.runner as runner
import stages.model as model_module
from pipelines.config import ConfigError, compose_job
from pipelines.job import run_job
from pipelines.runner import RAY_UNITS, Node, gpu_shares, placement, unplaced_gpu_actor
from stages.answer import AnswerConfig, AnswerStage, GenerateConfig
from stages.columns import from_column, to_column
from stages.encode import EncodeStage
from stages.model import ModelConfig, checkpoint_tensors, half_parameters, load_video_llava
from stages.testing import tiny_tokenizer, video_llava_config
from synthqa.sample_videos import write_video


def box(gpus: int, cpus: float) -> list[Node]:
    """A one-node cluster."""
    return [Node("box", float(cpus), gpus)]


def job_for(tiny_dir: Path, *overrides: str):
    return compose_job(f"model.path={tiny_dir}", "data.manifest=m.jsonl", "output.path=o.jsonl", *overrides)


def test_placement_shares_a_gpu_by_model_halves_and_scales_answer_actors(tiny_dir):
    job = job_for(tiny_dir)
    shares = gpu_shares(job.model)
    no_gpu = placement(job, box(gpus=0, cpus=2)).stages
    assert {name: (r.num_gpus, r.pool_size) for name, r in no_gpu.items()} == {
        "decode": (0.0, 1), "encode": (0.0, 1), "answer": (0.0, 1)}
    one = placement(job, box(gpus=1, cpus=16)).stages
    assert (one["encode"].num_gpus, one["answer"].num_gpus) == (shares["encode"], shares["answer"])
    assert one["encode"].num_gpus + one["answer"].num_gpus <= 1.0  # both fit on the one GPU at once
    assert (one["encode"].pool_size, one["answer"].pool_size, one["decode"].pool_size) == (1, 1, 8)
    two = placement(job, box(gpus=2, cpus=4)).stages
    assert (two["answer"].pool_size, two["encode"].pool_size, two["decode"].pool_size) == (2, 1, 2)
    # what the config sets is kept when the cluster holds it
    pinned = placement(job_for(tiny_dir, "resources.answer.num_gpus=1", "resources.answer.pool_size=2",
                               "resources.encode.num_gpus=0"), box(gpus=2, cpus=4)).stages
    assert [(pinned[s].num_gpus, pinned[s].pool_size) for s in ("encode", "answer")] == [(0, 1), (1, 2)]


def test_a_gpu_asked_for_more_than_it_holds_is_refused_saying_what_to_change(tiny_dir):
    # the tiny model's encoder takes 0.45 of a GPU: a whole GPU for answer leaves it no room
    with pytest.raises(ConfigError) as refused:
        placement(job_for(tiny_dir, "resources.answer.num_gpus=1"), box(gpus=1, cpus=16))
    assert str(refused.value) == (
        "invalid configuration:\n  resources.encode.num_gpus=0.45 (automatic) and "
        "resources.answer.num_gpus=1 need 1.45 GPUs on one GPU: Ray could not hold all their actors at once "
        "(the pools would run one after the other, or wait forever). Lower one of them, e.g. "
        "resources.encode.num_gpus=0 keeps encode on the CPU, or leave resources.answer.num_gpus unset")
    with pytest.raises(ConfigError, match=r"answer.num_gpus=1 x 3 actors need 3.45 GPUs on a cluster of 2: "
                                          r".* or lower resources.answer.pool_size$"):
        placement(job_for(tiny_dir, "resources.answer.num_gpus=1", "resources.answer.pool_size=3"),
                  box(gpus=2, cpus=4))
    with pytest.raises(ConfigError, match=r"answer.num_gpus=0.5 needs 0.5 GPUs, and the cluster has no GPU: "
                                          r".* Lower it, e.g. leave resources.answer.num_gpus unset$"):
        placement(job_for(tiny_dir, "resources.answer.num_gpus=0.5"), box(gpus=0, cpus=4))
    # 2.2 of 2 GPUs; and 1.7 of 2 that Ray cannot pack: two 0.6 actors never share a GPU, nor a 0.6 and a 0.5
    with pytest.raises(ConfigError, match="need 2.2 GPUs on a cluster of 2"):
        placement(job_for(tiny_dir, "resources.encode.num_gpus=0.5", "resources.encode.pool_size=2",
                          "resources.answer.num_gpus=0.6", "resources.answer.pool_size=2"),
                  box(gpus=2, cpus=8))
    with pytest.raises(ConfigError, match="need 1.7 GPUs of the cluster's 2, but not GPU by GPU"):
        placement(job_for(tiny_dir, "resources.encode.num_gpus=0.5", "resources.answer.num_gpus=0.6",
                          "resources.answer.pool_size=2"), box(gpus=2, cpus=8))
    with pytest.raises(ConfigError, match="num_gpus=1.5: Ray takes more than one GPU only as a whole number"):
        placement(job_for(tiny_dir, "resources.answer.num_gpus=1.5"), box(gpus=2, cpus=4))
    with pytest.raises(ConfigError, match="num_gpus=0.12345: Ray counts GPU fractions in steps of 0.0001"):
        placement(job_for(tiny_dir, "resources.encode.num_gpus=0.12345"), box(gpus=1, cpus=4))


def test_more_cpus_asked_than_the_cluster_has_are_refused(tiny_dir):
    # two GPUs: one encode and two answer actors of 0.5 CPU each leave 0.5 CPU of 2, less than a decoder's 1
    with pytest.raises(ConfigError) as refused:
        placement(job_for(tiny_dir), box(gpus=2, cpus=2))
    assert str(refused.value).endswith(
        "resources.decode.num_cpus=1, resources.encode.num_cpus=0.5 and resources.answer.num_cpus=0.5 x 2 "
        "actors (automatic pool_size) need 2.5 CPUs, the cluster has 2: lower a num_cpus or a pool_size, or "
        "give Ray more CPUs (ray.num_cpus)")
    with pytest.raises(ConfigError, match="decode.num_cpus=1 x 4 actors, .* need 5 CPUs, the cluster has 4"):
        placement(job_for(tiny_dir, "resources.decode.pool_size=4"), box(gpus=0, cpus=4))
    fits = placement(job_for(tiny_dir, "resources.decode.pool_size=3"), box(gpus=0, cpus=4)).stages
    assert fits["decode"].pool_size == 3


def test_ray_packs_gpu_fractions_best_fit_and_whole_gpus_on_unused_ones():
    def asks(*gpus: float) -> list[tuple[str, int]]:
        return [(f"actor {i}", round(g * RAY_UNITS)) for i, g in enumerate(gpus)]

    # best fit: 0.3 goes to the GPU with 0.3 left, not the first with room (0.4), so 0.4 still fits there
    assert unplaced_gpu_actor(asks(0.6, 0.7, 0.3, 0.4), gpus=[2]) is None
    assert unplaced_gpu_actor(asks(0.3, 0.6, 0.6, 0.5), gpus=[2]) == "actor 3"  # seen hang on a real Ray
    assert unplaced_gpu_actor(asks(0.1, 0.1, 1), gpus=[2]) is None  # the fractions share GPU 0
    assert unplaced_gpu_actor(asks(0.1, 1, 1), gpus=[2]) == "actor 2"
    assert unplaced_gpu_actor(asks(2, 0.5, 0.5), gpus=[3]) is None
    assert unplaced_gpu_actor(asks(0.0, 0.0), gpus=[0]) is None


@pytest.fixture
def seven_b(monkeypatch) -> ModelConfig:
    """The 7B's config (counted without memory, offline) for whatever model path a job names."""
    tokenizer = tiny_tokenizer()
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, tie_word_embeddings=False)
    config = video_llava_config(tokenizer, vision, text)
    monkeypatch.setattr("pipelines.runner.read_model_config", lambda path: config)
    return config


def test_the_7b_shares_its_gpu_one_tenth_to_nine_tenths(seven_b):
    halves = half_parameters(seven_b)
    assert 0.30e9 < halves["vision"] < 0.33e9 and 6.7e9 < halves["language"] < 6.8e9
    assert gpu_shares(ModelConfig("LanguageBind/Video-LLaVA-7B-hf")) == {"encode": 0.1, "answer": 0.9}


@pytest.mark.parametrize("per_gpu", [1, 2, 7])
def test_every_answer_actor_fits_beside_the_encoder_rounded_down(tiny_dir, seven_b, per_gpu):
    job = job_for(tiny_dir, "pipeline.engine=vllm", "compression.positions=compact",
                  f"pipeline.vllm.actors_per_gpu={per_gpu}")
    for gpus in (1, 3):
        placed = placement(job, box(gpus=gpus, cpus=64)).stages
        answer, encode = placed["answer"], placed["encode"]
        assert answer.num_gpus == int(0.9 / per_gpu * RAY_UNITS) / RAY_UNITS  # 7: 0.1285, not 0.1286
        assert answer.pool_size == gpus * per_gpu and encode.num_gpus == 0.1
        assert encode.num_gpus + per_gpu * answer.num_gpus <= 1.0  # the GPU holding the encoder too


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


CLIPS = 4


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    rows = []
    for i in range(CLIPS):
        write_video(root / f"v{i}.mp4", num_frames=40, width=96, height=64)
        rows.append({"id": f"q{i}", "video": f"v{i}.mp4", "question": "What is it?"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "m.jsonl"


def gated_stages(gate: Path) -> tuple[type, type]:
    """The encode and answer stages of a job whose encoder holds its second clip until the answer stage has
    answered one (and made the file `gate`): such a job ends only when Ray runs the two pools at once."""

    class HeldEncoder(EncodeStage):
        calls = 0

        def __call__(self, batch: dict) -> dict:
            self.calls += 1
            deadline = time.monotonic() + 600  # a hang guard only
            while self.calls == 2 and not gate.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("no answer while the encoder held a clip: the pools never ran at once")
                time.sleep(0.05)
            return super().__call__(batch)

    class GateOpener(AnswerStage):
        def __call__(self, batch: dict) -> dict:
            out = super().__call__(batch)
            gate.touch()
            return out

    return HeldEncoder, GateOpener


@pytest.mark.parametrize("gpus, cpus", [(1, 2), (2, 3)])  # two answer actors' 0.5 CPU leave 0.5 of 2
def test_jobs_finish_on_declared_gpus_with_encode_and_answer_running_at_once(tiny_dir, clips, tmp_path, gpus,
                                                                            cpus, monkeypatch):
    # the job ends only if both pools run at once (the encoder waits for an answer), whichever actor loads
    # first and however busy the machine
    encoder, answerer = gated_stages(tmp_path / "answered")
    monkeypatch.setattr(runner, "EncodeStage", encoder)
    monkeypatch.setattr(runner, "AnswerStage", answerer)
    job = compose_job(f"model.path={tiny_dir}", "model.dtype=float32", "model.device=cpu",
                      f"data.manifest={clips}", f"output.path={tmp_path / 'out.jsonl'}",
                      f"ray.num_gpus={gpus}", f"ray.num_cpus={cpus}", "pipeline.generation.max_new_tokens=2",
                      "resources.decode.batch_size=1", "resources.encode.batch_size=1",
                      "resources.answer.batch_size=1")  # fmt: skip
    summary = run_job(job)
    assert (summary["ok"], summary["error"]) == (CLIPS, 0)
    timeline = summary["timeline"]
    assert [timeline[s]["batches"] for s in ("decode", "encode", "answer")] == [CLIPS] * 3
    assert (tmp_path / "out.timeline.txt").read_text().count("#") >= 3


def test_vllm_answer_actors_split_the_answer_share(tiny_dir):
    job = job_for(tiny_dir, "pipeline.engine=vllm", "compression.positions=compact",
                  "pipeline.vllm.actors_per_gpu=2")
    shares = gpu_shares(job.model)
    placed = placement(job, box(gpus=2, cpus=8)).stages
    assert placed["answer"].pool_size == 4 and placed["answer"].num_gpus == shares["answer"] / 2
    assert placed["encode"].num_gpus + 2 * placed["answer"].num_gpus <= 1.0


def test_a_placement_ray_cannot_hold_is_refused_before_any_work(tiny_dir, clips, tmp_path):
    out = tmp_path / "out.jsonl"
    job = compose_job(f"model.path={tiny_dir}", "model.dtype=float32", "model.device=cpu",
                      f"data.manifest={clips}", f"output.path={out}", "ray.num_cpus=2", "ray.num_gpus=1",
                      "resources.answer.num_gpus=1")
    outcome: list[BaseException | dict] = []

    def run() -> None:
        try:
            outcome.append(run_job(job))
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            outcome.append(err)

    worker = threading.Thread(target=run, daemon=True)  # a hang fails the test instead of the suite
    worker.start()
    worker.join(timeout=120)
    assert outcome, "run_job neither ran nor refused within 120 s"
    assert isinstance(outcome[0], ConfigError), outcome[0]
    assert "need 1.45 GPUs on one GPU" in str(outcome[0])
    assert not out.exists() or out.read_text() == ""  # no row: no stage ran
