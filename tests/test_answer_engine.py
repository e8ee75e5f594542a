"""The answer stage at scale: prefix reuse gives the answers of the path without it (synth model, a held-out
set) and the same logits (tiny model); the vLLM engine gives the `hf` engine's answers (synth model)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import compose_job
from stages.answer import AnswerConfig, AnswerStage, GenerateConfig
from stages.encode import CompressionConfig, EncodeStage, TemporalConfig
from stages.model import ModelConfig, load_video_llava
from stages.vllm_engine import VllmConfig, checkpoint_digest, export_language_model
from synthqa.clips import synth_sample
from synthqa.dataset import HELDOUT

ROOT = Path(__file__).resolve().parent.parent
SYNTH = ModelConfig(str(ROOT / "models" / "synth"), dtype="float32", device="cpu")
VAL_SEED = HELDOUT["val500"][0]  # the held-out val500 set: its first clips


def answering(reuse: bool, **generation) -> AnswerConfig:
    return AnswerConfig(generation=GenerateConfig(reuse_prefix=reuse, **generation))


@pytest.fixture(scope="module")
def synth():
    return load_video_llava(SYNTH.path, dtype="float32", device="cpu")


def held_out(model, clips: int, compression: CompressionConfig | None = None) -> tuple[list, list]:
    """(embeddings per question, question texts) of the first `clips` clips of val500, 5 questions each;
    the questions of a clip share its embeddings object (one video)."""
    samples = [synth_sample(VAL_SEED, i) for i in range(clips)]
    encoded = EncodeStage(model, compression=compression or CompressionConfig()).encode(
        [s.clip.frames for s in samples])
    embeds, questions = [], []
    for sample, video in zip(samples, encoded, strict=True):
        for q in sample.questions:
            embeds.append(video.embeds)
            questions.append(q.question)
    return embeds, questions


def test_prefix_reuse_answers_a_held_out_set_as_the_path_without_it(synth):
    model, tokenizer = synth
    embeds, questions = held_out(model, 20)  # VisionZip (the default): 136 visual tokens a clip
    plain = AnswerStage(model, tokenizer, config=answering(False, max_new_tokens=3))
    reused = AnswerStage(model, tokenizer, config=answering(True, max_new_tokens=3))
    expected, got = plain.answer(embeds, questions), reused.answer(embeds, questions)
    assert [a.token_ids for a in got] == [a.token_ids for a in expected]
    assert [a.text for a in got] == [a.text for a in expected]
    assert [a.prompt_tokens for a in got] == [a.prompt_tokens for a in expected]
    assert (plain.engine.prefix_reads, reused.engine.prefix_reads) == (0, 20)  # once per video
    assert len({a.text for a in got}) > 5  # the answers depend on the inputs, so the check can fail
    for a in got:
        assert a.prefill_seconds > 0 and a.llm_decode_seconds >= 0


def tiny_videos(model) -> list[torch.Tensor]:
    from tests.test_video_llava import make_video, static_video

    encoder = EncodeStage(model, compression=CompressionConfig(temporal=TemporalConfig(enabled=True)))
    clips = [make_video(8, seed=6), make_video(5, seed=8), static_video(8)]
    videos = [e.embeds for e in encoder.encode(clips)]
    assert len({len(v) for v in videos}) == 3  # prefixes of three lengths, padded in one batch
    return videos


QUESTIONS = ["What color is it?", "How many objects are there?", "Is it moving left or right?", "Why?"]
TEMPLATES = {  # template -> tokens of its shared head, visual placeholder included (tiny tokenizer)
    "USER: <video>\n{question} ASSISTANT:": 6,
    "USER: <video> {question} ASSISTANT:": 5,  # the space joins the question's first word
    "<video>\nQuestion: {question}": 11,
    "A chat.\nUSER: <video>\n{question} ASSISTANT: Best option:(": 12,
}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_prefix_reuse_gives_the_same_logits_in_float32_for_any_template(tiny, template):
    model, tokenizer = tiny
    videos = tiny_videos(model)
    embeds = [videos[0]] * 4 + [videos[1]] * 2 + [videos[2]] * 3
    asked = QUESTIONS + QUESTIONS[:2] + QUESTIONS[1:]
    plain, reused = (AnswerStage(model, tokenizer, config=replace(
        answering(reuse, max_new_tokens=6, batch_size=4), prompt=template)) for reuse in (False, True))
    plain.engine.record_logits = reused.engine.record_logits = True
    expected, got = plain.answer(embeds, asked), reused.answer(embeds, asked)
    head = TEMPLATES[template]
    assert len(reused.builder.head) == head
    assert reused.engine.prefix_reads == 3
    # the LLM read each video's head once and each question's own tokens, nothing else
    prompts = sum(a.prompt_tokens for a in expected)
    assert plain.engine.tokens_read == prompts
    heads = sum(head - 1 + len(v) for v in videos)
    assert reused.engine.tokens_read == prompts - sum(head - 1 + len(v) for v in embeds) + heads
    for a, b in zip(expected, got, strict=True):
        assert a.token_ids == b.token_ids and a.prompt_tokens == b.prompt_tokens
        assert a.logits.shape == b.logits.shape == (len(a.token_ids), len(tokenizer))
        torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    assert len({tuple(a.token_ids) for a in got}) > 1


def test_reuse_is_the_default_and_a_template_without_a_shared_prefix_says_why(tiny, caplog):
    job = compose_job("data.manifest=m.jsonl", "output.path=o.jsonl")
    assert job.pipeline.generation.reuse_prefix is True and job.pipeline.engine == "hf"
    assert compose_job("data.manifest=m.jsonl", "output.path=o.jsonl",
                       "pipeline.generation.reuse_prefix=false").pipeline.generation.reuse_prefix is False
    model, tokenizer = tiny
    from tests.test_video_llava import make_video

    video = EncodeStage(model).encode([make_video(4, seed=3)])[0].embeds
    late = replace(answering(True, max_new_tokens=4), prompt="USER: {question}\n<video> ASSISTANT:")
    with caplog.at_level(logging.INFO, logger="stages.prompts"):
        stage = AnswerStage(model, tokenizer, config=late)
    assert [r.getMessage() for r in caplog.records] == [
        "prompt 'USER: {question}\\n<video> ASSISTANT:': the video is not in the tokens every question "
        "shares (it comes after {question}): each question reads it (a conversation's later turns still "
        "extend their cache)"]
    answers = stage.answer([video, video], ["What color?", "How many?"])
    assert stage.engine.prefix_reads == 0
    whole = AnswerStage(model, tokenizer, config=replace(late, generation=GenerateConfig(max_new_tokens=4,
                                                                                          reuse_prefix=False)))
    assert [a.token_ids for a in answers] == [a.token_ids for a in whole.answer([video, video],
                                                                               ["What color?", "How many?"])]


def test_the_caches_alive_are_bounded_by_the_batch_not_the_videos(tiny):
    """Memory: the caches alive at once hold at most batch_size x (2 P + T) token slots however many
    videos a call has (stages.engine_hf's bound): 2 videos or 8, the peak is the same."""
    model, tokenizer = tiny
    video = max(tiny_videos(model), key=len)
    stage = AnswerStage(model, tokenizer, config=answering(True, max_new_tokens=4, batch_size=2))
    stage.answer([video.clone() for _ in range(2)], ["Why?", "How many?"])
    peak_two = stage.engine.peak_cache_tokens
    stage.engine.peak_cache_tokens = 0
    stage.answer([video.clone() for _ in range(8)], ["Why?", "How many?"] * 4)
    head = len(stage.builder.head) - 1 + len(video)
    longest = len(stage.builder.prompt("How many?").ids) - 1 + len(video) + 4
    assert stage.engine.peak_cache_tokens == peak_two <= 2 * (head + longest)  # B = 2, P = head, P + T
    assert 8 * head > 2 * (head + longest)  # every head alive at once would not fit: the check can fail


def test_config_checks_engine_and_vllm_settings():
    shared = VllmConfig(gpu_memory_utilization=0.6, actors_per_gpu=2)
    problems = AnswerConfig(engine="trt", vllm=shared).problems()
    assert problems == ["engine='trt' is not one of hf, vllm",
                        "vllm.gpu_memory_utilization=0.6 x actors_per_gpu=2 is more than one GPU"]
    assert VllmConfig(actors_per_gpu=4).gpus_per_actor() == 0.25
    assert VllmConfig(actors_per_gpu=2).memory_fraction(on_gpu=True) == 0.45
    assert VllmConfig().memory_fraction(on_gpu=False) == 0.1
    assert VllmConfig(max_model_len=0).problems() == ["max_model_len=0 must be >= 1 or null"]


# ---------------------------------------------------------------- vLLM


def test_the_export_is_the_checkpoints_language_model_and_is_cached(synth, tmp_path):
    from transformers import LlamaForCausalLM

    folder = export_language_model(SYNTH, tmp_path)
    marker = json.loads((folder / "EXPORT_COMPLETE").read_text())
    assert marker["checkpoint"] == SYNTH.path and len(marker["sha256"]) == 64
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert export_language_model(SYNTH, tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # found by its digest, not rewritten
    copy = shutil.copytree(SYNTH.path, tmp_path / "elsewhere" / "synth")
    assert checkpoint_digest(str(copy), tmp_path) == checkpoint_digest(SYNTH.path, tmp_path)  # not by path
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    assert checkpoint_digest(str(copy), tmp_path) != checkpoint_digest(SYNTH.path, tmp_path)
    model, tokenizer = synth
    llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer("USER: What shape is the red object? ASSISTANT:", return_tensors="pt").input_ids
    with torch.inference_mode():
        torch.testing.assert_close(llama(ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def vllm_stage(tmp_path_factory):
    """One vLLM engine for the module (its start takes tens of seconds), on the synth model. vLLM sets
    environment variables (LD_PRELOAD among them), the multiprocessing start method and warning filters
    in the process that starts it: they are put back afterwards, so the tests after these see none."""
    environ, filters = dict(os.environ), list(warnings.filters)
    start_method = multiprocessing.get_start_method(allow_none=True)
    pytest.importorskip("vllm", reason="vLLM is not installed (make installs it: see the Makefile)")
    settings = VllmConfig(gpu_memory_utilization=0.1, max_model_len=1024, enforce_eager=True,
                          export_dir=str(tmp_path_factory.mktemp("vllm")))
    try:
        stage = AnswerStage(SYNTH, config=AnswerConfig(engine="vllm", vllm=settings,
                                                       generation=GenerateConfig(max_new_tokens=3)))
        yield stage
        stage.engine.close()
    finally:
        os.environ.clear()
        os.environ.update(environ)
        warnings.filters[:] = filters
        multiprocessing.set_start_method(start_method, force=True)


VLLM_WARNINGS = ("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


@pytest.mark.filterwarnings(*VLLM_WARNINGS)
def test_vllm_answers_a_held_out_set_as_the_hf_engine(synth, vllm_stage):
    model, tokenizer = synth
    embeds, questions = held_out(model, 12)  # VisionZip, the default compression
    expected = AnswerStage(model, tokenizer, config=AnswerConfig(generation=GenerateConfig(max_new_tokens=3))
                           ).answer(embeds, questions)
    got = vllm_stage.answer(embeds, questions)
    assert [a.token_ids for a in got] == [a.token_ids for a in expected]
    assert [a.text for a in got] == [a.text for a in expected]
    assert [a.prompt_tokens for a in got] == [a.prompt_tokens for a in expected]
    assert len({a.text for a in got}) > 5
    assert vllm_stage.model is None  # the stage holds the tokenizer and the embedding table, vLLM the LLM
    # times from each request's own timestamps: every answer here is a word and EOS, so it has a decode step
    assert all(len(a.token_ids) == 2 for a in got)
    assert all(a.prefill_seconds > 0 and a.llm_decode_seconds > 0 for a in got)

    # the batch callable, as Ray Data calls it: one row per video with its questions
    batch = {"visual_embeds": [embeds[0].numpy(), embeds[5].numpy()],
             "questions": [questions[:5], questions[5:10]]}
    out = vllm_stage(batch)
    assert out["predictions"] == [[a.text for a in expected[:5]], [a.text for a in expected[5:10]]]
    assert out["error"] == [None, None]


@pytest.mark.filterwarnings(*VLLM_WARNINGS)
def test_vllm_conversations_answer_as_the_hf_engine(synth, vllm_stage):
    model, tokenizer = synth
    embeds, questions = held_out(model, 3)
    batch = {"visual_embeds": [embeds[0].numpy(), embeds[5].numpy(), embeds[10].numpy()],
             "questions": [questions[:5], questions[5:10], questions[10:15]],
             "conversations": [["a"] * 4 + [""], ["b"] * 3 + ["c"] * 2, [""] * 5],
             "turns": [[1, 2, 3, 4, 0], [3, 1, 2, 1, 2], [0] * 5], "history": ["", "", ""]}
    hf = AnswerStage(model, tokenizer, config=AnswerConfig(generation=GenerateConfig(max_new_tokens=3)))
    expected, got = hf(dict(batch)), vllm_stage(dict(batch))
    assert got["error"] == [None, None, None]
    assert got["predictions"] == expected["predictions"]
    assert got["prompt_tokens"] == expected["prompt_tokens"]
    assert got["prompt_tokens"][0][3] > got["prompt_tokens"][0][0] + 3 * 6  # turn 4 holds turns 1-3


@pytest.mark.filterwarnings(*VLLM_WARNINGS)
def test_vllm_refuses_visual_positions_before_any_work(synth, vllm_stage):
    with pytest.raises(ValueError, match="engine=vllm cannot take the visual tokens' position ids"):
        AnswerStage(SYNTH, config=AnswerConfig(engine="vllm"), custom_positions=True)
    model, _ = synth
    video = held_out(model, 1)[0][0]
    out = vllm_stage({"visual_embeds": [video.numpy()], "questions": [["What color?"]],
                      "visual_positions": [np.arange(len(video)) * 2]})
    assert out["error"][0].startswith("answer: ValueError: visual positions 0: engine=vllm cannot take")


@pytest.mark.filterwarnings(*VLLM_WARNINGS)
def test_sampling_parameters_map_one_to_one(vllm_stage):
    from stages.vllm_engine import sampling_params

    eos = vllm_stage.tokenizer.eos_token_id
    greedy = sampling_params(vllm_stage.sampling, eos)
    assert (greedy.max_tokens, greedy.temperature, greedy.top_p) == (3, 0.0, 1.0)
    sampled = GenerateConfig(max_new_tokens=7, do_sample=True, temperature=0.7, top_p=0.9).sampling()
    params = sampling_params(sampled, eos, seed=5)
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (7, 0.7, 0.9, 5)
    assert params.stop_token_ids == [eos]
