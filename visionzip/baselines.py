"""Token-reduction baselines for VisionZip at equal token counts (pure torch).

A retention table means little without controls that keep the same number of tokens by other rules:
- `random_tokens`: CLS plus patches drawn at random (seeded), in raster order: what selection adds over
  chance.
- `pool_tokens`: CLS plus a uniform average pooling of the patch grid: what a content-blind spatial
  summary keeps (the usual "just downsample" answer).
VisionZip with `contextual=0` (dominant tokens only) is the third control and needs no code here.
Both take the selection layer's features [B, N, D] (token 0 = CLS, then a square patch grid in raster
order) and return [B, keep, D] with CLS first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _check(features: torch.Tensor, keep: int) -> None:
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got shape {tuple(features.shape)}")
    if not 1 <= keep <= features.shape[1]:
        raise ValueError(f"keep must be in 1..{features.shape[1]} (the tokens of a frame), got {keep}")


def random_patch_index(batch: int, n: int, keep: int, seed: int | Sequence[int] = 0,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """[batch, keep] ascending positions: 0 (CLS) and `keep - 1` distinct patches per row. One `seed`
    draws the whole batch from one generator (same batch, same draw); a seed per row draws each row
    from its own, so a frame's patches do not depend on which batch, or which slot, it came in."""
    if isinstance(seed, int):
        scores = torch.rand(batch, n - 1, generator=torch.Generator().manual_seed(seed))
    else:
        if len(seed) != batch:
            raise ValueError(f"got {len(seed)} seeds for {batch} frames")
        scores = torch.stack([torch.rand(n - 1, generator=torch.Generator().manual_seed(int(row_seed)))
                              for row_seed in seed])
    patches = scores.argsort(dim=1)[:, : keep - 1] + 1
    index = torch.cat([torch.zeros(batch, 1, dtype=torch.long), patches], dim=1)
    return index.sort(dim=1).values.to(device)


def random_tokens(features: torch.Tensor, keep: int, seed: int | Sequence[int] = 0) -> torch.Tensor:
    """CLS + `keep - 1` random patches per frame, in raster order: [B, keep, D] (`seed` as in
    `random_patch_index`)."""
    _check(features, keep)
    batch, n, _ = features.shape
    index = random_patch_index(batch, n, keep, seed, features.device)
    return features[torch.arange(batch, device=features.device)[:, None], index]


def pool_grid(count: int, side: int) -> tuple[int, int]:
    """The pooled grid (rows, cols) with rows * cols == count, as square as possible (rows <= cols), for
    a side x side patch grid. Square counts (4, 9, 16, ...) pool to square grids; others to rectangles
    (13 -> 1 x 13 strips); a count whose grid does not fit the patch grid is an error."""
    if count < 1:
        raise ValueError(f"pooling needs at least 1 patch token, got {count}")
    rows = max(r for r in range(1, math.isqrt(count) + 1) if count % r == 0)
    cols = count // rows
    if cols > side:
        raise ValueError(
            f"{count} pooled tokens need a {rows} x {cols} grid, wider than the {side} x {side} patch grid; "
            "choose a count with a factor pair within the grid (e.g. a square)"
        )
    return rows, cols


def pool_tokens(features: torch.Tensor, keep: int) -> torch.Tensor:
    """CLS + the patch grid average-pooled (adaptive windows) to `keep - 1` tokens, raster order."""
    _check(features, keep)
    batch, n, dim = features.shape
    side = math.isqrt(n - 1)
    if side * side != n - 1:
        raise ValueError(f"features must be CLS + a square patch grid, got {n - 1} patches")
    if keep == 1:
        return features[:, :1]
    rows, cols = pool_grid(keep - 1, side)
    grid = features[:, 1:].transpose(1, 2).reshape(batch, dim, side, side)
    pooled = F.adaptive_avg_pool2d(grid, (rows, cols)).flatten(2).transpose(1, 2)
    return torch.cat([features[:, :1], pooled], dim=1)
