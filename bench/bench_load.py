"""Load benchmark: what each stage's actor adds to its memory when it loads only its half of the model.

A random Video-LLaVA whose LLM dominates, as the 7B's does (CLIP ViT-L/14 tower, a ~0.9 B Llama: ~1.2 B
parameters), is written once to disk in fp16 (`bench/.cache/load-1b`). Each case loads it in a fresh
process (so its peak RSS is its own) after the imports, as an actor would:
- `whole`: transformers' `from_pretrained` of the whole model (what both actors did before);
- `encode`: `load_video_llava(keep="vision")`, which reads only the tower's and projector's tensors;
- `answer`: `load_video_llava(keep="language")`, only the LLM's.
`added_mb` is the peak RSS during the load minus the RSS before it; `tensors_mb` the bytes of the
tensors that case needs (fp16). Goal (issue 16): encode's added memory <= 1.3 x its tensors' bytes.

    .venv/bin/python -m bench.bench_load
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaForConditionalGeneration  # noqa: E402

from bench.common import CACHE_DIR, added_memory, goal, json_from_subprocess, print_table, write_result  # noqa: E402
from stages.model import HALVES, half_parameters, load_video_llava  # noqa: E402
from stages.testing import tiny_tokenizer, video_llava_config  # noqa: E402

FOLDER = CACHE_DIR / "load-1b"
KEEP = {"whole": "all", "encode": "vision", "answer": "language"}


def build(folder: Path = FOLDER) -> Path:
    """The random ~1.2 B-parameter checkpoint, fp16, written once."""
    if (folder / "config.json").exists():
        return folder
    tokenizer = tiny_tokenizer()
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = VideoLlavaForConditionalGeneration(video_llava_config(tokenizer, vision, text)).half()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def measure(case: str) -> dict:
    """In this (fresh) process: the added memory of loading the checkpoint as `case` does and touching
    every page of its tensors, as a first forward pass (or the copy to a GPU) does: safetensors maps the
    file, and pages never read would not count."""

    def load_and_touch() -> None:
        model, _ = load_video_llava(FOLDER, dtype="float16", device="cpu", keep=KEEP[case])
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.detach().reshape(-1).view(torch.uint8)[::4096].sum()

    return added_memory(load_and_touch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", choices=sorted(KEEP), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    build()
    from stages.model import read_model_config

    halves = half_parameters(read_model_config(FOLDER))
    tensors = {"whole": sum(halves.values()) * 2, "encode": halves["vision"] * 2,
               "answer": halves["language"] * 2}
    rows = []
    for case in KEEP:
        memory = json_from_subprocess("bench.bench_load", f"--measure={case}")
        rows.append({"case": case, "keeps": ", ".join(HALVES.get(KEEP[case], ("everything",))),
                     "tensors_mb": round(tensors[case] / 2**20, 1), **memory,
                     "added_over_tensors": round(memory["added_mb"] * 2**20 / tensors[case], 3)})
    by_case = {row["case"]: row for row in rows}
    ratios = {f"{case}_added_over_tensors": by_case[case]["added_over_tensors"] for case in KEEP}
    ratios["encode_added_over_whole_added"] = by_case["encode"]["added_mb"] / by_case["whole"]["added_mb"]
    goals = {"encode_added_over_tensors": goal(ratios["encode_added_over_tensors"], "<=", 1.3)}
    print_table(rows)
    print(json.dumps(goals))
    print(f"wrote {write_result('load', rows, ratios, goals)}")


if __name__ == "__main__":
    main()
