"""Where each kept visual token stands among all of a clip's tokens (`compression.positions=original`).

Compression renumbers the tokens it keeps 0..M-1 in the LLM's sequence. A Video-LLaVA trained on full
sequences reads where and when a token is from its position id, so the `original` rule gives each kept token
the offset it would have if every token of every frame were present: token t of frame f (CLS = 0, patch p =
1 + p) stands at f * tokens_per_frame + t, and the text after the video continues at frames *
tokens_per_frame (the clip's full span). Tokens that stand for several:
- VisionZip's contextual token: at the rounded mean (half up) of the offsets of the tokens merged into it
  (its cluster's centre: where its content comes from; its frame's last patch scored the same on val500,
  see docs/quality.md);
- a pooled cell (`pool` control): at the rounded mean offset of the patches it averages;
- a group of temporal merging: at its first member's place, the token that stays (the earliest; the
  tokens folded into it are gone from the sequence).
A cluster's centre can sit before a dominant token of its frame, so `position_order` gives the order in
which the tokens go into the sequence (by offset; ties keep their order).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .baselines import pool_grid
from .zip import ZipResult


def zip_offsets(zipped: ZipResult) -> torch.Tensor:
    """[B, K] offset of each VisionZip token within its frame (K = dominant + contextual, in the order of
    `zipped.tokens`): a dominant token's own index, a contextual token its cluster's rounded mean index."""
    contextual = zipped.contextual_size.shape[1]
    if contextual == 0:
        return zipped.dominant_index
    n = zipped.contextual_assignment.shape[1]
    members = F.one_hot(zipped.contextual_assignment + 1, contextual + 1)[..., 1:].double()  # [B, N, C]
    index = torch.arange(n, dtype=torch.float64, device=members.device)
    centre = (members * index[:, None]).sum(dim=1) / members.sum(dim=1)
    return torch.cat([zipped.dominant_index, (centre + 0.5).floor().long()], dim=1)


def pool_offsets(tokens_per_frame: int, keep: int) -> torch.Tensor:
    """[keep] offset within a frame of each token `visionzip.baselines.pool_tokens` keeps: 0 for CLS, then
    each cell's rounded mean patch offset (adaptive pooling's windows), raster order."""
    side = math.isqrt(tokens_per_frame - 1)
    if keep == 1:
        return torch.zeros(1, dtype=torch.long)
    rows, cols = pool_grid(keep - 1, side)

    def centres(cells: int) -> torch.Tensor:  # mean patch index of each adaptive window along one axis
        i = torch.arange(cells, dtype=torch.float64)
        return ((i * side / cells).floor() + ((i + 1) * side / cells).ceil() - 1) / 2

    mean = 1 + centres(rows)[:, None] * side + centres(cols)[None, :]
    return torch.cat([torch.zeros(1, dtype=torch.long), (mean.flatten() + 0.5).floor().long()])


def clip_positions(offsets: torch.Tensor, tokens_per_frame: int, first: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """[M] position of each token of a clip among all its tokens: offsets [T, K] within each frame ->
    f * tokens_per_frame + offset, frame-major; `first` [M] (temporal merging's `MergeResult.first`, flat
    index f * K + k of each kept group's first member) keeps those tokens only."""
    if offsets.dim() != 2:
        raise ValueError(f"offsets must be [T, K], got shape {tuple(offsets.shape)}")
    frame = torch.arange(len(offsets), device=offsets.device)[:, None]
    positions = (frame * tokens_per_frame + offsets).flatten()
    return positions if first is None else positions[first]


def position_order(positions: torch.Tensor) -> torch.Tensor:
    """The order [M] that puts a clip's tokens by non-decreasing position (stable: ties keep theirs)."""
    return positions.argsort(stable=True)
