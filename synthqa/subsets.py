"""Which visual tokens the LLM reads in a training step: the curriculum's token subsets.

Training-time only. The batch job shows the LLM whatever the compression keeps; these subsets are what
teaches a small LLM to read a token by what it shows rather than by where it sits in the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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

    The curriculum's first phases (see `synthqa.train`) rank by content instead: with `objects`, each
    frame's patches an object covers (ground truth, as the tower's patch targets define them) come
    before the others, which follow in random order; each frame keeps `patches` patches or, without it,
    every object patch plus k others, k log-uniform in [0, all]. Short sequences in which the LLM learns
    to find the question's object by what its patches show, then more and more background to ignore.
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

