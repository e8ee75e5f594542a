"""Train the small Video-LLaVA that answers the synthetic video QA of `pipelines.synth`, on a CPU.

A feasibility run found that the answer loss alone leaves a from-scratch model at chance for a long time:
the LLM cannot learn what to look for before the tower shows it anything. So, in two phases:

1. `tower`: the CLIP tower alone learns, from single frames, what each frame holds. At the selection
   layer (the one Video-LLaVA feeds the LLM, -2) its CLS predicts the object count, which colours are
   present and each one's column (`--cls-targets`), but no shape and no row (top/bottom half): those
   live only in the object patches, so token selection matters. Every patch token predicts its own row
   and column and, jointly with each, the object (colour x shape) covering it: a conjunctive code, so
   that the LLM can read "the red object is a circle in the top half" from the object patches without
   binding separate colour and shape features; and where the object's centre is, to a frame's motion
   (4 px), so that comparing frames tells its direction. With `--attention-weight`, the selection
   layer's CLS attention is also taught to spread over the objects (`cls_attention_loss`).
   That last loss makes VisionZip's premise hold by construction. On CLIP it is an observation: the
   CLS attends to a few informative tokens. Without the loss, this tower's CLS found the objects
   hardly more often than random patches do, and a CLS that also predicted shapes found them but held
   the answers itself (`bench.bench_retention` measures the share of objects each rule keeps). No LLM
   runs in this phase, so a step is cheap.
2. `lm`: tower frozen; the multimodal projector and the LLM learn the answer token and EOS, built by
   the answer stage's own `build_inputs` prompt, so training and inference read exactly the same
   prompt. A curriculum of token subsets (`TokenSubsets`), because among 520 tokens a from-scratch LLM
   stays on a plateau (about 70%: it answers about whichever object, never binding the question's
   object) for thousands of steps: first (`--object-steps`) each frame shows its CLS and two object
   patches (24 tokens a clip), where it learns the binding in a few hundred steps; then
   (`--background-steps`) every object patch plus a random amount of background; last (`--lm-steps`)
   every token or, with `--full-fraction`, uniform random subsets in the other steps. With
   `--motion-weight`, a training-only probe (`MotionProbe`) also asks the LLM's visual tokens which
   way their object moves: without it direction stayed at chance.

Everything is seeded (model init, data streams); `python -m pipelines.train --help` lists the knobs, and
`models/synth/README.md` records the command that made the shipped checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    PreTrainedTokenizerBase,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
)

from pipelines.synth import (
    CENTER_BINS,
    COLORS,
    DIRECTIONS,
    FRAME_SIZE,
    NUM_FRAMES,
    POSITION_BINS,
    QUESTION_TYPES,
    SHAPES,
    TrainingSample,
    synth_sample,
    training_samples,
)
from pipelines.tune import learning_rate
from stages.answer import PROMPT, AnswerStage
from stages.model import tiny_tokenizer, video_llava_config
from stages.preprocess import ClipPreprocess
from visionzip import clip_selection_layer_outputs
from visionzip.video_llava import feature_layer, frame_features, project

log = logging.getLogger("vzpipe.train")
PATCH = 14


def synth_config(tokenizer: PreTrainedTokenizerBase, width: int = 128, lm_width: int = 192,
                 lm_layers: int = 4) -> VideoLlavaConfig:
    """112 px / patch 14 (64 patches + CLS = 65 tokens per frame), a 4-block tower (the last one is
    skipped: Video-LLaVA reads block 3's output) and a small Llama."""
    vision = CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4, num_attention_heads=4,
        image_size=FRAME_SIZE, patch_size=PATCH, projection_dim=width,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=lm_width, intermediate_size=int(8 / 3 * lm_width),
        num_hidden_layers=lm_layers, num_attention_heads=lm_width // 32, num_key_value_heads=lm_width // 32,
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    return video_llava_config(tokenizer, vision, text, frames=NUM_FRAMES)


def new_model(seed: int, **sizes: int) -> tuple[VideoLlavaForConditionalGeneration, PreTrainedTokenizerBase]:
    """A randomly initialised synth model (seeded) with the offline tokenizer, SDPA attention."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = synth_config(tokenizer, **sizes)
    config._attn_implementation = "sdpa"
    model = VideoLlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return model, tokenizer


PREPROCESS = ClipPreprocess(shortest_edge=FRAME_SIZE, crop_height=FRAME_SIZE, crop_width=FRAME_SIZE)


def pixels_of(samples: list[TrainingSample]) -> torch.Tensor:
    """[B * T, 3, 112, 112] float32, preprocessed exactly as the encode stage does for this model."""
    return PREPROCESS(np.concatenate([s.clip.frames for s in samples]))


CLS_TARGETS = ("count", "present", "shape", "x", "y")  # what the tower's CLS can be taught to predict
SHIPPED_CLS_TARGETS = ("count", "present", "x")  # models/synth: shape and half only in the patches


class TowerHeads(nn.Module):
    """Training-only readouts of the selection layer: per-frame attributes from CLS, per-patch classes."""

    def __init__(self, width: int, grid: int, cls_targets: tuple[str, ...] = SHIPPED_CLS_TARGETS) -> None:
        super().__init__()
        colors = len(COLORS)
        sizes = {"count": 3, "present": 2 * colors, "shape": len(SHAPES) * colors,
                 "x": POSITION_BINS * colors, "y": POSITION_BINS * colors}  # fmt: skip
        unknown = sorted(set(cls_targets) - set(sizes))
        if unknown or "count" not in cls_targets:
            raise ValueError(f"cls_targets must include 'count' and be among {sorted(sizes)}, "
                             f"got {cls_targets}")
        self.sizes = {key: size for key, size in sizes.items() if key in cls_targets}
        objects = len(COLORS) * len(SHAPES)
        self.patch_sizes = {"object_row": 1 + objects * grid, "object_col": 1 + objects * grid,
                            "row": grid, "col": grid,
                            "object_x": 1 + CENTER_BINS, "object_y": 1 + CENTER_BINS}  # fmt: skip
        self.grid = grid
        self.cls = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, sum(self.sizes.values())))
        self.patch = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, sum(self.patch_sizes.values())))

    def loss(self, features: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of cross-entropies; absent objects' shape/position targets are -1 (ignored)."""
        colors = len(COLORS)
        out = self.cls(features[:, 0]).split(list(self.sizes.values()), dim=-1)
        heads = dict(zip(self.sizes, out, strict=True))
        total = F.cross_entropy(heads["count"], labels["count"])
        for key in [k for k in heads if k != "count"]:
            logits = heads[key].reshape(len(features), colors, -1)
            total = total + F.cross_entropy(logits.flatten(0, 1), labels[key].flatten(), ignore_index=-1)
        # every patch token says where it is (row, column) and which object (colour x shape) covers it
        # jointly with that row and with that column: a conjunctive code, so that the LLM can read "the
        # red object is a circle in the top half" from any average of object patches without having to
        # bind separate colour and shape features by attention (which the small LLM did not learn); and
        # where the object's centre is, a frame's motion (4 px) per bin, finer than the 2 patches it
        # travels in a clip, so that its direction can be read by comparing frames
        place = torch.arange(self.grid * self.grid).expand(len(features), -1)
        row, col = place // self.grid, place % self.grid
        covered = labels["patch_color"] > 0
        color, shape = (labels["patch_color"] - 1).clamp(min=0), (labels["patch_shape"] - 1).clamp(min=0)
        obj = color * len(SHAPES) + shape
        targets = {"row": row, "col": col,
                   "object_row": torch.where(covered, 1 + obj * self.grid + row, 0),
                   "object_col": torch.where(covered, 1 + obj * self.grid + col, 0),
                   "object_x": labels["patch_x"], "object_y": labels["patch_y"]}  # fmt: skip
        patch = self.patch(features[:, 1:]).split(list(self.patch_sizes.values()), dim=-1)
        for key, logits in zip(self.patch_sizes, patch, strict=True):
            total = total + F.cross_entropy(logits.flatten(0, 1), targets[key].flatten())
        return total


def frame_label_batch(samples: list[TrainingSample]) -> dict[str, torch.Tensor]:
    from pipelines.synth import frame_labels

    per_clip = [frame_labels(s.clip, PATCH) for s in samples]
    return {key: torch.from_numpy(np.concatenate([f[key] for f in per_clip])) for key in per_clip[0]}


def cls_attention_loss(cls_attn: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from the target `share` [B, P] (sums to 1 per frame) to the selection layer's CLS
    attention over the patches [B, H, 1 + P], averaged over heads and renormalised without the CLS:
    exactly the distribution whose top entries VisionZip keeps (`visionzip.zip_tokens`)."""
    attention = cls_attn[:, :, 1:].mean(1)
    attention = attention / attention.sum(-1, keepdim=True)
    return -(share * attention.clamp(min=1e-12).log()).sum(-1).mean()


def selection_features(model: VideoLlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """hidden_states[vision_feature_layer] of the video tower (blocks after it skipped)."""
    return clip_selection_layer_outputs(model.model.video_tower, pixels, feature_layer(model))[0]


def _batches(stream: Iterator[TrainingSample], size: int) -> Iterator[list[TrainingSample]]:
    while True:
        yield [next(stream) for _ in range(size)]


def _optimizer_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor, lr: float) -> float:
    """One update at learning rate `lr`, gradients clipped to norm 1; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


def _lr(step: int, steps: int, lr: float) -> float:
    """Linear warm-up (a tenth of the steps, at most 100), then cosine decay to 10%."""
    return learning_rate(step, steps, lr, warmup=min(100, steps // 10 + 1), floor=0.1)


def pretrain_tower(model: VideoLlavaForConditionalGeneration, steps: int, clips: int = 8, lr: float = 2e-3,
                   seed: int = 0, log_every: int = 50, cls_targets: tuple[str, ...] = SHIPPED_CLS_TARGETS,
                   attention_weight: float = 0.0) -> list[float]:
    """Phase 1 (see module doc); `cls_targets`: what the CLS predicts (`TowerHeads`); `attention_weight`:
    of `cls_attention_loss` towards the objects (`object_share`), 0 = off. Returns the loss of every
    step."""
    tower = model.model.video_tower
    torch.manual_seed(seed)
    vision = model.config.vision_config
    heads = TowerHeads(vision.hidden_size, vision.image_size // vision.patch_size, cls_targets)
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    tower.train()
    losses = []
    start = time.perf_counter()
    for step, batch in zip(range(steps), _batches(training_samples(seed), clips), strict=False):
        labels = frame_label_batch(batch)
        features, cls_attn, _ = clip_selection_layer_outputs(tower, pixels_of(batch), feature_layer(model))
        loss = heads.loss(features, labels)
        if attention_weight:
            loss = loss + attention_weight * cls_attention_loss(cls_attn, labels["object_share"])
        losses.append(_optimizer_step(opt, params, loss, _lr(step, steps, lr)))
        if log_every and (step + 1) % log_every == 0:
            log.info("tower step %d/%d loss %.4f (%.0f s)", step + 1, steps, np.mean(losses[-log_every:]),
                     time.perf_counter() - start)
    tower.eval()
    return losses


def answer_ids(tokenizer: PreTrainedTokenizerBase, answers: list[str]) -> torch.Tensor:
    """Each one-word answer as its single token (as it follows `ASSISTANT:`)."""
    ids = [tokenizer(" " + a, add_special_tokens=False).input_ids for a in answers]
    ids = [i[1:] if len(i) > 1 and tokenizer.convert_ids_to_tokens(i[0]) == "▁" else i for i in ids]
    bad = [a for a, i in zip(answers, ids, strict=True) if len(i) != 1]
    if bad:
        raise ValueError(f"answers must be single tokens of the tokenizer, got {bad}")
    return torch.tensor([i[0] for i in ids])


@dataclass(frozen=True)
class Compression:
    """Which visual tokens the LLM reads while training or tuning (`visionzip.video_llava.frame_features`)."""

    method: str = "none"
    dominant: int = 14
    contextual: int = 3


FULL = Compression()


@dataclass(frozen=True)
class TokenSubsets:
    """Training-time augmentation: the LLM reads a subset of each frame's patch tokens.

    A small LLM trained on full frames only learns to find an object by where its token sits in the
    sequence (token 37 of a frame is always the same place), and any token reduction then breaks it. A
    7B LLM does not behave that way; showing this one random subsets (CLS always kept, patches in raster
    order) makes it read what a token shows and where (the tower encodes row and column in each patch),
    not its index. The subsets are drawn uniformly, blind to content, so they favour no selection rule:
    `random` selection is exactly this distribution, VisionZip is not. `full` of the steps see every
    token; otherwise each frame keeps its own k patches, k log-uniform in [1, all] (uneven, as temporal
    merging gives; one k per frame index, shared by the step's clips so that they batch).

    The curriculum's first phases (see `main`) rank by content instead: with `objects`, each frame's
    patches an object covers (ground truth, as the tower's patch targets define them) come before the
    others, which follow in random order; each frame keeps `patches` patches or, without it, every
    object patch plus k others, k log-uniform in [0, all]. Short sequences in which the LLM learns to
    find the question's object by what its patches show, then more and more background to ignore.
    """

    full: float = 0.25
    objects: bool = False
    patches: int | None = None


def token_subsets(features: torch.Tensor, clips: int, augment: TokenSubsets, generator: torch.Generator,
                  objects: torch.Tensor | None = None) -> torch.Tensor:
    """[clips * T, N, D] per-frame tokens -> [clips, M, D]: every token, or CLS + a subset of patches per
    frame (see `TokenSubsets`), frames in order. `objects` [clips * T, N - 1] bool: the patches an object
    covers, needed by `augment.objects`."""
    index = subset_index(features.shape[0], features.shape[1], clips, augment, generator, objects)
    return tokens_at(features, clips, index)


def tokens_at(features: torch.Tensor, clips: int, index: torch.Tensor) -> torch.Tensor:
    """[clips * T, N, D] per-frame tokens -> [clips, M, D]: each clip's tokens at `index` [clips, M]
    (positions in its T * N tokens, as `subset_index` gives them)."""
    dim = features.shape[-1]
    return features.reshape(clips, -1, dim).gather(1, index[..., None].expand(-1, -1, dim))


def subset_index(frames: int, n: int, clips: int, augment: TokenSubsets | None,
                 generator: torch.Generator | None, objects: torch.Tensor | None = None) -> torch.Tensor:
    """`token_subsets`' choice [clips, M]: positions in each clip's T * N tokens (frame t's token j is
    t * N + j); every token without `augment`."""
    per_clip = frames // clips
    if augment is None or torch.rand((), generator=generator) < augment.full:
        return torch.arange(per_clip * n).expand(clips, -1)
    patches = n - 1
    if augment.objects and objects is None:
        raise ValueError("TokenSubsets(objects=True) needs the object patch mask")
    if augment.patches is not None:
        keep = torch.full((per_clip,), min(augment.patches, patches))
    elif augment.objects:
        extra = torch.exp(torch.rand(per_clip, generator=generator) * np.log(patches + 1)).floor().long() - 1
        most = objects.reshape(clips, per_clip, patches).sum(-1).amax(0)  # per frame index
        keep = (most + extra).clamp(1, patches)
    else:
        keep = torch.exp(torch.rand(per_clip, generator=generator) * np.log(patches)).round().long()
        keep = keep.clamp(1, patches)
    score = torch.rand(frames, patches, generator=generator)
    if augment.objects:
        score = score - 2 * objects  # objects first, then random background
    order = score.argsort(dim=1) + 1
    parts = []
    for t in range(per_clip):
        index = order[t::per_clip, : keep[t]].sort(dim=1).values
        parts += [torch.zeros(clips, 1, dtype=torch.long) + t * n, index + t * n]
    return torch.cat(parts, dim=1)


class MotionProbe(nn.Module):
    """Training-only readout of the LLM's hidden state at visual tokens: which way the object that a
    patch shows moves (`patch_direction`), from patches in the second half of the clip.

    The answer loss alone never taught the small LLM direction (it stayed at chance even trained on
    direction alone): the answer needs a circuit that compares an object's place across frames, and
    nothing rewards its parts before it works. This dense loss rewards them where they can form: a
    later frame's object patch attends (causally) to the same object's earlier patches and tells how
    its row and column changed. The question then reads it from the object's patches, as it reads the
    shape. It is dropped from the saved model. Measured: on in the first curriculum phase too, it kept
    the LLM from learning to find the question's object (color and shape near 70%, about whichever
    object), so `main` turns it on from the second phase.
    """

    def __init__(self, width: int, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(width, len(DIRECTIONS))

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden [B, M, W] at the visual tokens, labels [B, M] (0 = no target, else 1 + direction)."""
        return F.cross_entropy(self.head(hidden).flatten(0, 1), labels.flatten() - 1, ignore_index=-1)


def motion_labels(patch_direction: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[clips, M] `MotionProbe` targets of the tokens `index` chose (`subset_index`): 1 + direction of
    the object a patch shows in frames T/2.., else 0 (CLS, background, early frames).
    `patch_direction` [clips * T, P]: `frame_label_batch`'s."""
    clips = len(index)
    direction = patch_direction.reshape(clips, NUM_FRAMES, -1)
    late = torch.arange(NUM_FRAMES)[:, None] >= NUM_FRAMES // 2
    per_token = torch.cat([torch.zeros(clips, NUM_FRAMES, 1, dtype=torch.long),
                           direction * late], dim=2).flatten(1)  # fmt: skip
    return per_token.gather(1, index)


def visual_features(model: VideoLlavaForConditionalGeneration, samples: list[TrainingSample],
                    compression: Compression = FULL) -> torch.Tensor:
    """Per-frame tokens before the projector [B * T, K, D], without gradients (the tower is frozen after
    phase 1): the selection layer's (blocks after it skipped) for `none`, else the compressed ones."""
    with torch.no_grad():
        pixels = pixels_of(samples)
        if compression.method == "none":
            return selection_features(model, pixels)
        return frame_features(model, pixels, compression.method, compression.dominant, compression.contextual)


def shared_prefix_logits(model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                         samples: list[TrainingSample], targets: torch.Tensor,
                         augment: TokenSubsets | None = None, generator: torch.Generator | None = None,
                         motion: MotionProbe | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, motion loss): logits [B * Q, 2, vocab] for every question of every clip, at the prompt's
    last token (predicts the answer) and at the answer token (predicts EOS); `targets` [B * Q] are the
    answer tokens. The motion loss is `motion`'s on the LLM's visual tokens, None without it.

    Every prompt of a clip starts with the same tokens (`USER: <video>\n`), so the LLM reads that long
    prefix (the visual tokens) once per clip and each question continues from its key/value cache: the
    same numbers as one prompt at a time (causal attention), Q times cheaper. The tower runs without
    gradients (frozen in phase 2); the projector and the LLM with them. `augment` (with its `generator`)
    shows the LLM random token subsets, see `TokenSubsets`.
    """
    features = visual_features(model, samples)
    frames, n, _ = features.shape
    needs_labels = motion is not None or (augment is not None and augment.objects)
    labels = frame_label_batch(samples) if needs_labels else None
    objects = labels["patch_color"] > 0 if augment is not None and augment.objects else None
    index = subset_index(frames, n, len(samples), augment, generator, objects)
    visual = project(model, tokens_at(features, len(samples), index))  # [B, M, H]
    texts = [PROMPT.format(question=q.question) for s in samples for q in s.questions]
    ids = [tokenizer(t).input_ids for t in texts]
    common = next(i for i in range(min(map(len, ids))) if len({row[i] for row in ids}) > 1)
    at = ids[0].index(model.config.video_token_id)
    if at >= common:
        raise ValueError("the prompts must share the tokens up to and including the video placeholder")
    embed = model.get_input_embeddings()
    head = torch.tensor(ids[0][:common])
    prefix = torch.cat([embed(head[:at]).expand(len(samples), -1, -1), visual,
                        embed(head[at + 1 :]).expand(len(samples), -1, -1)], 1)  # fmt: skip
    lm = model.model.language_model
    out = lm(inputs_embeds=prefix, use_cache=True, output_hidden_states=motion is not None)
    motion_loss = None
    if motion is not None:
        hidden = out.hidden_states[motion.layer][:, at : at + visual.shape[1]]
        motion_loss = motion.loss(hidden, motion_labels(labels["patch_direction"], index))
    cache = out.cache
    per_clip = len(ids) // len(samples)
    cache.batch_repeat_interleave(per_clip)
    tails = [row[common:] + [int(t)] for row, t in zip(ids, targets, strict=True)]
    width = max(map(len, tails))
    tail_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in tails])
    mask = torch.ones(len(tails), prefix.shape[1] + width, dtype=torch.long)
    for row, tail in enumerate(tails):
        mask[row, prefix.shape[1] + len(tail) :] = 0
    positions = prefix.shape[1] + torch.arange(width).expand(len(tails), -1)
    hidden = lm(inputs_embeds=embed(tail_ids), attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True).last_hidden_state  # fmt: skip
    last = torch.tensor([len(tail) - 2 for tail in tails])  # the prompt's last token
    rows = torch.arange(len(tails))[:, None]
    return model.lm_head(hidden[rows, torch.stack([last, last + 1], 1)]), motion_loss


def train_lm(model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, steps: int,
             clips: int = 8, lr: float = 1e-3, seed: int = 1, log_every: int = 25,
             eval_every: int = 0, eval_samples: list[TrainingSample] | None = None,
             save_to: str | Path | None = None, augment: TokenSubsets | None = None,
             per_type: int = 1, motion_weight: float = 0.0, motion_layer: int = 2) -> list[float]:
    """Phase 2 (see module doc): answer token + EOS loss, tower frozen, `clips` clips (x `per_type`
    questions of each of the 5 types) per step. Every `eval_every` steps: accuracy on `eval_samples`
    logged, checkpoint saved to `save_to`. `augment`: token subsets (`TokenSubsets`) instead of all
    tokens. `motion_weight`: of a `MotionProbe` loss on the output of LLM block `motion_layer` (0 = off).
    Returns the step losses (answer + EOS only).
    (Projector-only tuning on compressed tokens is `pipeline=tune`, `pipelines.tune`.)"""
    model.model.video_tower.requires_grad_(False)
    torch.manual_seed(seed)
    motion = MotionProbe(model.config.text_config.hidden_size, motion_layer) if motion_weight else None
    params = [p for p in model.parameters() if p.requires_grad] + ([*motion.parameters()] if motion else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    model.train()
    losses, motion_losses = [], []
    start = time.perf_counter()
    samples = training_samples(seed, per_type=per_type)
    for step, batch in zip(range(steps), _batches(samples, clips), strict=False):
        target = answer_ids(tokenizer, [q.answer for s in batch for q in s.questions])
        logits, motion_loss = shared_prefix_logits(model, tokenizer, batch, target, augment, generator,
                                                   motion)
        labels = torch.stack([target, torch.full_like(target, eos)], 1)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        losses.append(loss.item())
        if motion_loss is not None:
            motion_losses.append(motion_loss.item())
            loss = loss + motion_weight * motion_loss
        _optimizer_step(opt, params, loss, _lr(step, steps, lr))
        if log_every and (step + 1) % log_every == 0:
            log.info("lm step %d/%d loss %.4f%s (%.0f s)", step + 1, steps, np.mean(losses[-log_every:]),
                     f" motion {np.mean(motion_losses[-log_every:]):.4f}" if motion else "",
                     time.perf_counter() - start)  # fmt: skip
        if eval_every and eval_samples and (step + 1) % eval_every == 0:
            accuracy = quick_accuracy(model, tokenizer, eval_samples)
            log.info("lm step %d accuracy %s", step + 1, json.dumps(accuracy))
            if save_to is not None:
                save_checkpoint(model, tokenizer, save_to)
            model.train()
    model.eval()
    return losses


@torch.no_grad()
def quick_accuracy(model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                   samples: list[TrainingSample], clips: int = 8, compression: Compression = FULL
                   ) -> dict[str, float]:
    """First-token greedy accuracy per question type on in-memory clips, through the answer stage's own
    prompt building (`AnswerStage.build_inputs`, left-padded batches): a training-time signal; the real
    measurement decodes mp4 files through the pipeline and scores with `pipelines.evaluate`."""
    model.eval()
    answer = AnswerStage(model, tokenizer, max_new_tokens=1)
    hits: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
    for i in range(0, len(samples), clips):
        chunk = samples[i : i + clips]
        visual = project(model, visual_features(model, chunk, compression)).unflatten(0, (len(chunk), -1))
        questions = [q for s in chunk for q in s.questions]
        embeds = [v.flatten(0, 1) for v, s in zip(visual, chunk, strict=True) for _ in s.questions]
        inputs = answer.build_inputs(embeds, [q.question for q in questions])
        predicted = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1)
        target = answer_ids(tokenizer, [q.answer for q in questions])
        for q, ok in zip(questions, (predicted == target).tolist(), strict=True):
            hits[q.type].append(ok)
    acc = {t: float(np.mean(v)) for t, v in hits.items() if v}
    acc["overall"] = float(np.mean([ok for v in hits.values() for ok in v]))
    return acc


def save_checkpoint(model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                    folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Model (safetensors, `dtype`), tokenizer and a 112 px image processor config: a folder
    `stages.model.load_video_llava` loads like any checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # a converted copy of the weights: the model being trained keeps its float32 weights
    model.save_pretrained(folder, state_dict={k: v.to(dtype) for k, v in model.state_dict().items()})
    tokenizer.save_pretrained(folder)
    VideoLlavaImageProcessor(
        size={"shortest_edge": FRAME_SIZE}, crop_size={"height": FRAME_SIZE, "width": FRAME_SIZE}
    ).save_pretrained(folder)
    return folder


FIXED_SET = (2_000_000, 10)  # (seed, clips): the in-memory set whose accuracy a checkpoint records


def fixed_set_accuracy(folder: str | Path, seed: int = FIXED_SET[0], clips: int = FIXED_SET[1],
                       compression: Compression = FULL, projector_path: str | Path | None = None) -> dict:
    """Load a checkpoint (with a tuned projector, if given) and answer `clips` in-memory clips x 5
    questions through the encode and answer stages (greedy), scored by `pipelines.evaluate`: what the
    shipped model records in its `metrics.json` (full tokens) and its test checks."""
    from pipelines.evaluate import evaluate
    from stages.encode import EncodeStage
    from stages.model import load_video_llava

    model, tokenizer = load_video_llava(folder, dtype="float32", device="cpu")
    samples = [synth_sample(seed, i) for i in range(clips)]
    encode = EncodeStage(model, compression=compression.method, dominant=compression.dominant,
                         contextual=compression.contextual, projector_path=projector_path)  # fmt: skip
    encoded = encode.encode([s.clip.frames for s in samples])
    answerer = AnswerStage(model, tokenizer, max_new_tokens=3)
    rows = []
    for i, (sample, video) in enumerate(zip(samples, encoded, strict=True)):
        questions = [q.question for q in sample.questions]
        replies = answerer.answer([video.embeds] * len(questions), questions)
        rows += [{"id": f"{i:05d}-{q.type}", "prediction": r.text, "answer": q.answer}
                 for q, r in zip(sample.questions, replies, strict=True)]  # fmt: skip
    return evaluate(rows)


def write_metrics(folder: str | Path) -> dict:
    """`metrics.json` in the checkpoint folder: the fixed set's definition and accuracy."""
    result = fixed_set_accuracy(folder)
    metrics = {"fixed_set": {"seed": FIXED_SET[0], "clips": FIXED_SET[1], "compression": "none",
                             "correct": result["overall"]["correct"], "n": result["overall"]["n"],
                             "per_type_correct": {t: g["correct"] for t, g in result["types"].items()}}}
    (Path(folder) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the synthetic-QA Video-LLaVA (see module doc).")
    parser.add_argument("--out", default="models/synth", help="checkpoint folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tower-steps", type=int, default=2500)
    parser.add_argument("--tower-clips", type=int, default=8, help="clips (x 8 frames) per tower step")
    parser.add_argument("--tower-lr", type=float, default=2e-3)
    parser.add_argument("--lm-steps", type=int, default=1200)
    parser.add_argument("--lm-clips", type=int, default=8,
                        help="clips (x 5 x --questions-per-type questions) per LM step")
    parser.add_argument("--lm-lr", type=float, default=1e-3)
    parser.add_argument("--cls-targets", nargs="+", default=list(SHIPPED_CLS_TARGETS), choices=CLS_TARGETS,
                        help="what the tower's CLS predicts (TowerHeads); by default the answers live in "
                             "the patches alone")
    parser.add_argument("--attention-weight", type=float, default=0.0,
                        help="weight of a loss that teaches the tower's CLS to attend to the objects "
                             "(cls_attention_loss): VisionZip's premise, made to hold")
    parser.add_argument("--object-steps", type=int, default=0,
                        help="first train the LLM on the object patches alone, --object-patches a frame")
    parser.add_argument("--object-patches", type=int, default=2)
    parser.add_argument("--background-steps", type=int, default=0,
                        help="then on every object patch plus a random number of background patches")
    parser.add_argument("--motion-weight", type=float, default=0.0,
                        help="weight of a training-only loss that teaches the LLM's visual tokens which way "
                             "their object moves (MotionProbe), in --motion-phases")
    parser.add_argument("--motion-phases", nargs="+", default=["background", "lm"],
                        choices=["objects", "background", "lm"], help="the LLM phases with that loss")
    parser.add_argument("--questions-per-type", type=int, default=1, help="questions of each type per clip")
    parser.add_argument("--full-fraction", type=float, default=None,
                        help="last, train the LLM on random token subsets, all tokens in this fraction of "
                             "the steps (see TokenSubsets); default: all tokens always")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tower-out", default=".cache/synth-tower", help="where phase 1's model goes")
    parser.add_argument("--tower-from", default=None, help="skip phase 1: load the tower of this checkpoint")
    parser.add_argument("--score", default=None, help="only (re)write metrics.json of this checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.score:
        log.info("fixed-set metrics %s", json.dumps(write_metrics(args.score)))
        return
    model, tokenizer = new_model(args.seed)
    eval_samples = [synth_sample(args.seed + 999_999, i) for i in range(40)]
    if args.tower_from:
        trained = VideoLlavaForConditionalGeneration.from_pretrained(args.tower_from, dtype=torch.float32)
        model.model.video_tower.load_state_dict(trained.model.video_tower.state_dict())
    else:
        pretrain_tower(model, args.tower_steps, args.tower_clips, args.tower_lr, seed=args.seed,
                       cls_targets=tuple(args.cls_targets), attention_weight=args.attention_weight)
        save_checkpoint(model, tokenizer, args.tower_out, torch.float32)
    objects_only = TokenSubsets(0.0, objects=True, patches=args.object_patches)
    curriculum = [("objects", args.object_steps, args.seed + 2, objects_only),
                  ("background", args.background_steps, args.seed + 3, TokenSubsets(0.0, objects=True)),
                  ("lm", args.lm_steps, args.seed + 1,
                   None if args.full_fraction is None else TokenSubsets(args.full_fraction))]  # fmt: skip
    for phase, steps, seed, augment in curriculum:
        if steps:
            motion_weight = args.motion_weight if phase in args.motion_phases else 0.0
            train_lm(model, tokenizer, steps, args.lm_clips, args.lm_lr, seed=seed,
                     eval_every=args.eval_every, eval_samples=eval_samples, save_to=args.out,
                     augment=augment, per_type=args.questions_per_type,
                     motion_weight=motion_weight)  # fmt: skip
    log.info("final in-memory accuracy %s", json.dumps(quick_accuracy(model, tokenizer, eval_samples)))
    save_checkpoint(model, tokenizer, args.out)
    log.info("fixed-set metrics %s", json.dumps(write_metrics(args.out)))


if __name__ == "__main__":
    main()
