"""Video-LLaVA with compressed visual tokens, on the tiny random model: load, encode, answer."""

from __future__ import annotations

import time
from dataclasses import replace

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import GenerationConfig, LlamaConfig

from stages.answer import CAPTION_PROMPT, PROMPT, AnswerConfig, AnswerStage, GenerateConfig, question_text
from stages.encode import CompressionConfig, EncodeStage, TemporalConfig
from stages.engine import Conversation, Video
from stages.model import ModelConfig, ModelLoadError, load_video_llava
from stages.testing import build_tiny_video_llava
from visionzip import zip_clip

QUESTION = "What color is the moving object?"


def compressed(method: str = "visionzip", dominant: int = 14, contextual: int = 3, **temporal
               ) -> CompressionConfig:
    """Tokens in VisionZip's own order (`compact`: the order `zip_clip` returns them in)."""
    return CompressionConfig(method, dominant, contextual, TemporalConfig(**temporal), positions="compact")


def answering(task: str = "qa", caption_prompt: str = CAPTION_PROMPT, **generation) -> AnswerConfig:
    return AnswerConfig(task=task, caption_prompt=caption_prompt, generation=GenerateConfig(**generation))


def make_video(frames: int, seed: int, height: int = 120, width: int = 160) -> np.ndarray:
    """Smooth gradients with a few bright squares at random places: differs from frame to frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        img = np.stack([x * 255 // width, y * 255 // height, (x + y + 37 * t) % 256], -1)
        for _ in range(4):
            top, left = rng.integers(0, height - 30), rng.integers(0, width - 30)
            img[top : top + 30, left : left + 30] = rng.integers(0, 256, 3)
        video[t] = img
    return video


def static_video(frames: int = 8) -> np.ndarray:
    return np.repeat(make_video(1, seed=7), frames, axis=0)


# ---------------------------------------------------------------- building and loading


def test_tiny_build_is_deterministic_and_cached(tmp_path, tiny_dir):
    again = build_tiny_video_llava(tmp_path / "again")
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(names)
    for name in names:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name

    weights = again / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_video_llava(again) == again
    assert weights.stat().st_mtime_ns == stamp  # cached: nothing rewritten

    (again / "TINY_BUILD_COMPLETE").unlink()  # as if a build had died before its marker
    weights.write_bytes(b"half written")
    build_tiny_video_llava(again)
    assert weights.read_bytes() == (tiny_dir / "model.safetensors").read_bytes()

    other_seed = build_tiny_video_llava(tmp_path / "seed1", seed=1)
    assert (other_seed / "model.safetensors").read_bytes() != weights.read_bytes()


def test_tiny_build_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ModelLoadError, match="notes.txt"):
        build_tiny_video_llava(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_tiny_round_trip_through_the_loader(tiny_dir):
    model, tokenizer = load_video_llava(tiny_dir, device="cpu")  # the defaults, as for the real model
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config.model_type == "video_llava"
    assert model.config.vision_feature_layer == -2
    vision = model.config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 + 1 == 257
    assert model.model.video_tower.config._attn_implementation == "sdpa"
    assert model.model.language_model.config._attn_implementation == "sdpa"
    assert tokenizer.convert_tokens_to_ids("<video>") == model.config.video_token_id
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id < model.config.text_config.vocab_size
    ids = tokenizer("USER: <video>\nWhat is the color? ASSISTANT:").input_ids
    assert tokenizer.convert_ids_to_tokens(ids)[:4] == ["<s>", "▁USER", ":", "▁"]
    assert tokenizer.convert_ids_to_tokens(ids)[-2:] == ["▁ASSISTANT", ":"]
    text = "naïve ✓ 42 <video>"  # byte fallback: anything round-trips
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_loader_errors_name_the_path_and_the_problem(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="neither an existing folder nor a hub id"):
        load_video_llava(tmp_path / "missing")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_video_llava(tmp_path / "file.bin")
    with pytest.raises(ModelLoadError, match="cannot load a model config from .*empty"):
        (tmp_path / "empty").mkdir()
        load_video_llava(tmp_path / "empty")
    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelLoadError, match="'llama' checkpoint, not Video-LLaVA"):
        load_video_llava(tmp_path / "llama")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 30 s of network retries
    with pytest.raises(ModelLoadError, match="cannot load a model config from 'someorg/no-such-model'"):
        load_video_llava("someorg/no-such-model")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_video_llava(tmp_path / "llama", dtype="float8")


# ---------------------------------------------------------------- compression=none is HF's own path


def test_none_gives_hf_logits_and_greedy_output(tiny):
    model, tokenizer = tiny
    video = make_video(8, seed=0)
    encoder = EncodeStage(model, compression=compressed("none"))
    answerer = AnswerStage(model, tokenizer, config=answering(max_new_tokens=8))
    encoded = encoder.encode([video])[0]
    assert encoded.embeds.shape == (8 * 257, 64)
    assert encoded.visual_tokens_full == encoded.visual_tokens_after_zip == encoded.visual_tokens_kept == 2056

    # HF: the processor expands the prompt's <video> to frames x 257 placeholders; the model fills them.
    expanded = PROMPT.format(question=QUESTION).replace("<video>", "<video>" * 2056)
    hf_inputs = tokenizer(expanded, return_tensors="pt")
    pixels = encoder.preprocess(video)[None]  # [1, 8, 3, 224, 224]
    ours = answerer.build_inputs([encoded.embeds], [QUESTION])
    with torch.inference_mode():
        hf_logits = model(**hf_inputs, pixel_values_videos=pixels).logits
        our_logits = model(**ours).logits
        greedy = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        hf_new = model.generate(**hf_inputs, pixel_values_videos=pixels, generation_config=greedy
                                )[0, hf_inputs.input_ids.shape[1] :]
    assert our_logits.shape == hf_logits.shape == (1, hf_inputs.input_ids.shape[1], len(tokenizer))
    torch.testing.assert_close(our_logits, hf_logits, atol=1e-4, rtol=0)
    answer = answerer.answer([encoded.embeds], [QUESTION])[0]
    assert answer.token_ids == hf_new.tolist()
    assert answer.prompt_tokens == hf_inputs.input_ids.shape[1]
    assert answer.text == tokenizer.decode(hf_new, skip_special_tokens=True).strip()


# ---------------------------------------------------------------- visionzip and temporal merging


def test_visionzip_keeps_17_tokens_per_frame_and_projects_them(tiny):
    model, _ = tiny
    video = make_video(8, seed=1)
    encoder = EncodeStage(model, compression=compressed())
    encoded = encoder.encode([video])[0]
    assert (encoded.visual_tokens_full, encoded.visual_tokens_after_zip, encoded.visual_tokens_kept) == (
        2056,
        136,
        136,
    )
    with torch.inference_mode():
        zipped = zip_clip(
            model.model.video_tower, encoder.preprocess(video), dominant=14, contextual=3, layer=-2
        )
        expected = model.model.multi_modal_projector(zipped.tokens).flatten(0, 1)
    assert zipped.tokens.shape == (8, 17, 64)
    torch.testing.assert_close(encoded.embeds, expected, atol=1e-6, rtol=0)

    wide = EncodeStage(model, compression=compressed(dominant=30, contextual=5)).encode([video])[0]
    assert wide.visual_tokens_kept == 8 * 35


def test_temporal_merging_shrinks_a_static_video(tiny):
    model, _ = tiny
    encoder = EncodeStage(model, compression=compressed(enabled=True, threshold=0.9))
    static, moving = encoder.encode([static_video(8), make_video(8, seed=2)])
    # frame 0 survives whole; later frames keep only their protected CLS token
    assert (static.visual_tokens_after_zip, static.visual_tokens_kept) == (136, 17 + 7)
    assert static.visual_tokens_kept < moving.visual_tokens_kept <= 136
    capped = EncodeStage(model, compression=compressed(enabled=True, threshold=0.99, max_tokens=60))
    capped = capped.encode([make_video(8, seed=2)])[0]
    assert capped.visual_tokens_kept == 60 and capped.embeds.shape == (60, 64)


def test_one_tower_pass_for_all_videos_in_chunks(tiny):
    model, _ = tiny
    videos = [make_video(8, seed=3), make_video(5, seed=4, height=90, width=200), make_video(3, seed=5)]
    calls = []
    hook = model.model.video_tower.embeddings.register_forward_hook(
        lambda module, args, out: calls.append(len(args[0]))
    )
    try:
        together = EncodeStage(model, frame_batch_size=6).encode(videos)
    finally:
        hook.remove()
    assert calls == [6, 6, 4]  # 16 frames, chunks of 6, videos mixed in one pass
    for video, encoded in zip(videos, together, strict=True):
        alone = EncodeStage(model).encode([video])[0]
        torch.testing.assert_close(encoded.embeds, alone.embeds, atol=1e-5, rtol=1e-5)
        assert encoded.visual_tokens_full == len(video) * 257
    shares = [e.encode_seconds for e in together]  # one timing shared out by frame count
    assert shares[0] / shares[2] == pytest.approx(8 / 3)


# ---------------------------------------------------------------- answering


def test_batch_of_three_equals_three_single_runs(tiny):
    model, tokenizer = tiny
    encoder = EncodeStage(model, compression=compressed(enabled=True))
    videos = [make_video(8, seed=6), make_video(5, seed=8), static_video(8)]
    embeds = [e.embeds for e in encoder.encode(videos)]
    assert len({len(e) for e in embeds}) == 3  # different visual lengths -> real left padding
    questions = ["What color is it?", "How many objects are there?", "Is it moving left or right?"]
    answerer = AnswerStage(model, tokenizer, config=answering(max_new_tokens=10, batch_size=3))
    began = time.perf_counter()
    batched = answerer.answer(embeds, questions)
    wall = time.perf_counter() - began
    singles = [answerer.answer([e], [q])[0] for e, q in zip(embeds, questions, strict=True)]
    assert [a.token_ids for a in batched] == [a.token_ids for a in singles]
    assert [a.text for a in batched] == [a.text for a in singles]
    assert [a.prompt_tokens for a in batched] == [a.prompt_tokens for a in singles]
    assert len({tuple(a.token_ids) for a in singles}) > 1  # the inputs matter, so the check can fail
    for answer in batched:
        assert 1 <= answer.generated_tokens == len(answer.token_ids) <= 10
    # each answer's share of the one batched `generate` call, split at the first token's logits
    assert len({(a.prefill_seconds, a.llm_decode_seconds) for a in batched}) == 1
    assert 0 < batched[0].prefill_seconds and 0 < batched[0].llm_decode_seconds
    assert sum(a.prefill_seconds + a.llm_decode_seconds for a in batched) <= wall


def test_encode_once_answer_many_through_the_batch_callables(tiny):
    model, tokenizer = tiny
    encoder = EncodeStage(model)
    answerer = AnswerStage(model, tokenizer, config=answering(max_new_tokens=6))
    batch = {
        "video": ["a.mp4", "b.mp4", "broken.mp4", "gray.mp4"],
        "frames": [make_video(8, seed=9), make_video(4, seed=10), None, np.zeros((8, 32, 32), np.uint8)],
        "questions": [["What color?", "How many?", "Where is it?"], ["Is it red?"], ["Why?"], ["Who?"]],
        "error": [None, None, "decode: not a video", None],
    }
    encoded = encoder(batch)
    assert "frames" not in encoded and encoded["video"] == batch["video"]
    assert encoded["visual_tokens_kept"] == [136, 68, None, None]
    assert encoded["visual_embeds"][0].dtype == np.float32 and encoded["visual_embeds"][0].shape == (136, 64)
    assert encoded["error"][2] == "decode: not a video"
    assert encoded["error"][3].startswith("encode: frames must have shape [T, H, W, 3]")
    assert encoded["error"][3].endswith("got (8, 32, 32)")

    answered = answerer(encoded)
    assert "visual_embeds" not in answered
    assert [len(p) if p else p for p in answered["predictions"]] == [3, 1, None, None]
    text_tokens = len(tokenizer(PROMPT.format(question="Is it red?")).input_ids) - 1  # minus <video>
    assert answered["prompt_tokens"][1] == [68 + text_tokens]
    embeds = torch.from_numpy(encoded["visual_embeds"][0])
    for question, prediction in zip(batch["questions"][0], answered["predictions"][0], strict=True):
        assert prediction == answerer.answer([embeds], [question])[0].text


def test_qa_and_caption_prompts(tiny):
    model, tokenizer = tiny
    embeds = EncodeStage(model).encode([make_video(4, seed=11)])[0].embeds
    caption = AnswerStage(model, tokenizer,
                          config=answering("caption", "Describe this scene.", max_new_tokens=6))
    qa = AnswerStage(model, tokenizer, config=answering("qa", max_new_tokens=6))
    as_caption = caption({"visual_embeds": [embeds], "questions": [["never asked"]]})
    as_question = qa.answer([embeds], ["Describe this scene."])[0]
    assert as_caption["predictions"] == [[as_question.text]]  # one caption a clip, with its own prompt
    text_tokens = (
        len(tokenizer(PROMPT.format(question="Describe this scene.")).input_ids) - 1
    )  # minus <video>
    assert as_question.prompt_tokens == text_tokens + 68
    default_caption = AnswerStage(model, tokenizer, config=answering("caption", max_new_tokens=6))
    assert (
        default_caption({"visual_embeds": [embeds]})["prompt_tokens"][0][0]
        == len(tokenizer(PROMPT.format(question="Describe the video in detail.")).input_ids) - 1 + 68
    )


def test_sampling_uses_temperature_and_top_p(tiny):
    model, tokenizer = tiny
    embeds = EncodeStage(model).encode([make_video(2, seed=12)])[0].embeds
    sampler = AnswerStage(model, tokenizer,
                          config=answering(do_sample=True, temperature=5.0, top_p=0.95, max_new_tokens=8))
    assert sampler.sampling.temperature == 5.0 and sampler.sampling.top_p == 0.95
    torch.manual_seed(0)
    first = sampler.answer([embeds], [QUESTION])[0].token_ids
    torch.manual_seed(0)
    assert sampler.answer([embeds], [QUESTION])[0].token_ids == first
    greedy = AnswerStage(model, tokenizer, config=answering(max_new_tokens=8))
    greedy = greedy.answer([embeds], [QUESTION])[0].token_ids
    assert first != greedy  # temperature 5 flattens the distribution


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("frames", "problem"),
    [
        (np.zeros((8, 64, 64), np.uint8), r"shape \[T, H, W, 3\].*\(8, 64, 64\)"),
        (np.zeros((8, 3, 64, 64), np.uint8), r"shape \[T, H, W, 3\].*\(8, 3, 64, 64\)"),
        (np.zeros((8, 64, 64, 3), np.float32), "must be uint8.*float32"),
        (np.zeros((0, 64, 64, 3), np.uint8), "empty"),
        ([[1, 2, 3]], "got list"),
    ],
)
def test_encode_rejects_bad_frames(tiny, frames, problem):
    with pytest.raises(ValueError, match=rf"frames of video 1 .*{problem}"):
        EncodeStage(tiny[0]).encode([make_video(2, seed=0), frames])


def test_stages_reject_bad_settings_and_inputs(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="method='tome' is not one of none, visionzip, random, pool"):
        EncodeStage(model, compression=compressed("tome"))
    with pytest.raises(ValueError, match="dominant \\+ contextual = 290 \\+ 10 = 300 exceeds the 257 tokens"):
        EncodeStage(model, compression=compressed(dominant=290, contextual=10))
    with pytest.raises(ValueError, match="frame_batch_size=0 must be >= 1"):
        EncodeStage(model, frame_batch_size=0)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        AnswerStage(model)
    with pytest.raises(ValueError, match="task='translate' is not one of qa, caption"):
        AnswerStage(model, tokenizer, config=answering("translate"))
    with pytest.raises(ValueError, match="generation.max_new_tokens=0 must be >= 1"):
        AnswerStage(model, tokenizer, config=answering(max_new_tokens=0))
    with pytest.raises(ValueError, match="prompt must contain <video> once"):
        AnswerStage(model, tokenizer, config=AnswerConfig(prompt="USER: {question} ASSISTANT:"))
    answerer = AnswerStage(model, tokenizer)
    with pytest.raises(ValueError, match=r"visual embeddings 0 must be \[M >= 1, 64\], got \(5, 32\)"):
        answerer.answer([torch.zeros(5, 32)], ["Why?"])
    with pytest.raises(ValueError, match="question 0 must not contain <video>"):
        answerer.answer([torch.zeros(5, 64)], ["Why <video>?"])
    with pytest.raises(ValueError, match="question 0 must be a string"):
        answerer.answer([torch.zeros(5, 64)], [None])
    with pytest.raises(
        ValueError, match="task 'qa' needs a 'questions' column, got columns \\['visual_embeds'\\]"
    ):
        answerer({"visual_embeds": [torch.zeros(5, 64)]})
    with pytest.raises(ValueError, match="2 visual embeddings for 1 questions"):
        answerer.build_inputs([torch.zeros(5, 64)] * 2, ["Why?"])


def test_a_failed_generation_becomes_that_videos_error_row(tiny):
    model, tokenizer = tiny
    answerer = AnswerStage(model, tokenizer, config=answering(max_new_tokens=3))
    good = EncodeStage(model).encode([make_video(2, seed=5)])[0].embeds.numpy()
    wrong_width = np.zeros((5, 32), np.float32)  # not the LLM's width: generation of this video fails
    out = answerer({
        "visual_embeds": [good, wrong_width, good],
        "questions": [["What color?"], ["Why?"], ["How many?", "Where?"]],
        "error": [None, None, None],
    })  # fmt: skip
    assert out["error"][0] is None and out["error"][2] is None
    assert out["error"][1].startswith("answer: ValueError: visual embeddings 0 must be [M >= 1, 64]")
    assert out["predictions"][1] is None and out["llm_decode_seconds"][1] is None
    assert out["predictions"][0] == [answerer.answer([good], ["What color?"])[0].text]
    assert len(out["predictions"][2]) == 2 and len(out["prefill_seconds"][2]) == 2


def test_a_failed_encode_costs_only_the_failing_video(tiny):
    model, _ = tiny
    encoder = EncodeStage(model)
    batched = encoder.encode

    def fails_on_tall_frames(videos):
        if any(v.shape[1] == 200 for v in videos):
            raise RuntimeError("CUDA out of memory")
        return batched(videos)

    encoder.encode = fails_on_tall_frames
    videos = [make_video(2, seed=1), make_video(2, seed=2, height=200), make_video(2, seed=3)]
    out = encoder({"frames": videos})
    assert out["error"] == [None, "encode: RuntimeError: CUDA out of memory", None]
    assert [e.shape for e in out["visual_embeds"]] == [(34, 64), (0, 64), (34, 64)]
    assert out["visual_tokens_kept"] == [34, None, 34]
    np.testing.assert_array_equal(out["visual_embeds"][2], batched([make_video(2, seed=3)])[0].embeds.numpy())


def test_stages_loading_their_own_model_keep_only_their_half(tiny_dir, tiny):
    model, tokenizer = tiny
    vision, _ = load_video_llava(tiny_dir, dtype="float32", device="cpu", keep="vision")
    language, _ = load_video_llava(tiny_dir, dtype="float32", device="cpu", keep="language")
    assert vision.model.language_model is None and vision.lm_head is None
    assert language.model.video_tower is None and language.model.multi_modal_projector is None
    total = sum(p.numel() for p in model.parameters())
    halves = sum(p.numel() for p in vision.parameters()) + sum(p.numel() for p in language.parameters())
    assert halves == total - sum(p.numel() for p in model.model.image_tower.parameters())
    with pytest.raises(ValueError, match="keep must be 'all', 'vision' or 'language', got 'lm'"):
        load_video_llava(tiny_dir, keep="lm")

    video = make_video(4, seed=21)
    shared = AnswerStage(model, tokenizer, config=answering(max_new_tokens=5))
    expected = shared.answer([EncodeStage(model).encode([video])[0].embeds], [QUESTION])[0].text
    own_model = ModelConfig(str(tiny_dir), dtype="float32", device="cpu")
    own_encoder = EncodeStage(own_model)
    own_answerer = AnswerStage(own_model, config=answering(max_new_tokens=5))
    assert own_encoder.model.lm_head is None and own_answerer.model.model.video_tower is None
    assert own_answerer.answer([own_encoder.encode([video])[0].embeds], [QUESTION])[0].text == expected


def test_encoder_uses_a_tuned_projector(tiny_dir, tmp_path):
    from pipelines.tune import save_projector

    tuned, _ = load_video_llava(tiny_dir, dtype="float32", device="cpu")
    with torch.no_grad():
        for p in tuned.model.multi_modal_projector.parameters():
            p.mul_(-2.0)
    path = save_projector(tuned, tmp_path)
    video = make_video(3, seed=8)
    expected = EncodeStage(tuned).encode([video])[0].embeds
    model = ModelConfig(str(tiny_dir), dtype="float32", device="cpu", projector_path=str(path))
    torch.testing.assert_close(EncodeStage(model).encode([video])[0].embeds, expected)
    plain = EncodeStage(replace(model, projector_path=None)).encode([video])[0].embeds
    assert not torch.allclose(plain, expected)
    with pytest.raises(ModelLoadError, match="cannot read safetensors weights"):
        EncodeStage(replace(model, projector_path=str(tmp_path / "missing.safetensors")))


def test_multiple_choice_questions_are_asked_with_lettered_options():
    assert question_text("What color is it?") == "What color is it?"
    assert question_text("What color is it?", ("red", "blue")) == (
        "What color is it?\n(A) red\n(B) blue\n"
        "Answer with the option's letter from the given choices directly.")
    assert question_text("Q?", ("x", "y"), "{options} | {question}") == "(A) x\n(B) y | Q?"
    assert AnswerConfig(choice_prompt="{question} only").problems() == [
        "choice_prompt must contain {question} and {options}, got '{question} only'"]


def test_visual_position_ids_flow_through_both_paths(tiny):
    """Kept tokens' own positions (here every third slot): the text after the video continues after the
    last one; reuse on and off agree in float32, and equal a direct forward with the positions written out."""
    model, tokenizer = tiny
    embeds = EncodeStage(model).encode([make_video(4, seed=13)])[0].embeds
    spread = np.arange(len(embeds)) * 3
    logits = {}
    for reuse in (False, True):
        stage = AnswerStage(model, tokenizer, config=answering(max_new_tokens=4, reuse_prefix=reuse))
        stage.engine.record_logits = True
        out = stage({"visual_embeds": [embeds.numpy()] * 2, "visual_positions": [spread, None],
                     "questions": [[QUESTION, "Why?"], [QUESTION]]})
        assert out["error"] == [None, None]
        answers = stage.engine.generate(
            [Video(embeds, torch.as_tensor(spread)), Video(embeds)],
            [Conversation(0, [QUESTION]), Conversation(1, [QUESTION])], stage.sampling)
        assert out["predictions"] == [[answers[0][0].text, out["predictions"][0][1]], [answers[1][0].text]]
        logits[reuse] = [a[0].logits for a in answers]
    torch.testing.assert_close(logits[True][0], logits[False][0], atol=1e-5, rtol=1e-5)
    ids = tokenizer(PROMPT.format(question=QUESTION)).input_ids
    at = ids.index(model.config.video_token_id)
    after = len(ids) - at - 1
    positions = torch.cat([torch.arange(at), at + torch.as_tensor(spread),
                           at + int(spread[-1]) + 1 + torch.arange(after)])[None]
    text = model.get_input_embeddings()(torch.tensor(ids))
    inputs = torch.cat([text[:at], embeds, text[at + 1 :]])[None]
    with torch.inference_mode():
        direct = model(inputs_embeds=inputs, position_ids=positions).logits[0, -1]
    torch.testing.assert_close(logits[False][0][0], direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[False][0][0], logits[False][1][0], atol=1e-3)  # the positions matter
    stage = AnswerStage(model, tokenizer)
    for bad, problem in ((spread[:-1], rf"must be \[{len(embeds)}\] integers"), (spread * 1.0, "integers"),
                         (spread[::-1].copy(), "non-decreasing"), (spread - 5, ">= 0")):
        with pytest.raises(ValueError, match=rf"visual positions 0 .*{problem}"):
            stage.engine.generate([Video(embeds, torch.as_tensor(bad))], [Conversation(0, ["Why?"])],
                                  stage.sampling)
