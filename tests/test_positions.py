"""`compression.positions=original`: each kept visual token at its place among all of a clip's tokens, from
the encode stage through the answer stage (prefix reuse, conversations), projector tuning, the fingerprint
and the engines' checks."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pipelines.tune as tune
from bench.bench_retention import settings
from pipelines.cli import plain_errors
from pipelines.config import ConfigError, compose_job
from pipelines.job import run_job
from pipelines.sink import OutputError
from stages.answer import AnswerConfig, AnswerStage, GenerateConfig
from stages.encode import CompressionConfig, EncodeStage, TemporalConfig
from stages.engine import Conversation, Sampling, Video, check_video, prompt_positions
from stages.prompts import PromptIds
from synthqa.sample_videos import write_video
from visionzip import ZipResult
from visionzip.clip import zip_clip
from visionzip.positions import clip_positions, pool_offsets, position_order, zip_offsets
from visionzip.video_llava import project

QUESTION = "What color is the circle?"
PER_FRAME = 257  # the tiny model's tokens per frame


def video(frames: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8)


def original(method: str = "visionzip", dominant: int = 4, contextual: int = 2, **temporal
             ) -> CompressionConfig:
    merge = TemporalConfig(enabled=True, **temporal) if temporal else TemporalConfig()
    return CompressionConfig(method, dominant, contextual, merge, positions="original")


# ---------------------------------------------------------------- visionzip.positions (pure)


def test_zip_offsets_are_the_dominant_indices_then_each_clusters_rounded_centre():
    assignment = torch.tensor([[-1, 0, 0, -1, 1, 1, 0, -1, 1, 1]])  # cluster 0: 1, 2, 6; 1: 4, 5, 8, 9
    zipped = ZipResult(torch.zeros(1, 5, 2), torch.tensor([[0, 3, 7]]), torch.tensor([[3, 4]]), assignment)
    assert zip_offsets(zipped).tolist() == [[0, 3, 7, 3, 7]]  # centres 3 and 6.5 (half up)
    alone = ZipResult(torch.zeros(1, 3, 2), torch.tensor([[0, 3, 7]]), torch.zeros(1, 0, dtype=torch.long),
                      torch.full((1, 10), -1))
    assert zip_offsets(alone).tolist() == [[0, 3, 7]]


@pytest.mark.parametrize("keep", [1, 5, 10, 14, 17])
def test_pool_offsets_are_the_centres_of_the_pooled_windows(keep):
    side = 16
    grid = (1 + torch.arange(side * side, dtype=torch.float64)).view(1, 1, side, side)  # each patch's offset
    rows = max(r for r in range(1, int((keep - 1) ** 0.5) + 1) if (keep - 1) % r == 0) if keep > 1 else 0
    expected = [0]
    if keep > 1:  # the same windows pool_tokens averages over: their mean offset, rounded half up
        mean = F.adaptive_avg_pool2d(grid, (rows, (keep - 1) // rows)).flatten()
        expected += (mean + 0.5).floor().long().tolist()
    assert pool_offsets(PER_FRAME, keep).tolist() == expected


def test_clip_positions_count_every_token_of_the_earlier_frames():
    offsets = torch.tensor([[0, 5, 3], [0, 2, 9]])
    assert clip_positions(offsets, 10).tolist() == [0, 5, 3, 10, 12, 19]
    assert clip_positions(offsets, 10, first=torch.tensor([0, 1, 3])).tolist() == [0, 5, 10]
    assert position_order(torch.tensor([0, 5, 3, 3, 10])).tolist() == [0, 2, 3, 1, 4]  # ties keep order
    with pytest.raises(ValueError, match=r"offsets must be \[T, K\], got shape \(6,\)"):
        clip_positions(offsets.flatten(), 10)


def test_the_text_after_the_video_continues_at_its_span():
    prompt = PromptIds([5, 6, 99, 7, 8], 2)
    video = Video(torch.zeros(3, 4), torch.tensor([0, 4, 9]), span=20)
    assert prompt_positions(prompt, check_video(video, 0, 4)).tolist() == [0, 1, 2, 6, 11, 22, 23]
    assert prompt_positions(prompt, Video(video.embeds, video.positions)).tolist() == [0, 1, 2, 6, 11, 12, 13]
    with pytest.raises(ValueError, match="visual span 0 must be an integer > the last visual offset 9"):
        check_video(Video(video.embeds, video.positions, span=9), 0, 4)


def test_compression_config_checks_the_position_rule():
    assert CompressionConfig(positions="original").problems() == []
    assert CompressionConfig(positions="kept").problems() == [
        "positions='kept' is not one of compact, original"]


# ---------------------------------------------------------------- the encode stage


def test_encode_stage_gives_visionzip_tokens_their_places_in_the_full_clip(tiny):
    model = tiny[0]
    frames = video()
    stage = EncodeStage(model, compression=original())
    compact = EncodeStage(model, compression=CompressionConfig("visionzip", 4, 2, positions="compact"))
    got = stage.compressed_videos([frames])[0]
    zipped = zip_clip(model.model.video_tower, stage.preprocess(frames, model.device, model.dtype), 4, 2,
                      layer=-2)
    expected = []
    for f in range(3):  # a plain loop: dominant tokens at their index, contextual at their cluster's centre
        expected += [f * PER_FRAME + int(i) for i in zipped.dominant_index[f]]
        for j in range(2):
            members = (zipped.contextual_assignment[f] == j).nonzero().flatten().double()
            expected.append(f * PER_FRAME + int(torch.floor(members.mean() + 0.5)))
    order = sorted(range(len(expected)), key=lambda i: expected[i])
    assert got.positions.tolist() == sorted(expected) and got.span == 3 * PER_FRAME
    torch.testing.assert_close(got.tokens, compact.compressed_tokens([frames])[0][order], atol=0, rtol=0)
    assert compact.compressed_videos([frames])[0].positions is None
    columns = stage({"frames": [frames, np.zeros((0, 64, 64, 3), np.uint8)]})
    assert columns["visual_positions"][0].tolist() == sorted(expected)
    assert columns["visual_span"] == [3 * PER_FRAME, None]
    assert columns["visual_positions"][1].shape == (0,) and columns["error"][1] is not None
    assert "visual_positions" not in compact({"frames": [frames]})  # compact: today's columns


def test_merged_tokens_stand_at_the_token_they_folded_into(tiny):
    model = tiny[0]
    static = np.repeat(video(1, seed=3), 8, axis=0)
    # full tokens + merging: every later frame's patches fold into frame 0's, its CLS stays at its place
    full = EncodeStage(model, compression=original("none", match="same", threshold=0.9))
    got = full.compressed_videos([static])[0]
    assert got.positions.tolist() == [*range(PER_FRAME), *(f * PER_FRAME for f in range(1, 8))]
    assert got.span == 8 * PER_FRAME
    # VisionZip + merging: frame 0's tokens where they are, each later frame's CLS, the rest folded away
    zipped = EncodeStage(model, compression=original("visionzip", 14, 3, match="same", threshold=0.9,
                                                     fold_contextual=True)).compressed_videos([static])[0]
    alone = EncodeStage(model, compression=original("visionzip", 14, 3)).compressed_videos([static[:1]])[0]
    assert zipped.positions.tolist() == [*alone.positions.tolist(), *(f * PER_FRAME for f in range(1, 8))]


# ---------------------------------------------------------------- answering and tuning with the positions


def test_answers_with_reuse_equal_answers_without_and_the_text_follows_the_full_span(tiny):
    model, tokenizer = tiny
    encoded = EncodeStage(model, compression=original())({"frames": [video(3, seed=1), video(4, seed=2)]})
    batch = {**encoded, "questions": [[QUESTION, "Why?"], [QUESTION]], "conversations": [["c", "c"], [""]],
             "turns": [[1, 2], [0]]}
    predictions, logits = {}, {}
    for reuse in (False, True):
        config = AnswerConfig(generation=GenerateConfig(max_new_tokens=4, reuse_prefix=reuse))
        stage = AnswerStage(model, tokenizer, config=config, custom_positions=True)
        asked, generate = [], stage.engine.generate
        stage.engine.generate = (lambda videos, *args, asked=asked, generate=generate:
                                 asked.append(videos) or generate(videos, *args))
        predictions[reuse] = stage(dict(batch))["predictions"]
        assert [(v.positions.tolist(), v.span) for v in asked[0]] == [  # the batch's columns reach the engine
            (p.tolist(), s) for p, s in zip(encoded["visual_positions"], encoded["visual_span"], strict=True)]
        assert encoded["visual_span"] == [3 * PER_FRAME, 4 * PER_FRAME]
        stage.engine.record_logits = True
        videos = [Video(torch.as_tensor(e), torch.as_tensor(p), s) for e, p, s in zip(
            encoded["visual_embeds"], encoded["visual_positions"], encoded["visual_span"], strict=True)]
        talk = [Conversation(0, [QUESTION, "Why?"])]
        logits[reuse] = stage.engine.generate(videos, talk, stage.sampling)[0]
    assert predictions[True] == predictions[False] and all(p is not None for p in predictions[True])
    for turn in range(2):
        torch.testing.assert_close(logits[True][turn].logits, logits[False][turn].logits, atol=1e-5,
                                   rtol=1e-5)
    # the first answer's first logits are a direct forward's with the text after the video at a + 3 * 257
    ids = tokenizer(stage.builder.text(QUESTION)).input_ids
    at = ids.index(model.config.video_token_id)
    embeds = torch.as_tensor(encoded["visual_embeds"][0])
    positions = torch.as_tensor(encoded["visual_positions"][0])
    after = at + 3 * PER_FRAME + torch.arange(len(ids) - at - 1)
    position_ids = torch.cat([torch.arange(at), at + positions, after])
    text = model.get_input_embeddings()(torch.tensor(ids))
    with torch.no_grad():
        direct = model(inputs_embeds=torch.cat([text[:at], embeds, text[at + 1 :]])[None],
                       position_ids=position_ids[None]).logits[0, -1]
        compact = model(inputs_embeds=torch.cat([text[:at], embeds, text[at + 1 :]])[None]).logits[0, -1]
    torch.testing.assert_close(logits[False][0].logits[0], direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(direct, compact, atol=1e-3)  # the positions matter


def test_answer_in_process_takes_an_encoded_videos_positions(tiny):
    # `AnswerStage.answer` on `EncodeStage.encode`'s videos answers as the batch path does with the
    # positions columns: a tensor alone is read at consecutive positions
    model, tokenizer = tiny
    frames = video(3, seed=1)
    encoded = EncodeStage(model, compression=original()).encode([frames])[0]
    stage = AnswerStage(model, tokenizer, config=AnswerConfig(generation=GenerateConfig(max_new_tokens=4)),
                        custom_positions=True)
    stage.engine.record_logits = True
    in_process = stage.answer([encoded], [QUESTION])[0]
    columns = EncodeStage(model, compression=original())({"frames": [frames]})
    batch = stage({**columns, "questions": [[QUESTION]]})
    assert in_process.text == batch["predictions"][0][0]
    direct = stage.engine.generate([Video(encoded.embeds, encoded.positions, encoded.span)],
                                   [Conversation(0, [QUESTION])], stage.sampling)[0][0]
    compact = stage.answer([encoded.embeds], [QUESTION])[0]
    torch.testing.assert_close(in_process.logits, direct.logits, atol=0, rtol=0)
    assert not torch.allclose(in_process.logits[0], compact.logits[0], atol=1e-3)


def test_tuning_reads_the_tokens_at_the_answer_engines_position_ids(tiny):
    model, tokenizer = tiny
    kept = EncodeStage(model, compression=original()).compressed_videos([video(3, seed=5)])[0]
    kept.tokens = kept.tokens.clone()  # a normal tensor, as compressed_examples keeps it
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["position_ids"][0].tolist()), with_kwargs=True)
    try:
        with torch.no_grad():
            tune.answer_loss(model, AnswerStage(model, tokenizer), [kept], [QUESTION], ["red"])
        config = AnswerConfig(generation=GenerateConfig(max_new_tokens=1, reuse_prefix=False))
        answering = AnswerStage(model, tokenizer, config=config, custom_positions=True)
        with torch.no_grad():
            embeds = project(model, kept.tokens)
        answering.engine.generate([Video(embeds, kept.positions, kept.span)], [Conversation(0, [QUESTION])],
                                  Sampling(max_new_tokens=1))
    finally:
        hook.remove()
    trained, answered = seen[0], seen[1]
    assert trained[: len(answered)] == answered  # the prompt; the answer's tokens follow it
    assert answered[-1] > len(answered) and kept.positions[-1] < 3 * PER_FRAME  # original places, not 0..M-1


# ---------------------------------------------------------------- the job: fingerprint and engines


@pytest.fixture
def clip_manifest(tmp_path):
    write_video(tmp_path / "a.mp4", num_frames=12, width=96, height=64)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a1", "video": str(tmp_path / "a.mp4"), "question": QUESTION}) + "\n")
    return path


def job(tiny_dir, manifest, out, *overrides):
    return compose_job(f"model.path={tiny_dir}", "model.dtype=float32", f"data.manifest={manifest}",
                       f"output.path={out}", "runner=local", "pipeline.generation.max_new_tokens=2",
                       "decode.num_frames=2", *overrides)


def test_a_resume_with_the_other_position_rule_is_refused(tiny_dir, clip_manifest, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_job(job(tiny_dir, clip_manifest, out))  # the default: original
    assert summary["rows"] == 1 and json.loads(out.read_text())["error"] is None
    with pytest.raises(OutputError, match="compression.positions differ"):
        run_job(job(tiny_dir, clip_manifest, out, "compression.positions=compact"))


def test_vllm_with_original_positions_exits_2_before_any_work(tiny_dir, clip_manifest, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exited, plain_errors():  # as run.py composes and runs a job
        run_job(job(tiny_dir, clip_manifest, out, "pipeline.engine=vllm", "compression.positions=original"))
    assert exited.value.code == 2 and not out.exists()
    assert ("compression.positions=original with pipeline.engine=vllm cannot take the visual tokens' "
            "position ids") in capsys.readouterr().err
    with pytest.raises(ConfigError, match="or compression.positions=compact"):
        job(tiny_dir, clip_manifest, out, "pipeline.engine=vllm", "compression.positions=original")
    with pytest.raises(ConfigError, match="or compression.positions=compact"):  # original is the default
        job(tiny_dir, clip_manifest, out, "pipeline.engine=vllm")
    assert job(tiny_dir, clip_manifest, out, "pipeline.engine=vllm",
               "compression.positions=compact").pipeline.engine == "vllm"


def test_bench_retention_adds_a_16_frame_row_near_the_papers_total():
    name, method, per_frame, overrides = settings(0.8, [], frames16=True)[-1]
    assert (name, method, per_frame) == ("visionzip-16f", "visionzip_16f", 3)
    assert overrides[-1] == "decode.num_frames=16" and 16 * per_frame == 48  # 8 frames x 5 = 40
    assert all(row[0] != "visionzip-16f" for row in settings(0.8, []))
