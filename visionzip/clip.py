"""VisionZip on a transformers CLIP vision tower without asking it for attention maps.

The official code runs the whole tower with eager attention and `output_attentions=True`, which builds
an N x N map per head for every layer (and SDPA cannot return it). Here the tower's own modules run up to
the selection layer with whatever attention the model is configured with (SDPA by default); only the CLS
query's row of that layer's attention is computed, and the layers after it are skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from .zip import ZipResult, work_dtype, zip_tokens


def zip_clip(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    dominant: int = 14,
    contextual: int = 3,
    layer: int = -2,
) -> ZipResult:
    """VisionZip `hidden_states[layer]` of a CLIP vision tower (see `clip_selection_layer_outputs`).

    Equals `zip_tokens` on what the eager model returns with `output_hidden_states` and
    `output_attentions`, at a fraction of the cost. Call it under `torch.inference_mode()` unless
    gradients are wanted.
    """
    features, cls_attn, metric = clip_selection_layer_outputs(vision_model, pixel_values, layer)
    return zip_tokens(features, cls_attn, metric, dominant=dominant, contextual=contextual)


def clip_selection_layer_outputs(
    vision_model: nn.Module, pixel_values: torch.Tensor, layer: int = -2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`zip_tokens`' inputs (features [B, N, D], cls_attn [B, H, N], metric [B, N, d]) for a CLIP tower.

    vision_model: a transformers `CLIPVisionModel` (in Video-LLaVA: `model.model.video_tower`), or any
    module with `.vision_model` holding one. pixel_values [B, 3, H, W]. `layer` indexes `hidden_states`
    as transformers returns them (0 = embeddings, -2 = output of the last-but-one block); the selection
    attention is the one inside the block that produces it, as in the official code (`attentions[-2]`
    with `hidden_states[-2]`). Blocks after it never run; the tower keeps its attention implementation
    and dtype; cls_attn and metric come in at least float32.
    """
    tower = getattr(vision_model, "vision_model", vision_model)
    blocks = tower.encoder.layers
    stop = _selection_block(layer, len(blocks))
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [B, 3, H, W], got shape {tuple(pixel_values.shape)}")

    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for block in blocks[:stop]:
        hidden = block(hidden, None)
    block = blocks[stop]
    cls_attn, metric = _cls_attention_and_keys(block.self_attn, block.layer_norm1(hidden))
    return block(hidden, None), cls_attn, metric


def _selection_block(layer: int, num_blocks: int) -> int:
    """Index of the block whose output is `hidden_states[layer]` (hidden_states has num_blocks + 1)."""
    if not -num_blocks <= layer <= num_blocks or layer == 0:
        raise ValueError(
            f"layer must index a block's output in hidden_states (1..{num_blocks} or -{num_blocks}..-1 for "
            f"a tower of {num_blocks} blocks; 0 is the embeddings, which have no attention), got {layer}"
        )
    return layer - 1 if layer > 0 else num_blocks + layer


def _cls_attention_and_keys(attn: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS query's attention probabilities per head [B, H, N] and the head-averaged keys [B, N, d].

    Same projections as the block's own attention (so the same numbers), in at least float32.
    """
    batch, n, _ = normed.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    wd = work_dtype(normed.dtype)
    keys = attn.k_proj(normed).view(batch, n, heads, head_dim).to(wd)
    query = attn.q_proj(normed[:, :1]).view(batch, heads, 1, head_dim).to(wd)
    scores = (query @ keys.permute(0, 2, 3, 1)) * attn.scale  # [B, H, 1, N]
    return scores.softmax(dim=-1).squeeze(2), keys.mean(dim=2)
