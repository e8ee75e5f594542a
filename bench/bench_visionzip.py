"""What VisionZip costs in the vision tower: plain encoding vs the official recipe vs `zip_clip` (issue 2).

A CLIP ViT-L/14 sized random tower (24 layers, width 1024, 16 heads, MLP 4096, 224 px / patch 14 = 257
tokens), 8 frames, float32, on this machine's CPU. Cases, timed side by side in one run (interleaved):
  plain     vision_model(pixel_values, output_hidden_states=True) with SDPA: what Video-LLaVA runs today
  official  eager attention + output_hidden_states + output_attentions, then zip_tokens (official VisionZip)
  zip_clip  zip_clip(vision_model, pixel_values): SDPA up to layer -2, only the CLS attention row
Seconds are medians over rounds (each case once per round, order reversed every other round); ratios
are medians of the per-round ratios. Peak RSS per case comes from a fresh subprocess per case whose peak
is reset (Linux /proc/self/clear_refs) once the model and input are loaded: `added_mb` is what the case
needs on top of the loaded model.

Run: .venv/bin/python -m bench.bench_visionzip [--repeats 5]   (3-5 minutes on 2 idle cores)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `bench` and `visionzip` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from bench.common import (  # noqa: E402
    added_memory,
    goal,
    interleaved_medians,
    json_from_subprocess,
    print_table,
    write_result,
)
from visionzip import zip_clip, zip_tokens  # noqa: E402

VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="quick_gelu",
)
FRAMES = 8
DOMINANT, CONTEXTUAL = 14, 3  # the paper's Video-LLaVA budget: 17 of 257 tokens per frame (136 of 2056)
CASES = {
    "plain": "SDPA, output_hidden_states, all 24 layers",
    "official": "eager, output_attentions + hidden_states, zip_tokens",
    "zip_clip": "SDPA to layer -2, CLS attention row only",
}


def build(attn: str) -> CLIPVisionModel:
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**VIT_L14)).eval()
    model.set_attn_implementation(attn)
    return model


def make_case(name: str, tower: CLIPVisionModel) -> Callable[[torch.Tensor], object]:
    """The case as a function of pixel values; `tower` must be eager for "official", SDPA otherwise."""
    if name == "plain":
        return lambda pixels: tower(pixels, output_hidden_states=True).hidden_states[-2]
    if name == "zip_clip":
        return lambda pixels: zip_clip(tower, pixels, DOMINANT, CONTEXTUAL)
    # The official code patches CLIPAttention to also return the layer's keys; a hook on k_proj gives the
    # same tensor without patching.
    keys: dict[str, torch.Tensor] = {}
    tower.encoder.layers[-2].self_attn.k_proj.register_forward_hook(lambda mod, args, out: keys.update(k=out))
    heads = tower.config.num_attention_heads

    def official(pixels: torch.Tensor) -> object:
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
        features = out.hidden_states[-2]
        batch, n, width = features.shape
        metric = keys["k"].view(batch, n, heads, width // heads).mean(dim=2)
        return zip_tokens(features, out.attentions[-2][:, :, 0], metric, DOMINANT, CONTEXTUAL)

    return official


def pixel_values() -> torch.Tensor:
    return torch.randn(FRAMES, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def measure_memory(name: str) -> dict:
    """Run one case once in this (fresh) process; peak RSS is reset after loading, so only the case counts."""
    tower = build("eager" if name == "official" else "sdpa")
    case, pixels = make_case(name, tower), pixel_values()
    return added_memory(lambda: case(pixels))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each case (interleaved)")
    parser.add_argument("--memory-of", choices=list(CASES), help=argparse.SUPPRESS)  # internal: one case
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of)))
        return

    memory = {name: json_from_subprocess("bench.bench_visionzip", "--memory-of", name) for name in CASES}
    sdpa, eager = build("sdpa"), build("eager")
    cases = {name: make_case(name, eager if name == "official" else sdpa) for name in CASES}
    pixels = pixel_values()
    rounds = []
    with torch.inference_mode():
        for case in cases.values():  # warm up every kernel path on one frame; all 8-frame runs are timed
            case(pixels[:1])
        for i in range(args.repeats):  # one round = each case once; every other round in reverse order
            order = list(cases) if i % 2 == 0 else list(cases)[::-1]
            rounds.append(
                interleaved_medians({n: partial(cases[n], pixels) for n in order}, repeats=1, warmup=0)
            )
    seconds = {name: statistics.median(r[name] for r in rounds) for name in CASES}

    rows = [
        {
            "case": name,
            "what": what,
            "seconds": round(seconds[name], 3),
            "tokens_per_frame": 257 if name == "plain" else DOMINANT + CONTEXTUAL,
            **memory[name],
        }
        for name, what in CASES.items()
    ]
    # Ratios pair the cases of one round (seconds apart), so load from other processes mostly cancels.
    ratios = {
        f"zip_clip_over_{base}": statistics.median(r["zip_clip"] / r[base] for r in rounds)
        for base in ("plain", "official")
    }
    goals = {
        "zip_clip_over_plain": goal(ratios["zip_clip_over_plain"], "<=", 0.97),
        "zip_clip_over_official": goal(ratios["zip_clip_over_official"], "<=", 0.9),
    }
    print(f"CLIP ViT-L/14 random tower, {FRAMES} frames, float32, {torch.get_num_threads()} threads")
    print_table(rows)
    print("zip_clip / plain per round:", [round(r["zip_clip"] / r["plain"], 3) for r in rounds])
    for key, g in goals.items():
        print(f"{key}: {g['value']} (goal {g['op']} {g['target']}: {'met' if g['met'] else 'NOT met'})")
    print(f"wrote {write_result('visionzip', rows, ratios, goals)}")


if __name__ == "__main__":
    main()
