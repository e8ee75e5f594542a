"""Phase 1 of training the synth model: the CLIP tower alone learns, from single frames, what each frame
holds.

At the selection layer (the one Video-LLaVA feeds the LLM, -2) its CLS predicts the object count, which
colours are present and each one's column (`--cls-targets`), but no shape and no row (top/bottom half):
those live only in the object patches, so token selection matters. Every patch token predicts its own
row and column and, jointly with each, the object (colour x shape) covering it: a conjunctive code, so
that the LLM can read "the red object is a circle in the top half" from the object patches without
binding separate colour and shape features; and where the object's centre is, to a frame's motion
(4 px), so that comparing frames tells its direction. With `--attention-weight`, the selection layer's
CLS attention is also taught to spread over the objects (`cls_attention_loss`).

That last loss makes VisionZip's premise hold by construction. On CLIP it is an observation: the CLS
attends to a few informative tokens. Without the loss, this tower's CLS found the objects hardly more
often than random patches do, and a CLS that also predicted shapes found them but held the answers
itself (`bench.bench_retention` measures the share of objects each rule keeps). No LLM runs in this
phase, so a step is cheap.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import VideoLlavaForConditionalGeneration

from synthqa.clips import (
    CENTER_BINS,
    COLORS,
    POSITION_BINS,
    SHAPES,
    TrainingSample,
    frame_labels,
    training_samples,
)
from synthqa.model import PATCH, pixels_of
from synthqa.optim import batches, optimizer_and_schedule, optimizer_step
from visionzip import clip_selection_layer_outputs
from visionzip.video_llava import feature_layer

log = logging.getLogger("vzpipe.train")

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
    """`frame_labels` of every clip, frames concatenated: each [B * T, ...] as `pixels_of` orders them."""
    per_clip = [frame_labels(s.clip, PATCH) for s in samples]
    return {key: torch.from_numpy(np.concatenate([f[key] for f in per_clip])) for key in per_clip[0]}


def cls_attention_loss(cls_attn: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from the target `share` [B, P] (sums to 1 per frame) to the selection layer's CLS
    attention over the patches [B, H, 1 + P], averaged over heads and renormalised without the CLS:
    exactly the distribution whose top entries VisionZip keeps (`visionzip.zip_tokens`)."""
    attention = cls_attn[:, :, 1:].mean(1)
    attention = attention / attention.sum(-1, keepdim=True)
    return -(share * attention.clamp(min=1e-12).log()).sum(-1).mean()


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
    optimizer, scheduler = optimizer_and_schedule(params, lr, steps)
    tower.train()
    losses = []
    start = time.perf_counter()
    for step, batch in zip(range(steps), batches(training_samples(seed), clips), strict=False):
        labels = frame_label_batch(batch)
        features, cls_attn, _ = clip_selection_layer_outputs(tower, pixels_of(batch), feature_layer(model))
        loss = heads.loss(features, labels)
        if attention_weight:
            loss = loss + attention_weight * cls_attention_loss(cls_attn, labels["object_share"])
        losses.append(optimizer_step(optimizer, scheduler, params, loss))
        if log_every and (step + 1) % log_every == 0:
            log.info("tower step %d/%d loss %.4f (%.0f s)", step + 1, steps, np.mean(losses[-log_every:]),
                     time.perf_counter() - start)
    tower.eval()
    return losses
