"""VisionZip token selection as one pure tensor function (official semantics, batched).

VisionZip (Yang et al., CVPR 2025) keeps the tokens the CLS query attends to most ("dominant") and folds
the rest into a few "contextual" tokens by key similarity. This module reproduces the official
implementation exactly; `visionzip.clip` obtains its inputs cheaply from a CLIP tower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ZipResult:
    """What VisionZip keeps of each of B frames."""

    tokens: torch.Tensor  # [B, dominant + contextual, D]: dominant tokens, then contextual tokens
    dominant_index: torch.Tensor  # [B, dominant] long, ascending positions in 0..N-1 (CLS = 0 first)
    contextual_size: torch.Tensor  # [B, contextual] long, tokens each contextual token stands for
    # [B, N] long: for each input token, the contextual token (0..contextual-1) it was merged into; -1 for
    # the dominant tokens (kept as they are). For pictures of what is kept (`visionzip.vis`).
    contextual_assignment: torch.Tensor


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: rankings and similarities in bf16/fp16 flip on near ties; float64 stays."""
    return torch.promote_types(dtype, torch.float32)


def zip_tokens(
    features: torch.Tensor,
    cls_attn: torch.Tensor,
    metric: torch.Tensor,
    dominant: int = 14,
    contextual: int = 3,
) -> ZipResult:
    """Select `dominant` tokens (CLS included) and merge the rest into `contextual` tokens.

    features [B, N, D]: hidden states of the selection layer, token 0 = CLS.
    cls_attn [B, H, N]: attention probabilities of the CLS query at that layer, per head.
    metric   [B, N, d]: keys of that layer averaged over heads.

    Rules (official VisionZip): CLS plus the top `dominant - 1` patches by CLS attention summed over heads,
    in raster order; the remaining R tokens (raster order) get targets at positions 0, step, 2*step, ...
    (`step = max(1, R // contextual)`, first `contextual`); every other remaining token joins its most
    cosine-similar target (first on ties); a contextual token = target + mean of its members.
    Ranking and similarity run in at least float32; the tokens come back in `features.dtype`.
    """
    _check_inputs(features, cls_attn, metric, dominant, contextual)
    batch, n, dim = features.shape
    wd = work_dtype(features.dtype)
    rows = torch.arange(batch, device=features.device).unsqueeze(1)

    score = cls_attn[:, :, 1:].to(wd).sum(dim=1)  # [B, N-1]; CLS attending to itself is not ranked
    top = score.topk(dominant - 1, dim=1).indices + 1
    cls = torch.zeros(batch, 1, dtype=top.dtype, device=top.device)
    dominant_index = torch.cat([cls, top], dim=1).sort(dim=1).values
    kept = features[rows, dominant_index]
    assignment = torch.full((batch, n), -1, dtype=torch.long, device=features.device)
    if contextual == 0:
        return ZipResult(kept, dominant_index, dominant_index.new_zeros(batch, 0), assignment)

    rest = torch.ones(batch, n, dtype=torch.bool, device=features.device)
    rest[rows, dominant_index] = False
    rest_index = rest.nonzero()[:, 1].view(batch, n - dominant)  # row-major: raster order per frame
    remaining = n - dominant
    step = max(1, remaining // contextual)
    is_target = torch.zeros(remaining, dtype=torch.bool, device=features.device)
    is_target[torch.arange(0, remaining, step, device=features.device)[:contextual]] = True

    keys = F.normalize(metric[rows, rest_index].to(wd), dim=-1)
    similarity = keys[:, ~is_target] @ keys[:, is_target].transpose(1, 2)  # [B, R - C, C]
    joins = similarity.argmax(dim=2)  # [B, R - C]: each member's target; argmax: first index on ties
    assign = F.one_hot(joins, contextual).to(wd)
    members = features[rows, rest_index[:, ~is_target]].to(wd)
    count = assign.sum(dim=1).unsqueeze(-1)  # [B, C, 1]
    mean = (assign.transpose(1, 2) @ members) / count.clamp(min=1)
    merged = features[rows, rest_index[:, is_target]].to(wd) + mean
    tokens = torch.cat([kept, merged.to(features.dtype)], dim=1)
    assignment[rows, rest_index[:, is_target]] = torch.arange(contextual, device=features.device)
    assignment[rows, rest_index[:, ~is_target]] = joins
    return ZipResult(tokens, dominant_index, count.squeeze(-1).long() + 1, assignment)


def _check_inputs(
    features: torch.Tensor, cls_attn: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int
) -> None:
    for name, t in (("features", features), ("cls_attn", cls_attn), ("metric", metric)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    batch, n, _ = features.shape
    if cls_attn.shape[0] != batch or cls_attn.shape[2] != n:
        raise ValueError(
            f"cls_attn must be [B={batch}, H, N={n}] to match features {tuple(features.shape)}, "
            f"got {tuple(cls_attn.shape)}"
        )
    if metric.shape[:2] != (batch, n):
        raise ValueError(
            f"metric must be [B={batch}, N={n}, d] to match features {tuple(features.shape)}, "
            f"got {tuple(metric.shape)}"
        )
    if cls_attn.device != features.device or metric.device != features.device:
        raise ValueError(
            f"features, cls_attn and metric must share a device, got {features.device}, "
            f"{cls_attn.device} and {metric.device}"
        )
    if dominant < 1:
        raise ValueError(f"dominant must be >= 1 (it counts the CLS token), got {dominant}")
    if contextual < 0:
        raise ValueError(f"contextual must be >= 0, got {contextual}")
    if dominant + contextual > n:
        raise ValueError(
            f"dominant + contextual = {dominant} + {contextual} = {dominant + contextual} exceeds "
            f"the {n} tokens per frame"
        )
