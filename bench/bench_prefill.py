"""What VisionZip buys in the LLM: prefill with 2056 vs 136 vs VisionZip+temporal visual tokens (issue 4).

Video-LLaVA-7B's LLM is Llama-7B shaped (width 4096, 32 heads, MLP 11008). All 32 layers would take
minutes per full prefill on this CPU, so it runs `--layers` (default 2) random bf16 layers and reports
the time per layer; the ratio between cases is what counts, and it is the same per layer.
Prompt = the visual tokens + 50 text tokens (`USER: <video>\\n{question} ASSISTANT:` with a question).
Cases (timed side by side, interleaved):
  full                 8 frames x 257 tokens = 2056 (Video-LLaVA today, compression=none)
  visionzip            8 x (14 + 3) = 136 (the paper's Video-LLaVA setting)
  visionzip_temporal   136 after temporal merging; the count is what the encoder keeps of a synthetic
                       clip (static textured background, one moving square) on the tiny random tower
Also measured:
  - prefill + 16 decode steps on the same layers, and the CLIP ViT-L/14 tower (random, bf16, 8 frames:
    all 24 layers for `full`, `zip_clip` for the others). The 7B end-to-end estimate for one 8-frame
    question is tower + (32 / layers) x (prefill + 16 decode steps); embeddings, projector and lm_head
    are left out (small).
  - end to end on the tiny Video-LLaVA (EncodeStage + AnswerStage, 16 new tokens forced), measured.
  - peak RSS of one prefill per case, each in a fresh subprocess whose peak is reset once the layers are
    built: `added_mb` is what the prefill needs on top of the weights.
FLOP ratio: 2 * L * (4 d^2 + 3 d f) for the projections and MLP plus 2 * L^2 * d for causal attention
(QK^T and AV over half the square), per layer. The measured ratio can exceed it on a CPU: the
attention kernel runs well below matmul throughput, and attention's share grows with L^2.

Threads: one by default. On this shared 2-core machine, two threads wait at every op's barrier for a
core another process holds; that fixed cost per op (~10 ms) swamps short prompts (seen: 186 tokens 0.51 s
per layer with 2 threads vs 0.17 s with 1, while 2106 tokens took 2.8 s vs 2.5 s). One thread measures
the work itself; `--threads 2` measures this machine's contention too.

Run: .venv/bin/python -m bench.bench_prefill [--layers 2] [--repeats 3] [--threads 1]   (about 2-3 minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `bench`, `stages` and `visionzip` importable
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaModel  # noqa: E402

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
from stages.answer import AnswerConfig, AnswerStage, GenerateConfig  # noqa: E402
from stages.encode import CompressionConfig, EncodeStage, TemporalConfig  # noqa: E402
from stages.model import load_video_llava  # noqa: E402
from stages.testing import build_tiny_video_llava  # noqa: E402
from visionzip import zip_clip  # noqa: E402

WIDTH, HEADS, MLP, LLM_LAYERS = 4096, 32, 11008, 32
VIT_L14 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, hidden_act="quick_gelu",
)  # fmt: skip
FRAMES, TEXT_TOKENS, NEW_TOKENS = 8, 50, 16
DOMINANT, CONTEXTUAL = 14, 3
QUESTION = "What is the small square doing in this video, and which way does it move?"
CASES = ("full", "visionzip", "visionzip_temporal")


def synthetic_clip(height: int = 360, width: int = 640) -> np.ndarray:
    """8 frames: a fixed textured background with one coloured square moving left to right."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([x * 255 // width, y * 255 // height, (x // 40 + y // 40) % 2 * 160 + 40], -1)
    background = np.clip(background + rng.normal(0, 6, background.shape), 0, 255).astype(np.uint8)
    clip = np.repeat(background[None], FRAMES, axis=0)
    for t in range(FRAMES):
        left = 40 + t * (width - 160) // FRAMES
        clip[t, 140:220, left : left + 80] = (230, 40, 40)
    return clip


def llama_layers(layers: int) -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=WIDTH, num_attention_heads=HEADS, num_key_value_heads=HEADS, intermediate_size=MLP,
        num_hidden_layers=layers, vocab_size=256, max_position_embeddings=4096,
    )  # fmt: skip
    return LlamaModel(config).to(torch.bfloat16).eval()


def prompt(tokens: int) -> torch.Tensor:
    return torch.randn(1, tokens, WIDTH, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)


def prefill_then_decode(model: LlamaModel, embeds: torch.Tensor, new_tokens: int) -> None:
    """The LLM's work for one answer: prefill, then `new_tokens` single-token steps on the KV cache."""
    cache = kv_cache.new_cache(model.config)
    model(inputs_embeds=embeds, use_cache=True, **{kv_cache.CACHE: cache})
    step = embeds[:, -1:]
    for _ in range(new_tokens):
        model(inputs_embeds=step, use_cache=True, **{kv_cache.CACHE: cache})


def prefill_flops(tokens: int) -> float:
    """Per layer: projections and MLP, plus causal attention scores and mixing."""
    return 2 * tokens * (4 * WIDTH**2 + 3 * WIDTH * MLP) + 2 * tokens**2 * WIDTH


def llm_seconds(tokens: dict[str, int], layers: int, repeats: int) -> tuple[dict, dict]:
    """Median seconds per case of one prefill, and of prefill + 16 decode steps, on the same layers."""
    model = llama_layers(layers)
    embeds = {name: prompt(count) for name, count in tokens.items()}
    with torch.inference_mode():
        prefill = interleaved_medians(
            {name: lambda e=e: model(inputs_embeds=e, use_cache=True) for name, e in embeds.items()},
            repeats=repeats,
        )
        answer = interleaved_medians(
            {name: lambda e=e: prefill_then_decode(model, e, NEW_TOKENS) for name, e in embeds.items()},
            repeats=repeats,
            warmup=0,
        )
    return prefill, answer


