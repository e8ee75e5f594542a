"""How well a synth model answers: a quick in-memory signal while training, and the fixed set a checkpoint
records in its `metrics.json`.

The fixed set goes through the encode and answer stages (not the training code's own path), so the
number a checkpoint records is the one the batch job would give on the same clips; the held-out mp4 sets
(`synthqa.dataset`) add decoding and are measured by `bench.bench_retention`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, VideoLlavaForConditionalGeneration

from pipelines.files import write_json
from pipelines.score import score_rows
from stages.answer import AnswerConfig, AnswerStage, GenerateConfig
from stages.encode import CompressionConfig, EncodeStage
from stages.model import ModelConfig, load_model
from synthqa.clips import QUESTION_TYPES, TrainingSample, synth_sample
from synthqa.model import FULL, answer_token_ids, visual_features
from visionzip.video_llava import project

FIXED_SET = (2_000_000, 10)  # (seed, clips): the in-memory set whose accuracy a checkpoint records


@torch.no_grad()
def quick_accuracy(model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                   samples: list[TrainingSample], clips: int = 8, compression: CompressionConfig = FULL
                   ) -> dict[str, float]:
    """First-token greedy accuracy per question type on in-memory clips, through the answer stage's own
    prompt building (`AnswerStage.build_inputs`, left-padded batches): a training-time signal; the real
    measurement decodes mp4 files through the pipeline and scores with `pipelines.score`."""
    model.eval()
    answer = AnswerStage(model, tokenizer)  # its prompt building only: no generation
    hits: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
    for i in range(0, len(samples), clips):
        chunk = samples[i : i + clips]
        visual = project(model, visual_features(model, chunk, compression)).unflatten(0, (len(chunk), -1))
        questions = [q for s in chunk for q in s.questions]
        embeds = [v.flatten(0, 1) for v, s in zip(visual, chunk, strict=True) for _ in s.questions]
        inputs = answer.build_inputs(embeds, [q.question for q in questions])
        predicted = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1)
        target = answer_token_ids(tokenizer, [q.answer for q in questions])
        for q, ok in zip(questions, (predicted == target).tolist(), strict=True):
            hits[q.type].append(ok)
    acc = {t: float(np.mean(v)) for t, v in hits.items() if v}
    acc["overall"] = float(np.mean([ok for v in hits.values() for ok in v]))
    return acc


def fixed_set_accuracy(folder: str | Path, seed: int = FIXED_SET[0], clips: int = FIXED_SET[1],
                       compression: CompressionConfig = FULL,
                       projector_path: str | Path | None = None) -> dict:
    """Load a checkpoint (with a tuned projector, if given) and answer `clips` in-memory clips x 5
    questions through the encode and answer stages (greedy), scored by `pipelines.score` (exact): what the
    shipped model records in its `metrics.json` (full tokens) and its test checks."""
    model_config = ModelConfig(path=str(folder), dtype="float32", device="cpu",
                               projector_path=None if projector_path is None else str(projector_path))
    model, tokenizer = load_model(model_config)
    samples = [synth_sample(seed, i) for i in range(clips)]
    encode = EncodeStage(model, compression=compression)
    encoded = encode.encode([s.clip.frames for s in samples])
    answerer = AnswerStage(model, tokenizer, config=AnswerConfig(generation=GenerateConfig(max_new_tokens=3)))
    rows = []
    for i, (sample, video) in enumerate(zip(samples, encoded, strict=True)):
        questions = [q.question for q in sample.questions]
        replies = answerer.answer([video] * len(questions), questions)  # with its positions, if any
        rows += [{"id": f"{i:05d}-{q.type}", "video": f"{i:05d}", "category": q.type, "prediction": r.text,
                  "answer": q.answer} for q, r in zip(sample.questions, replies, strict=True)]  # fmt: skip
    return score_rows(rows, metric="exact")


def write_metrics(folder: str | Path) -> dict:
    """`metrics.json` in the checkpoint folder: the fixed set's definition and accuracy."""
    result = fixed_set_accuracy(folder)
    metrics = {"fixed_set": {"seed": FIXED_SET[0], "clips": FIXED_SET[1], "compression": "none",
                             "correct": result["overall"]["correct"], "n": result["overall"]["n"],
                             "per_type_correct": {t: g["correct"] for t, g in result["by_category"].items()}}}
    write_json(Path(folder) / "metrics.json", metrics)
    return metrics
