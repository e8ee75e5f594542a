"""Temporal merging: fold tokens that repeat across adjacent frames into one token.

VisionZip compresses each frame on its own; a static region still costs tokens in every frame. Here a
token of frame t that (almost) repeats a token of frame t-1 joins that token's group, so a region that
stays put over many frames becomes one token whose `size` says how many it stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .zip import work_dtype


@dataclass
class MergeResult:
    """The tokens of a whole clip after folding, in frame-major order."""

    tokens: torch.Tensor  # [M, D]: mean of each group's original tokens
    frame: torch.Tensor  # [M] long: frame where the group first appears
    size: torch.Tensor  # [M] long: how many of the T*K input tokens the group stands for


def merge_frames(
    tokens: torch.Tensor,
    threshold: float = 0.9,
    protect_first: bool = True,
    max_tokens: int | None = None,
) -> MergeResult:
    """Fold each token of frame t into the group of its best match in frame t-1 when cosine >= threshold.

    tokens [T, K, D]: the (zipped) tokens of T frames in order.
    - Matching uses the original features: token (t, k) is compared with every token of frame t-1 as it
      came in, and its best match (first on ties) decides. If folded, it joins the group its match
      belongs to, so chains collapse a static region across many frames into one group (a root token and
      its followers). A group's token is the mean of its members' original features, i.e. the
      size-weighted mean of everything folded into it.
    - `protect_first`: token 0 of every frame (the CLS summary) is neither folded nor a fold target, so
      frame boundaries survive.
    - `max_tokens`: if more tokens remain after threshold folding, also fold the remaining (token, best
      match) pairs of adjacent frames in order of decreasing similarity (ties: frame-major order) until
      exactly `max_tokens` remain. Frame 0 and protected tokens cannot fold, so it must be at least
      K + (T - 1 if protect_first else 0).
    Output: one token per group at the position of its first member, frame-major; `size` sums to T*K.
    Similarities run in at least float32; tokens come back in the input dtype.
    """
    _check_inputs(tokens, threshold, max_tokens, protect_first)
    frames, k, dim = tokens.shape
    root = torch.arange(frames * k, device=tokens.device).view(frames, k)
    if frames > 1:
        best, match = _best_matches(tokens, protect_first)
        fold = best >= threshold
        if max_tokens is not None:
            _fold_most_similar(fold, best, frames * k - max_tokens)
        for t in range(1, frames):
            root[t] = torch.where(fold[t - 1], root[t - 1, match[t - 1]], root[t])

    group, group_of = root.flatten().unique(sorted=True, return_inverse=True)
    size = torch.bincount(group_of, minlength=group.numel())
    wd = work_dtype(tokens.dtype)
    sums = torch.zeros(group.numel(), dim, dtype=wd, device=tokens.device)
    sums.index_add_(0, group_of, tokens.reshape(frames * k, dim).to(wd))
    merged = (sums / size.unsqueeze(1)).to(tokens.dtype)
    return MergeResult(merged, group // k, size)


def _best_matches(tokens: torch.Tensor, protect_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For frames 1..T-1: each token's best cosine with frame t-1's tokens and its index, [T-1, K] each.

    Protected tokens get -inf (never folded, never a target). Cosines are clamped to [-1, 1] so that
    rounding cannot push an identical pair above a threshold > 1.
    """
    unit = F.normalize(tokens.to(work_dtype(tokens.dtype)), dim=-1)
    sim = (unit[1:] @ unit[:-1].transpose(1, 2)).clamp(-1.0, 1.0)  # [T-1, K (frame t), K (frame t-1)]
    if protect_first:
        sim[:, :, 0] = -math.inf
        sim[:, 0, :] = -math.inf
    match = sim.argmax(dim=2)  # first index on ties
    return sim.gather(2, match.unsqueeze(2)).squeeze(2), match


def _fold_most_similar(fold: torch.Tensor, best: torch.Tensor, folds_needed: int) -> None:
    """Mark further (not yet folded, foldable) tokens as folded, most similar first, in place."""
    extra = folds_needed - int(fold.sum())
    if extra <= 0:
        return
    score = best.masked_fill(fold, -math.inf).flatten()
    order = score.sort(descending=True, stable=True).indices[:extra]
    fold.view(-1)[order] = True


def _check_inputs(
    tokens: torch.Tensor, threshold: float, max_tokens: int | None, protect_first: bool
) -> None:
    if tokens.dim() != 3 or 0 in tokens.shape:
        raise ValueError(f"tokens must be a non-empty [T, K, D] tensor, got shape {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise ValueError(f"tokens must be a floating tensor, got {tokens.dtype}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    if max_tokens is not None:
        frames, k, _ = tokens.shape
        floor = k + (frames - 1 if protect_first else 0)
        if max_tokens < floor:
            raise ValueError(
                f"max_tokens={max_tokens} is below the {floor} tokens that cannot fold for T={frames} "
                f"frames of K={k} tokens (all of frame 0"
                + (f" plus the protected first token of the other {frames - 1})" if protect_first else ")")
            )
