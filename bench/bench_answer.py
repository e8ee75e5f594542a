"""The answer stage at scale (issue 17): what prefix reuse saves per question, and the hf vs vLLM engines.

Part 1, Video-LLaVA-7B's geometry (Llama-7B-shaped bf16 layers, `--layers` of 32 run, per layer as in
`bench_prefill`): the LLM work to answer Q = 1, 5 and 25 questions about one 8-frame video, as the answer
stage does it (greedy, batches of 8 prompts, `NEW_TOKENS` new tokens each), divided by Q:
  full_2056           compression=none, no prefix reuse: each prompt is 2056 visual + 50 text tokens, read
                      whole (Video-LLaVA as it ships)
  visionzip_136_reuse VisionZip 14+3 with prefix reuse (the job's defaults): the video's prefix
                      (`USER: <video>\\n`: 6 text + 136 visual tokens) read once, then each question's own
                      44 tokens on a copy of its key/value cache expanded to the batch, then decoding
  visionzip_136       VisionZip without reuse, to separate what each of the two saves
Prompts without reuse are independent, so their batches are timed once per batch shape (8, 5, 1) and Q=25
is 3 batches of 8 and one of 1, as the stage runs them; with reuse the prefix is timed once per video.
The goal: the full path over VisionZip with reuse >= 20x per question at 25 questions per video.

Part 2, this CPU, the synth model (`models/synth`, float32) on precomputed VisionZip embeddings of val500's
first clips: rows per second of the `hf` engine (prefix reuse on) and the `vllm` engine for QA (5 questions
a clip, 3 new tokens at most, as the synth experiment asks) and captions (one prompt a clip, 64 new tokens
forced with min_new_tokens on both engines), interleaved A B A B in one run, medians. vLLM's own prefix
cache is reset before each of its timed runs (it would otherwise remember the previous run's prompts).
Engine start is reported apart. Skipped (with a note) when vLLM is not installed.

Part 3, conversations (`conversation_*` rows): the `hf` engine on a random Video-LLaVA whose language model
has Llama-7B-shaped bf16 layers (`--layers` of them, the tiny tokenizer), 4 conversations of 10 turns about
4 videos of 136 visual tokens, 16 new tokens per answer (forced), one chunk: the seconds per answer of each
turn (its share of its round's `generate` call, turn 1 with its share of the video's head read), with the
cache extended turn by turn (`reuse_prefix=true`) and re-read whole each turn (`false`), interleaved,
medians; and the tokens the LLM read over the 10 turns. Goal: turn 10 costs at most 1.3x turn 1 with the
extended cache.

Part 4, memory (`memory_*` rows), each case in a fresh process: the same 7B-shaped model answering 2
questions about each of 8, then 24, videos of 256 visual tokens in batches of 8: the RSS the answering
adds (peak), the key/value cache the engine held at its peak (`HfEngine.peak_cache_tokens` x bytes per
token), and the engine's stated bound KV x B x (2P + T) (`stages.engine_hf`: B the batch size, P the head
with the visual tokens, T a prompt's tail and its answer). Goals: the peak cache within the bound, and
the added RSS for 24 videos at most 1.2x that for 8 (it does not grow with the videos of a batch).

Part 5, exactness (`same_answers_*` rows): the tiny random Video-LLaVA (`stages.testing`, CPU) answering 6
questions about each of 12 videos (VisionZip), greedy, 8 new tokens: the fraction of answers whose tokens
are identical, and the largest difference of their logits, between prefix reuse on and off (batches of 8)
in float32 and in bf16, and, as the reference for what bf16 rounding does anyway, between batches of 8 and
of 1 without reuse in bf16. On this CPU only (a GPU's bf16 kernels were not measured).

Threads: one by default for both engines (torch's, and OMP_NUM_THREADS for vLLM's worker), as
`bench_prefill` argues for this shared 2-core machine.

Run: .venv/bin/python -m bench.bench_answer [--layers 1] [--repeats 3] [--clips 20] [--threads 1]
     [--skip-engines]
(about 12 minutes here, most of it the full path's batches of 8 x 2106 tokens)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `bench`, `stages` and `visionzip` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlamaModel,
    VideoLlavaForConditionalGeneration,
)

from bench.common import (  # noqa: E402
    CACHE_DIR,
    added_memory,
    goal,
    interleaved_medians,
    json_from_subprocess,
    print_ratios,
    print_table,
    write_result,
)
from stages import kv_cache  # noqa: E402
from stages.engine import Conversation, Sampling, Video  # noqa: E402
from stages.engine_hf import HfEngine  # noqa: E402
from stages.testing import tiny_tokenizer, video_llava_config  # noqa: E402

WIDTH, HEADS, MLP, LLM_LAYERS = 4096, 32, 11008, 32
FULL, ZIPPED, HEAD_TEXT, TAIL_TEXT = 2056, 136, 6, 44  # 6 + 44 = the 50 text tokens of bench_prefill
NEW_TOKENS, BATCH = 16, 8
QUESTIONS = (1, 5, 25)
TURNS, TALKS = 10, 4  # part 3
MEMORY_VISUAL, MEMORY_QUESTIONS, MEMORY_NEW_TOKENS, MEMORY_VIDEOS = 256, 2, 8, (8, 24)  # part 4


def llama_layers(layers: int) -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=WIDTH, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         intermediate_size=MLP, num_hidden_layers=layers, vocab_size=256,
                         max_position_embeddings=4096)
    return LlamaModel(config).to(torch.bfloat16).eval()


def embeds(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, tokens, WIDTH, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def decode(model: LlamaModel, cache, last: torch.Tensor, positions: torch.Tensor) -> None:
    """NEW_TOKENS single-token steps on the cache (the last embedding stands in for the sampled token's)."""
    for step in range(NEW_TOKENS):
        model(inputs_embeds=last, position_ids=positions + step, use_cache=True, **{kv_cache.CACHE: cache})


def whole_prompts(model: LlamaModel, batch: int, visual: int) -> None:
    """`batch` prompts of visual + 50 text tokens read whole, then decoded."""
    x = embeds(batch, visual + HEAD_TEXT + TAIL_TEXT)
    cache = kv_cache.new_cache(model.config)
    model(inputs_embeds=x, use_cache=True, **{kv_cache.CACHE: cache})
    decode(model, cache, x[:, -1:], torch.full((batch, 1), x.shape[1]))


def prefix(model: LlamaModel):
    """The video's prefix (6 text + 136 visual tokens) read once: its cache."""
    cache = kv_cache.new_cache(model.config)
    model(inputs_embeds=embeds(1, HEAD_TEXT + ZIPPED), use_cache=True, **{kv_cache.CACHE: cache})
    return cache


def tails_on_prefix(model: LlamaModel, cache, batch: int, new_tokens: int = NEW_TOKENS) -> None:
    """`batch` questions' own tokens on a copy of the prefix cache expanded to the batch, then decoded."""
    length = cache.get_seq_length()
    expanded = kv_cache.select_rows(cache, [0] * batch, model.config)
    x = embeds(batch, TAIL_TEXT, seed=1)
    positions = length + torch.arange(TAIL_TEXT).expand(batch, -1)
    model(inputs_embeds=x, position_ids=positions, use_cache=True, **{kv_cache.CACHE: expanded})
    if new_tokens:
        decode(model, expanded, x[:, -1:], torch.full((batch, 1), length + TAIL_TEXT))


def batches(questions: int) -> list[int]:
    return [min(BATCH, questions - start) for start in range(0, questions, BATCH)]


def per_question(layers: int, repeats: int) -> tuple[list[dict], dict]:
    model = llama_layers(layers)
    shapes = sorted({b for q in QUESTIONS for b in batches(q)})
    with torch.inference_mode():
        cache = prefix(model)
        cases = {}
        for b in shapes:
            cases[f"full_{b}"] = lambda b=b: whole_prompts(model, b, FULL)
            cases[f"zip_{b}"] = lambda b=b: whole_prompts(model, b, ZIPPED)
            cases[f"tails_{b}"] = lambda b=b: tails_on_prefix(model, cache, b)
        cases["prefix"] = lambda: prefix(model)
        # the prefill alone (no decoding), for the prefill column
        for b in shapes:
            cases[f"full_prefill_{b}"] = lambda b=b: model(inputs_embeds=embeds(b, FULL + 50), use_cache=True)
            cases[f"tails_prefill_{b}"] = lambda b=b: tails_on_prefix(model, cache, b, new_tokens=0)
        seconds = interleaved_medians(cases, repeats=repeats)
    rows, per_q = [], {}
    for q in QUESTIONS:
        parts = batches(q)
        full = sum(seconds[f"full_{b}"] for b in parts) / q
        zipped = sum(seconds[f"zip_{b}"] for b in parts) / q
        reused = (seconds["prefix"] + sum(seconds[f"tails_{b}"] for b in parts)) / q
        full_prefill = sum(seconds[f"full_prefill_{b}"] for b in parts) / q
        reused_prefill = (seconds["prefix"] + sum(seconds[f"tails_prefill_{b}"] for b in parts)) / q
        for case, visual, answer, prefill in (("full_2056", FULL, full, full_prefill),
                                              ("visionzip_136", ZIPPED, zipped, None),
                                              ("visionzip_136_reuse", ZIPPED, reused, reused_prefill)):
            rows.append({"case": case, "engine": "hf", "questions_per_video": q, "visual_tokens": visual,
                         "new_tokens": NEW_TOKENS,
                         "prefill_s_per_question_layer": (None if prefill is None
                                                          else round(prefill / layers, 4)),
                         "s_per_question_layer": round(answer / layers, 4),
                         "s_per_question_32_layers": round(answer / layers * LLM_LAYERS, 2)})
        per_q[q] = {"full": full, "zipped": zipped, "reused": reused, "full_prefill": full_prefill,
                    "reused_prefill": reused_prefill}
    return rows, per_q


def engines(clips: int, repeats: int, threads: int) -> tuple[list[dict], dict]:
    """Rows per second of the hf and vllm engines on the synth model (QA and captions)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vLLM is not installed: the engine comparison is skipped (make installs it)")
        return [], {}
    from stages.answer import AnswerConfig, AnswerStage, GenerateConfig
    from stages.encode import EncodeStage
    from stages.model import ModelConfig, load_video_llava
    from stages.vllm_engine import VllmConfig
    from synthqa.clips import synth_sample
    from synthqa.dataset import HELDOUT

    synth = ModelConfig(str(ROOT / "models" / "synth"), dtype="float32", device="cpu")
    model, tokenizer = load_video_llava(synth.path, dtype="float32", device="cpu")
    samples = [synth_sample(HELDOUT["val500"][0], i) for i in range(clips)]
    videos = [e.embeds for e in EncodeStage(model).encode([s.clip.frames for s in samples])]
    qa = ([v for v, s in zip(videos, samples, strict=True) for _ in s.questions],
          [q.question for s in samples for q in s.questions])
    caption = (videos, ["Describe the video in detail."] * len(videos))
    settings = {"qa": GenerateConfig(max_new_tokens=3, batch_size=16),
                "caption": GenerateConfig(max_new_tokens=64, batch_size=16)}
    hf = {task: AnswerStage(model, tokenizer, config=AnswerConfig(generation=g))
          for task, g in settings.items()}
    samplings = {"qa": settings["qa"].sampling(),
                 "caption": replace(settings["caption"].sampling(), min_new_tokens=64)}
    hf["caption"].sampling = samplings["caption"]
    os.environ["OMP_NUM_THREADS"] = str(threads)
    small = VllmConfig(gpu_memory_utilization=0.1, max_model_len=1024)
    vllm_stage = AnswerStage(synth, config=AnswerConfig(engine="vllm", generation=settings["qa"], vllm=small))
    start_seconds = vllm_stage.engine.start_seconds

    def run_vllm(task: str):
        vllm_stage.engine.llm.reset_prefix_cache()
        vllm_stage.sampling = samplings[task]
        return vllm_stage.answer(*(qa if task == "qa" else caption))

    inputs = {"qa": qa, "caption": caption}
    cases = {}
    for task in ("qa", "caption"):
        cases[f"hf_{task}"] = lambda task=task: hf[task].answer(*inputs[task])
        cases[f"vllm_{task}"] = lambda task=task: run_vllm(task)
    seconds = interleaved_medians(cases, repeats=repeats)
    same = {task: ([a.token_ids for a in hf[task].answer(*inputs[task])]
                   == [a.token_ids for a in run_vllm(task)]) for task in ("qa", "caption")}
    vllm_stage.engine.close()
    rows = []
    for task in ("qa", "caption"):
        n = len(inputs[task][1])
        for engine in ("hf", "vllm"):
            s = seconds[f"{engine}_{task}"]
            rows.append({"case": f"synth_{task}", "engine": engine,
                         "questions_per_video": 5 if task == "qa" else 1, "visual_tokens": len(videos[0]),
                         "new_tokens": settings[task].max_new_tokens, "rows": n, "seconds": round(s, 3),
                         "rows_per_s": round(n / s, 1), "same_tokens_as_hf": same[task]})
    ratios = {f"vllm_over_hf_rows_per_s_{task}": seconds[f"hf_{task}"] / seconds[f"vllm_{task}"]
              for task in ("qa", "caption")}
    ratios["vllm_engine_start_s"] = start_seconds
    return rows, ratios


def seven_b_width(layers: int):
    """(model, tokenizer): a random Video-LLaVA whose language model has `layers` Llama-7B-shaped layers in
    bf16 (the tiny tokenizer; a toy vision tower, never run), for the engine's own code path at 7B width."""
    tokenizer = tiny_tokenizer()
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                              num_attention_heads=4, image_size=224, patch_size=14, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=MLP,
                       num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                       max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    torch.manual_seed(0)
    model = VideoLlavaForConditionalGeneration(video_llava_config(tokenizer, vision, text))
    return model.to(torch.bfloat16).eval(), tokenizer


def visual(count: int, seed: int) -> Video:
    return Video(torch.randn(count, WIDTH, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))


def conversations(layers: int, repeats: int) -> tuple[list[dict], dict, dict]:
    """Part 3: seconds per answer of each turn, extended cache vs re-read, and tokens read."""
    model, tokenizer = seven_b_width(layers)
    videos = [visual(ZIPPED, seed) for seed in range(TALKS)]
    questions = [f"Turn {k}: what does the person do next, and why?" for k in range(1, TURNS + 1)]
    talks = [Conversation(v, questions) for v in range(TALKS)]
    sampling = Sampling(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    engines = {name: HfEngine(model, tokenizer, batch_size=BATCH, reuse_prefix=reuse)
               for name, reuse in (("extend", True), ("reread", False))}
    per_turn: dict[str, list[list[float]]] = {name: [] for name in engines}
    reads: dict[str, int] = {}

    def run(name: str) -> None:
        engine = engines[name]
        before = engine.tokens_read
        found = engine.generate(videos, talks, sampling)
        reads[name] = engine.tokens_read - before
        per_turn[name].append([sum(c[k].prefill_seconds + c[k].llm_decode_seconds for c in found) / TALKS
                               for k in range(TURNS)])

    interleaved_medians({name: lambda name=name: run(name) for name in engines}, repeats=repeats)
    rows, ratios = [], {}
    for name, runs in per_turn.items():
        runs = runs[1:]  # the warm-up run left out
        medians = [sorted(r[k] for r in runs)[len(runs) // 2] for k in range(TURNS)]
        for k in (0, 4, 9):
            rows.append({"case": f"conversation_{name}", "engine": "hf", "visual_tokens": ZIPPED,
                         "new_tokens": NEW_TOKENS, "turn": k + 1, "s_per_answer": round(medians[k], 4),
                         "tokens_read_10_turns": reads[name] // TALKS})
        ratios[f"conversation_turn10_over_turn1_{name}"] = medians[9] / medians[0]
        ratios[f"conversation_tokens_read_10_turns_{name}"] = reads[name] / TALKS
    ratios["conversation_tokens_read_reread_over_extend"] = reads["reread"] / reads["extend"]
    goals = {"conversation_turn10_over_turn1_extend":
             goal(ratios["conversation_turn10_over_turn1_extend"], "<=", 1.3)}
    return rows, ratios, goals


def memory_case(videos: int, layers: int) -> dict:
    """Part 4, one case in this (fresh) process: what answering adds to the RSS, the engine's peak cache,
    and its bound."""
    model, tokenizer = seven_b_width(layers)
    engine = HfEngine(model, tokenizer, batch_size=BATCH)
    clips = [visual(MEMORY_VISUAL, seed) for seed in range(videos)]
    asked = [f"Question {q}: what is in the video?" for q in range(MEMORY_QUESTIONS)]
    talks = [Conversation(v, [q]) for v in range(videos) for q in asked]
    sampling = Sampling(max_new_tokens=MEMORY_NEW_TOKENS, min_new_tokens=MEMORY_NEW_TOKENS)
    measured = added_memory(lambda: engine.generate(clips, talks, sampling))
    kv_bytes = 2 * layers * WIDTH * 2  # keys and values, bf16, every layer
    head = len(engine.builder.head) - 1 + MEMORY_VISUAL
    own = max(len(engine.builder.prompt(q).ids) - len(engine.builder.head) for q in asked)
    tail = own + MEMORY_NEW_TOKENS
    bound = kv_bytes * BATCH * (2 * head + tail)
    return {**measured, "peak_cache_mb": round(engine.peak_cache_tokens * kv_bytes / 2**20, 1),
            "bound_mb": round(bound / 2**20, 1), "head_tokens": head, "tail_tokens": tail}


def memory(layers: int) -> tuple[list[dict], dict, dict]:
    cases = {n: json_from_subprocess("bench.bench_answer", "--memory-case", str(n), "--layers", str(layers),
                                     "--threads", str(torch.get_num_threads()))
             for n in MEMORY_VIDEOS}
    rows = [{"case": f"memory_videos_{n}", "engine": "hf", "questions_per_video": MEMORY_QUESTIONS,
             "visual_tokens": MEMORY_VISUAL, "new_tokens": MEMORY_NEW_TOKENS, "batch_size": BATCH, **c}
            for n, c in cases.items()]
    few, many = (cases[n] for n in MEMORY_VIDEOS)
    ratios = {"memory_added_24_over_8_videos": many["added_mb"] / few["added_mb"],
              "memory_peak_cache_over_bound": max(c["peak_cache_mb"] / c["bound_mb"] for c in cases.values())}
    goals = {"memory_peak_cache_over_bound": goal(ratios["memory_peak_cache_over_bound"], "<=", 1.0),
             "memory_added_24_over_8_videos": goal(ratios["memory_added_24_over_8_videos"], "<=", 1.2)}
    return rows, ratios, goals


def exactness() -> tuple[list[dict], dict]:
    """Part 5: how often reuse on/off (and, for reference, another batch size) give the same answers."""
    from stages.answer import AnswerConfig, AnswerStage, GenerateConfig
    from stages.encode import EncodeStage
    from stages.model import load_video_llava
    from stages.testing import build_tiny_video_llava
    from synthqa.clips import synth_sample
    from synthqa.dataset import HELDOUT

    folder = build_tiny_video_llava(CACHE_DIR / "tiny-video-llava")
    questions = ["What color is it?", "How many objects are there?", "Is it moving left or right?",
                 "Where is the square?", "What shape is the red object?", "Describe the video."]
    rows, ratios = [], {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_video_llava(folder, dtype=dtype, device="cpu")
        clips = [synth_sample(HELDOUT["val500"][0], i).clip.frames for i in range(12)]
        videos = [e.embeds for e in EncodeStage(model).encode(clips)]
        embeds = [v for v in videos for _ in questions]
        asked = questions * len(videos)
        found = {}
        for name, reuse, batch in (("reuse_b8", True, 8), ("whole_b8", False, 8), ("whole_b1", False, 1)):
            stage = AnswerStage(model, tokenizer, config=AnswerConfig(generation=GenerateConfig(
                max_new_tokens=8, batch_size=batch, reuse_prefix=reuse)))
            stage.engine.record_logits = True
            found[name] = stage.answer(embeds, asked)
        pairs = [("reuse_b8", "whole_b8")] + ([("whole_b1", "whole_b8")] if dtype == "bfloat16" else [])
        for a, b in pairs:
            same = sum(x.token_ids == y.token_ids for x, y in zip(found[a], found[b], strict=True))
            first = max(float((x.logits[0].float() - y.logits[0].float()).abs().max())
                        for x, y in zip(found[a], found[b], strict=True))
            case = f"same_answers_{a}_vs_{b}_{dtype}"
            rows.append({"case": case, "engine": "hf", "questions_per_video": len(questions),
                         "visual_tokens": len(videos[0]), "new_tokens": 8, "rows": len(asked),
                         "same_answers": same, "max_first_logit_diff": round(first, 6)})
            ratios[case] = same / len(asked)
    return rows, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="Llama-7B shaped layers to run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each case (interleaved)")
    parser.add_argument("--clips", type=int, default=20, help="val500 clips for the engine comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and vLLM's OMP threads)")
    parser.add_argument("--skip-engines", action="store_true", help="leave out the hf vs vLLM part")
    parser.add_argument("--memory-case", type=int, help=argparse.SUPPRESS)  # one memory case (a subprocess)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_case:
        print(json.dumps(memory_case(args.memory_case, args.layers)))
        return
    rows, per_q = per_question(args.layers, args.repeats)
    ratios = {}
    for q, t in per_q.items():
        ratios[f"full_over_visionzip_reuse_per_question_q{q}"] = t["full"] / t["reused"]
        ratios[f"visionzip_over_visionzip_reuse_per_question_q{q}"] = t["zipped"] / t["reused"]
        ratios[f"full_over_visionzip_reuse_prefill_per_question_q{q}"] = (t["full_prefill"]
                                                                          / t["reused_prefill"])
    goals = {"full_over_visionzip_reuse_per_question_q25":
             goal(ratios["full_over_visionzip_reuse_per_question_q25"], ">=", 20.0)}
    for part in (conversations(args.layers, args.repeats), memory(args.layers)):
        rows += part[0]
        ratios.update(part[1])
        goals.update(part[2])
    same_rows, same_ratios = exactness()
    rows += same_rows
    ratios.update(same_ratios)
    goals["same_answers_reuse_b8_vs_whole_b8_float32"] = goal(
        ratios["same_answers_reuse_b8_vs_whole_b8_float32"], ">=", 1.0)
    if not args.skip_engines:
        engine_rows, engine_ratios = engines(args.clips, args.repeats, args.threads)
        rows += engine_rows
        ratios.update(engine_ratios)
    print(f"Llama-7B shaped layers: {args.layers} of 32 run, bf16, {torch.get_num_threads()} threads, "
          f"batches of {BATCH}, {NEW_TOKENS} new tokens per answer")
    print_table(rows, list(dict.fromkeys(key for row in rows for key in row)))
    print_ratios(ratios, goals)
    print(f"wrote {write_result('answer', rows, ratios, goals)}")


if __name__ == "__main__":
    main()
