"""Video-LLaVA adapter: per-frame visual tokens from its video tower, with or without VisionZip.

transformers' `VideoLlavaModel.get_video_features` runs the video tower, takes
`hidden_states[vision_feature_layer]` with all tokens (for video the CLS is kept: 257 per 224 px frame)
and applies the multimodal projector. Here the two halves are separate so that token reduction (VisionZip
per frame, temporal merging across frames) happens on the tower's features before the projector, as in
the paper, and the projector runs on the short sequence only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from .baselines import pool_tokens, random_tokens
from .clip import clip_selection_layer_outputs, zip_clip

CompressionMethod = Literal["none", "visionzip", "random", "pool"]
COMPRESSION_METHODS: tuple[str, ...] = ("none", "visionzip", "random", "pool")


def feature_layer(model: nn.Module) -> int:
    """The tower layer Video-LLaVA feeds the LLM (-2); a list of layers (concatenated) is not supported."""
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer must be a single layer for token compression, got {layer}")
    return layer


def tokens_per_frame(config: PretrainedConfig) -> int:
    """Tokens the video tower gives each frame, read from a Video-LLaVA config (`model.config`): the
    patch grid plus CLS (257 at 224 px / patch 14)."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def frame_tokens(
    model: nn.Module,
    pixel_values: torch.Tensor,
    *,
    method: CompressionMethod = "none",
    dominant: int = 14,
    contextual: int = 3,
    seed: int | Sequence[int] = 0,
) -> torch.Tensor:
    """Each frame's visual tokens before the projector, all or the ones a compression `method` keeps:
    [F, K, vision_hidden].

    model: a `VideoLlavaForConditionalGeneration`; pixel_values [F, 3, H, W] (frames of any videos).
    `none` is HF's path exactly (K = 257, CLS first). `visionzip` keeps `dominant` (CLS included) +
    `contextual` tokens per frame (K = dominant + contextual), selected at the same layer, and skips the
    tower's layers after it. The baselines keep the same K = dominant + contextual from the same layer:
    `random` (CLS + random patches, seeded with `seed`: one for all frames or one per frame) and `pool`
    (CLS + average-pooled patch grid), see `visionzip.baselines`.
    """
    tower = model.model.video_tower
    layer = feature_layer(model)
    if method == "none":
        # An int asks the tower to keep only that hidden state, as get_video_features does.
        return tower(pixel_values, output_hidden_states=layer).hidden_states[layer]
    if method == "visionzip":
        return zip_clip(tower, pixel_values, dominant=dominant, contextual=contextual, layer=layer).tokens
    if method in ("random", "pool"):
        features = clip_selection_layer_outputs(tower, pixel_values, layer)[0]
        keep = dominant + contextual
        return random_tokens(features, keep, seed) if method == "random" else pool_tokens(features, keep)
    raise ValueError(f"method must be one of {', '.join(COMPRESSION_METHODS)}, got {method!r}")


def project(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Map vision tokens [..., vision_hidden] into the LLM's embedding space [..., text_hidden]."""
    return model.model.multi_modal_projector(tokens)