def tiny_end_to_end(repeats: int) -> tuple[dict[str, float], dict[str, int]]:
    """Encode + answer (16 new tokens) of one 8-frame question on the tiny model, per case."""
    model, tokenizer = load_video_llava(build_tiny_video_llava(CACHE_DIR / "tiny-video-llava"), device="cpu")
    zipped = CompressionConfig(dominant=DOMINANT, contextual=CONTEXTUAL)
    encoders = {
        "full": EncodeStage(model, compression=CompressionConfig(method="none")),
        "visionzip": EncodeStage(model, compression=zipped),
        "visionzip_temporal": EncodeStage(model, compression=replace(zipped, temporal=TemporalConfig(True))),
    }
    generation = GenerateConfig(max_new_tokens=NEW_TOKENS)
    answerer = AnswerStage(model, tokenizer, config=AnswerConfig(generation=generation))
    answerer.sampling = replace(answerer.sampling, min_new_tokens=NEW_TOKENS)  # same decode work in each case
    clip = synthetic_clip()
    kept = {name: encoder.encode([clip])[0].visual_tokens_kept for name, encoder in encoders.items()}

    def case(encoder: EncodeStage):
        return lambda: answerer.answer([encoder.encode([clip])[0].embeds], [QUESTION])

    seconds = interleaved_medians({name: case(enc) for name, enc in encoders.items()}, repeats=repeats)
    return seconds, kept


def tower_seconds(repeats: int) -> dict[str, float]:
    """CLIP ViT-L/14 on 8 frames in bf16: the full tower (compression none) vs zip_clip."""
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**VIT_L14)).to(torch.bfloat16).eval()
    pixels = torch.randn(FRAMES, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cases = {
        "full": lambda: tower(pixels, output_hidden_states=-2).hidden_states[-2],
        "visionzip": lambda: zip_clip(tower, pixels, DOMINANT, CONTEXTUAL),
    }
    with torch.inference_mode():
        return interleaved_medians(cases, repeats=repeats)


def measure_memory(tokens: int, layers: int) -> dict:
    """One prefill of `tokens` in this (fresh) process; the peak is reset after building the layers."""
    model, embeds = llama_layers(layers), prompt(tokens)
    return added_memory(lambda: model(inputs_embeds=embeds, use_cache=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2, help="Llama-7B shaped layers to run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each case (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    parser.add_argument("--memory-of", type=int, help=argparse.SUPPRESS)  # internal: one prefill's memory
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args.layers)))
        return

    torch.set_num_threads(args.threads)
    tiny_seconds, kept = tiny_end_to_end(args.repeats)
    visual = {"full": FRAMES * 257, "visionzip": FRAMES * (DOMINANT + CONTEXTUAL)}
    visual["visionzip_temporal"] = kept["visionzip_temporal"]
    assert kept["full"] == visual["full"] and kept["visionzip"] == visual["visionzip"], kept
    tokens = {name: visual[name] + TEXT_TOKENS for name in CASES}

    layers = f"--layers={args.layers}"
    memory = {
        name: json_from_subprocess("bench.bench_prefill", f"--memory-of={tokens[name]}", layers)
        for name in CASES
    }
    prefill, answer = llm_seconds(tokens, args.layers, args.repeats)
    tower = tower_seconds(args.repeats)
    tower["visionzip_temporal"] = tower["visionzip"]  # merging itself is negligible next to the tower
    scale = LLM_LAYERS / args.layers
    e2e_7b = {name: tower[name] + scale * answer[name] for name in CASES}

    rows = [
        {
            "case": name,
            "visual_tokens": visual[name],
            "tokens": tokens[name],
            "prefill_s_per_layer": round(prefill[name] / args.layers, 4),
            "prefill_32_layers_s": round(prefill[name] * scale, 2),
            "tflop_32_layers": round(prefill_flops(tokens[name]) * LLM_LAYERS / 1e12, 2),
            "answer_s_per_layer": round(answer[name] / args.layers, 4),
            "tower_s": round(tower[name], 3),
            "e2e_7b_estimate_s": round(e2e_7b[name], 2),
            "e2e_tiny_s": round(tiny_seconds[name], 4),
            **memory[name],
        }
        for name in CASES
    ]
    ratios = {}
    for name in CASES[1:]:
        ratios[f"prefill_full_over_{name}"] = prefill["full"] / prefill[name]
        ratios[f"flops_full_over_{name}"] = prefill_flops(tokens["full"]) / prefill_flops(tokens[name])
        ratios[f"e2e_7b_full_over_{name}"] = e2e_7b["full"] / e2e_7b[name]
        ratios[f"e2e_tiny_full_over_{name}"] = tiny_seconds["full"] / tiny_seconds[name]
    goals = {"prefill_full_over_visionzip": goal(ratios["prefill_full_over_visionzip"], ">=", 8.0)}

    print(
        f"Llama-7B shaped layers (width {WIDTH}, {HEADS} heads, MLP {MLP}), {args.layers} of 32 run, bf16, "
        f"{torch.get_num_threads()} threads; {TEXT_TOKENS} text tokens; {NEW_TOKENS} new tokens per answer"
    )
    print_table(rows)
    print_ratios(ratios, goals)
    print(f"wrote {write_result('prefill', rows, ratios, goals)}")


if __name__ == "__main__":
    main()
