"""Temporal merging: fold tokens that repeat across adjacent frames into one token.

VisionZip compresses each frame on its own; a static region still costs tokens in every frame. Here a
token of frame t that (almost) repeats a token of frame t-1 joins that token's group, so a region that
stays put over many frames becomes one token whose `size` says how many it stands for.

Which token of frame t-1 a token may fold into is the `match` rule:
- `any`: its most similar token anywhere in frame t-1. A moving object's patch then folds into the same
  object's patch at its old place, and the motion is gone (what this module did first; kept exact).
- `same`: only the token of frame t-1 at the same patch position (`positions`), so what stays put folds
  and what moves (its patch changes) stays. `radius`: any token of frame t-1 within `radius` patches
  (Chebyshev distance on the patch grid, so a (2r + 1) x (2r + 1) window; `radius=0` is `same`).
- `prune`: the static-patch pruning of vLLM's efficient video sampling (EVS, arXiv 2510.14624) with a
  threshold: the same decisions as `same`, but a repeating token is dropped rather than averaged into
  the token it repeats (that token keeps its own features). At one threshold `same` and `prune` keep
  exactly the same number of tokens: prune is merging's control at equal counts.
In the position modes a token without a position (CLS, VisionZip's contextual tokens, pooled tokens:
position -1) never folds and is never a fold target. A token may instead carry a slot (position <= -2,
e.g. VisionZip's contextual token j as -2 - j): it folds only into the token of frame t-1 in the same slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .zip import work_dtype

MATCH_MODES: tuple[str, ...] = ("any", "same", "radius", "prune")
POSITION_MODES: tuple[str, ...] = ("same", "radius", "prune")


@dataclass
class MergeResult:
    """The tokens of a whole clip after folding, in frame-major order."""

    tokens: torch.Tensor  # [M, D]: mean of each group's original tokens (`prune`: its first member)
    frame: torch.Tensor  # [M] long: frame where the group first appears
    size: torch.Tensor  # [M] long: how many of the T*K input tokens the group stands for
    first: torch.Tensor | None = None  # [M] long: flat index t * K + k of the group's first member
    group_of: torch.Tensor | None = None  # [T, K] long: the group (row of `tokens`) each input token joined


def merge_frames(
    tokens: torch.Tensor,
    threshold: float = 0.9,
    protect_first: bool = True,
    max_tokens: int | None = None,
    *,
    match: str = "any",
    positions: torch.Tensor | None = None,
    radius: int = 1,
    grid_width: int | None = None,
) -> MergeResult:
    """Fold each token of frame t into the group of its best allowed match in frame t-1 when
    cosine >= threshold.

    tokens [T, K, D]: the (zipped) tokens of T frames in order.
    - Matching uses the original features: token (t, k) is compared with the tokens of frame t-1 that
      `match` allows (see the module doc) as they came in, and its best match (first on ties) decides. If
      folded, it joins the group its match belongs to, so chains collapse a static region across many
      frames into one group (a root token and its followers). A group's token is the mean of its members'
      original features, i.e. the size-weighted mean of everything folded into it; with `match="prune"` it
      is its root's own features (the others are dropped).
    - `positions` [T, K] integer (the position modes only; ignored by `any`): each token's patch in raster
      order of the patch grid, CLS excluded (VisionZip's `dominant_index - 1`), -1 for a token with none
      (never folds), or a slot <= -2 (folds only into the same slot).
      `radius` (patches) and `grid_width` (patches per grid row) are for `match="radius"`.
    - `protect_first`: token 0 of every frame (the CLS summary) is neither folded nor a fold target, so
      frame boundaries survive.
    - `max_tokens`: if more tokens remain after threshold folding, also fold the remaining (token, best
      match) pairs of adjacent frames in order of decreasing similarity (ties: frame-major order) until
      exactly `max_tokens` remain. Frame 0 and protected tokens cannot fold, so it must be at least
      K + (T - 1 if protect_first else 0). In the position modes a token with no allowed match never
      folds, so more than `max_tokens` can remain.
    Output: one token per group at the position of its first member, frame-major; `size` sums to T*K.
    Similarities run in at least float32; tokens come back in the input dtype.
    """
    _check_inputs(tokens, threshold, max_tokens, protect_first)
    allowed = _allowed_pairs(tokens, match, positions, radius, grid_width)
    frames, k, dim = tokens.shape
    root = torch.arange(frames * k, device=tokens.device).view(frames, k)
    if frames > 1:
        best, match_index = _best_matches(tokens, protect_first, allowed)
        fold = best >= threshold
        if max_tokens is not None:
            _fold_most_similar(fold, best, frames * k - max_tokens)
        for t in range(1, frames):
            root[t] = torch.where(fold[t - 1], root[t - 1, match_index[t - 1]], root[t])

    group, group_of = root.flatten().unique(sorted=True, return_inverse=True)
    size = torch.bincount(group_of, minlength=group.numel())
    if match == "prune":
        return MergeResult(tokens.reshape(frames * k, dim)[group], group // k, size, group,
                           group_of.view(frames, k))
    wd = work_dtype(tokens.dtype)
    sums = torch.zeros(group.numel(), dim, dtype=wd, device=tokens.device)
    sums.index_add_(0, group_of, tokens.reshape(frames * k, dim).to(wd))
    merged = (sums / size.unsqueeze(1)).to(tokens.dtype)
    return MergeResult(merged, group // k, size, group, group_of.view(frames, k))


def _allowed_pairs(
    tokens: torch.Tensor, match: str, positions: torch.Tensor | None, radius: int, grid_width: int | None
) -> torch.Tensor | None:
    """[T-1, K (frame t), K (frame t-1)] bool: which pairs `match` lets fold; None for `any` (all)."""
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {', '.join(MATCH_MODES)}, got {match!r}")
    if match == "any":
        return None
    frames, k, _ = tokens.shape
    if positions is None:
        raise ValueError(f"match={match!r} needs the tokens' positions ([T, K], -1 for none)")
    if positions.shape != (frames, k) or positions.is_floating_point() or positions.is_complex():
        raise ValueError(
            f"positions must be an integer [T={frames}, K={k}] tensor, got {positions.dtype} of shape "
            f"{tuple(positions.shape)}"
        )
    if positions.device != tokens.device:
        raise ValueError(f"positions must be on the tokens' device {tokens.device}, got {positions.device}")
    pos = positions.long()
    placed, slot = pos >= 0, pos <= -2
    same_slot = (pos[1:, :, None] == pos[:-1, None, :]) & slot[1:, :, None]
    if match == "radius":
        if not isinstance(radius, int) or radius < 0:
            raise ValueError(f"radius must be an int >= 0 (patches), got {radius!r}")
        if not isinstance(grid_width, int) or grid_width < 1:
            raise ValueError(
                f"match='radius' needs grid_width, the patches per grid row (>= 1), got {grid_width!r}"
            )
        row, col = pos.div(grid_width, rounding_mode="floor"), pos.remainder(grid_width)
        near = ((row[1:, :, None] - row[:-1, None, :]).abs() <= radius) & (
            (col[1:, :, None] - col[:-1, None, :]).abs() <= radius
        )
    else:  # same, prune
        near = pos[1:, :, None] == pos[:-1, None, :]
    return (near & placed[1:, :, None] & placed[:-1, None, :]) | same_slot


def _best_matches(
    tokens: torch.Tensor, protect_first: bool, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For frames 1..T-1: each token's best cosine with frame t-1's (allowed) tokens and its index,
    [T-1, K] each.

    Protected tokens, and pairs `allowed` rules out, get -inf (a token with no allowed pair gets -inf:
    never folded). Cosines are clamped to [-1, 1] so that rounding cannot push an identical pair above a
    threshold > 1.
    """
    unit = F.normalize(tokens.to(work_dtype(tokens.dtype)), dim=-1)
    sim = (unit[1:] @ unit[:-1].transpose(1, 2)).clamp(-1.0, 1.0)  # [T-1, K (frame t), K (frame t-1)]
    if protect_first:
        sim[:, :, 0] = -math.inf
        sim[:, 0, :] = -math.inf
    if allowed is not None:
        sim.masked_fill_(~allowed, -math.inf)
    match = sim.argmax(dim=2)  # first index on ties
    return sim.gather(2, match.unsqueeze(2)).squeeze(2), match


def _fold_most_similar(fold: torch.Tensor, best: torch.Tensor, folds_needed: int) -> None:
    """Mark further (not yet folded, foldable) tokens as folded, most similar first, in place. A token
    without any allowed match (-inf) is never marked."""
    extra = folds_needed - int(fold.sum())
    if extra <= 0:
        return
    score = best.masked_fill(fold, -math.inf).flatten()
    order = score.sort(descending=True, stable=True).indices[:extra]
    order = order[score[order] > -math.inf]
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
