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

Threads: one by default for both engines (torch's, and OMP_NUM_THREADS for vLLM's worker), as
`bench_prefill` argues for this shared 2-core machine.

Run: .venv/bin/python -m bench.bench_answer [--layers 1] [--repeats 3] [--clips 20] [--threads 1]
(about 12 minutes here, most of it the full path's batches of 8 x 2106 tokens)
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `bench`, `stages` and `visionzip` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaModel  # noqa: E402

from bench.common import goal, interleaved_medians, print_ratios, print_table, write_result  # noqa: E402

WIDTH, HEADS, MLP, LLM_LAYERS = 4096, 32, 11008, 32
FULL, ZIPPED, HEAD_TEXT, TAIL_TEXT = 2056, 136, 6, 44  # 6 + 44 = the 50 text tokens of bench_prefill
NEW_TOKENS, BATCH = 16, 8
QUESTIONS = (1, 5, 25)
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


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
        out = model(inputs_embeds=last, position_ids=positions + step, use_cache=True, **{CACHE_KW: cache})
        cache = getattr(out, CACHE_KW)


def whole_prompts(model: LlamaModel, batch: int, visual: int) -> None:
    """`batch` prompts of visual + 50 text tokens read whole, then decoded."""
    x = embeds(batch, visual + HEAD_TEXT + TAIL_TEXT)
    out = model(inputs_embeds=x, use_cache=True)
    decode(model, getattr(out, CACHE_KW), x[:, -1:], torch.full((batch, 1), x.shape[1]))


def prefix(model: LlamaModel) -> DynamicCache:
    """The video's prefix (6 text + 136 visual tokens) read once: its cache."""
    return getattr(model(inputs_embeds=embeds(1, HEAD_TEXT + ZIPPED), use_cache=True), CACHE_KW)


def tails_on_prefix(model: LlamaModel, cache, batch: int, new_tokens: int = NEW_TOKENS) -> None:
    """`batch` questions' own tokens on a copy of the prefix cache expanded to the batch, then decoded."""
    length = cache.get_seq_length()
    expanded = DynamicCache(ddp_cache_data=[(layer.keys.expand(batch, -1, -1, -1).clone(),
                                             layer.values.expand(batch, -1, -1, -1).clone())
                                            for layer in cache.layers])
    x = embeds(batch, TAIL_TEXT, seed=1)
    positions = length + torch.arange(TAIL_TEXT).expand(batch, -1)
    out = model(inputs_embeds=x, position_ids=positions, use_cache=True, **{CACHE_KW: expanded})
    if new_tokens:
        decode(model, getattr(out, CACHE_KW), x[:, -1:], torch.full((batch, 1), length + TAIL_TEXT))


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
    hf["caption"].generation_config.min_new_tokens = 64
    os.environ["OMP_NUM_THREADS"] = str(threads)
    small = VllmConfig(gpu_memory_utilization=0.05, max_model_len=1024)
    vllm_stage = AnswerStage(synth, config=AnswerConfig(engine="vllm", generation=settings["qa"], vllm=small))
    start_seconds = vllm_stage.engine.start_seconds
    configs = {"qa": vllm_stage.generation_config,
               "caption": AnswerStage._generation_config(settings["caption"], tokenizer)}
    configs["caption"].min_new_tokens = 64

    def run_vllm(task: str):
        vllm_stage.engine.llm.reset_prefix_cache()
        vllm_stage.generation_config = configs[task]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="Llama-7B shaped layers to run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each case (interleaved)")
    parser.add_argument("--clips", type=int, default=20, help="val500 clips for the engine comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and vLLM's OMP threads)")
    parser.add_argument("--skip-engines", action="store_true", help="only the 7B-geometry part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, per_q = per_question(args.layers, args.repeats)
    ratios = {}
    for q, t in per_q.items():
        ratios[f"full_over_visionzip_reuse_per_question_q{q}"] = t["full"] / t["reused"]
        ratios[f"visionzip_over_visionzip_reuse_per_question_q{q}"] = t["zipped"] / t["reused"]
        ratios[f"full_over_visionzip_reuse_prefill_per_question_q{q}"] = (t["full_prefill"]
                                                                          / t["reused_prefill"])
    goals = {"full_over_visionzip_reuse_per_question_q25":
             goal(ratios["full_over_visionzip_reuse_per_question_q25"], ">=", 20.0)}
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
