"""A picture of what VisionZip and temporal merging keep of a clip: arrays in, one RGB image out (no I/O).

The frames (as the tower saw them) stand in one row, each patch of the patch grid drawn by what became
of its token:
- outlined (`OUTLINE`): a dominant patch whose token the LLM reads: VisionZip kept it and temporal merging
  did not fold it into an earlier frame's token;
- shaded with its group's colour: every patch of a dominant token whose group (temporal merging) holds
  several tokens: the token the others fold into (outlined: the LLM reads it) and the tokens folded into
  it (not outlined: the LLM does not read them). Tokens folded into the same token share one colour;
  other groups have other colours (`group_colours`, in order of first appearance).
- tinted (lightly) with its token's colour: a patch VisionZip merged into contextual token j: the colour
  of j (`cluster_colours`), or, when temporal merging folds that token with others (contextual tokens
  fold into the previous frame's token of the same rank), the colour of their group, as above;
- dimmed: a patch no token stands for (only when there are no contextual tokens).
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

OUTLINE = (255, 255, 255)  # outline of a patch the LLM reads as its own token
GAP = (0, 0, 0)  # between frames
TINT_ALPHA = 0.25  # contextual cluster tint
SHADE_ALPHA = 0.5  # folding group shade
DIM = 0.35  # brightness left to a patch no token stands for
_GOLDEN = 0.618033988749895  # hue step: colours of consecutive groups stay far apart


def palette(count: int, *, hue: float = 0.0, saturation: float = 0.9, value: float = 1.0) -> np.ndarray:
    """`count` distinct colours, float [count, 3] in 0..255: hues stepped by the golden ratio from `hue`."""
    hues = (hue + _GOLDEN * np.arange(count)) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, saturation, value) for h in hues]).reshape(count, 3) * 255.0


def cluster_colours(contextual: int) -> np.ndarray:
    """The tint of contextual token j, float [contextual, 3]."""
    return palette(contextual, hue=0.55, saturation=0.7)


def group_colours(count: int) -> np.ndarray:
    """The shade of the n-th folding group (in order of first appearance), float [count, 3]."""
    return palette(count, hue=0.0)


def kept_tokens_picture(
    frames: np.ndarray,
    dominant_index: np.ndarray,
    contextual_assignment: np.ndarray,
    group_of: np.ndarray | None = None,
    *,
    scale: int = 1,
    line: int = 1,
    gap: int = 4,
) -> np.ndarray:
    """One row of T frames with what is kept drawn on the patch grid (see the module doc): uint8
    [H * scale, T * W * scale + (T - 1) * gap, 3].

    frames [T, H, W, 3] uint8: what the tower saw (H and W multiples of the grid side G).
    dominant_index [T, D]: VisionZip's kept token positions in 0..N-1, CLS (0) included
    (`ZipResult.dominant_index`); position p >= 1 is patch p - 1 of the G x G grid in raster order.
    contextual_assignment [T, N]: the contextual token each token was merged into, -1 for dominant ones
    (`ZipResult.contextual_assignment`).
    group_of [T, D + C]: the group each of a frame's tokens (dominant, then contextual) joined in temporal
    merging (`MergeResult.group_of`); None: no merging.
    scale: integer upscaling (nearest), so that thin outlines leave the picture visible; line: outline
    width in output pixels; gap: pixels between frames.
    """
    frames = np.asarray(frames)
    dominant_index = np.asarray(dominant_index)
    assignment = np.asarray(contextual_assignment)
    count, height, width, grid, dominant, contextual = _check(frames, dominant_index, assignment, group_of,
                                                               scale, line, gap)
    tokens = dominant + contextual
    token = _patch_tokens(dominant_index, assignment, dominant)  # [T, G*G]: the token of each patch, -1 none

    colour = np.zeros((count, tokens + 1, 3))  # the extra last column: "no token"
    alpha = np.zeros((count, tokens + 1))
    colour[:, dominant:tokens] = cluster_colours(contextual)
    alpha[:, dominant:tokens] = TINT_ALPHA
    outlined = np.zeros((count, tokens + 1), dtype=bool)
    outlined[:, 1:dominant] = True
    if group_of is not None:
        shared, folded, rank = _folding(np.asarray(group_of))
        colour[:, :tokens][shared] = group_colours(int(rank.max()) + 1 if shared.any() else 0)[rank[shared]]
        alpha[:, :dominant][shared[:, :dominant]] = SHADE_ALPHA  # contextual ones keep their light tint
        outlined[:, :tokens] &= ~folded

    rows = np.arange(count)[:, None]
    patch_colour = colour[rows, token].reshape(count, grid, grid, 3)
    patch_alpha = alpha[rows, token].reshape(count, grid, grid, 1)
    patch_dim = np.where(token < 0, DIM, 1.0).reshape(count, grid, grid, 1)
    cell_h, cell_w = height // grid * scale, width // grid * scale

    def per_pixel(patch: np.ndarray) -> np.ndarray:  # [T, G, G, c] -> [T, H * scale, W * scale, c]
        return patch.repeat(cell_h, axis=1).repeat(cell_w, axis=2)

    image = frames.astype(np.float64).repeat(scale, axis=1).repeat(scale, axis=2)
    a = per_pixel(patch_alpha)
    image = (image * (1 - a) + per_pixel(patch_colour) * a) * per_pixel(patch_dim)
    image = np.clip(np.floor(image + 0.5), 0, 255).astype(np.uint8)
    image[per_pixel(outlined[rows, token].reshape(count, grid, grid, 1))[..., 0]
          & _cell_borders(grid, cell_h, cell_w, line)] = OUTLINE

    row = np.empty((height * scale, count * width * scale + (count - 1) * gap, 3), dtype=np.uint8)
    row[:] = GAP
    for t in range(count):
        left = t * (width * scale + gap)
        row[:, left : left + width * scale] = image[t]
    return row


def _patch_tokens(dominant_index: np.ndarray, assignment: np.ndarray, dominant: int) -> np.ndarray:
    """[T, G*G]: the index (0..D+C-1) of the token each patch became or joined, -1 for none."""
    count = len(assignment)
    token = np.where(assignment >= 0, dominant + assignment, -1)
    token[np.arange(count)[:, None], dominant_index] = np.arange(dominant)
    return token[:, 1:]  # patches only: the CLS has none


def _folding(group_of: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From each token's group [T, K]: whether its group holds several tokens, whether it was folded into
    another token (it is not its group's first), and its group's colour rank (order of first appearance
    among the shared groups; -1 for others)."""
    flat = group_of.reshape(-1)
    _, first, inverse, size = np.unique(flat, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(first, kind="stable")  # groups by first appearance
    is_shared = size[order] > 1
    rank_of = np.full(len(size), -1)
    rank_of[order[is_shared]] = np.arange(int(is_shared.sum()))
    shared = (size[inverse] > 1).reshape(group_of.shape)
    folded = (np.arange(flat.size) != first[inverse]).reshape(group_of.shape)
    return shared, folded, rank_of[inverse].reshape(group_of.shape)


def _cell_borders(grid: int, cell_h: int, cell_w: int, line: int) -> np.ndarray:
    """[G * cell_h, G * cell_w] bool: the outermost `line` pixels of every cell."""
    y = np.arange(grid * cell_h) % cell_h
    x = np.arange(grid * cell_w) % cell_w
    edge_y = (y < line) | (y >= cell_h - line)
    edge_x = (x < line) | (x >= cell_w - line)
    return edge_y[:, None] | edge_x[None, :]


def _check(
    frames: np.ndarray, dominant_index: np.ndarray, assignment: np.ndarray, group_of: np.ndarray | None,
    scale: int, line: int, gap: int,
) -> tuple[int, int, int, int, int, int]:
    """(T, H, W, G, D, C) of valid inputs; ValueError naming the input and the problem otherwise."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T, H, W >= 1, got {frames.dtype} of shape "
                         f"{frames.shape}")
    count, height, width, _ = frames.shape
    for name, array in (("dominant_index", dominant_index), ("contextual_assignment", assignment)):
        if array.ndim != 2 or array.shape[0] != count or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must be an integer [T={count}, ...] array, got {array.dtype} of shape "
                             f"{array.shape}")
    n = assignment.shape[1]
    grid = math.isqrt(n - 1) if n > 1 else 0
    if grid < 1 or grid * grid != n - 1:
        raise ValueError(f"contextual_assignment has N={n} tokens per frame: not CLS + a square patch grid")
    if height % grid or width % grid:
        raise ValueError(f"frames of {height}x{width} pixels do not split into the {grid}x{grid} patch grid")
    dominant = dominant_index.shape[1]
    if dominant < 1 or (dominant_index[:, 0] != 0).any() or (dominant_index >= n).any() \
            or (np.diff(dominant_index, axis=1) <= 0).any():
        raise ValueError(f"dominant_index must hold ascending positions in 0..{n - 1} starting with the CLS "
                         "(0) in every frame")
    kept = np.zeros(assignment.shape, dtype=bool)
    kept[np.arange(count)[:, None], dominant_index] = True
    rest = assignment[~kept]
    if (assignment[kept] != -1).any() or not ((rest >= 0).all() or (rest == -1).all()):
        raise ValueError("contextual_assignment must be -1 exactly at the dominant positions and >= 0 "
                         "elsewhere (or -1 everywhere: no contextual tokens)")
    contextual = int(rest.max()) + 1 if rest.size and rest.max() >= 0 else 0
    if group_of is not None:
        group_of = np.asarray(group_of)
        if group_of.shape != (count, dominant + contextual) or not np.issubdtype(group_of.dtype, np.integer):
            raise ValueError(f"group_of must be an integer [T={count}, K={dominant + contextual}] array (the "
                             f"{dominant} dominant and {contextual} contextual tokens of each frame), got "
                             f"{group_of.dtype} of shape {group_of.shape}")
    for name, value, least in (("scale", scale, 1), ("line", line, 1), ("gap", gap, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if 2 * line > min(height, width) // grid * scale:
        raise ValueError(f"line={line} px leaves nothing of a {min(height, width) // grid * scale} px cell")
    return count, height, width, grid, dominant, contextual
