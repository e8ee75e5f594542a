"""The small Video-LLaVA of the synthetic QA: its size, how it is built, fed and saved.

Both training phases and the scoring read frames through the same few functions here (`pixels_of`, the
encode stage's own preprocessing; `visual_features`, the tokens before the projector), so that what the
model learns from is what the batch job shows it. A saved checkpoint is an ordinary model folder: the
job loads it as `model=synth`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    PreTrainedTokenizerBase,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
)

from stages.encode import CompressionConfig
from stages.preprocess import ClipPreprocess
from stages.testing import tiny_tokenizer, video_llava_config
from synthqa.clips import FRAME_SIZE, NUM_FRAMES, TrainingSample
from visionzip import clip_selection_layer_outputs
from visionzip.video_llava import feature_layer, frame_tokens

PATCH = 14
PREPROCESS = ClipPreprocess(shortest_edge=FRAME_SIZE, crop_height=FRAME_SIZE, crop_width=FRAME_SIZE)
FULL = CompressionConfig(method="none")  # every token: what the LLM reads while training


def synth_config(tokenizer: PreTrainedTokenizerBase, width: int = 128, lm_width: int = 192,
                 lm_layers: int = 4) -> VideoLlavaConfig:
    """112 px / patch 14 (64 patches + CLS = 65 tokens per frame), a 4-block tower (the last one is
    skipped: Video-LLaVA reads block 3's output) and a small Llama."""
    vision = CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4, num_attention_heads=4,
        image_size=FRAME_SIZE, patch_size=PATCH, projection_dim=width,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=lm_width, intermediate_size=int(8 / 3 * lm_width),
        num_hidden_layers=lm_layers, num_attention_heads=lm_width // 32, num_key_value_heads=lm_width // 32,
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    return video_llava_config(tokenizer, vision, text, frames=NUM_FRAMES)


def new_model(seed: int, **sizes: int) -> tuple[VideoLlavaForConditionalGeneration, PreTrainedTokenizerBase]:
    """A randomly initialised synth model (seeded) with the offline tokenizer, SDPA attention."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = synth_config(tokenizer, **sizes)
    config._attn_implementation = "sdpa"
    model = VideoLlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return model, tokenizer


def save_checkpoint(model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                    folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Model (safetensors, `dtype`), tokenizer and a 112 px image processor config: a folder
    `stages.model.load_video_llava` loads like any checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # a converted copy of the weights: the model being trained keeps its float32 weights
    model.save_pretrained(folder, state_dict={k: v.to(dtype) for k, v in model.state_dict().items()})
    tokenizer.save_pretrained(folder)
    VideoLlavaImageProcessor(
        size={"shortest_edge": FRAME_SIZE}, crop_size={"height": FRAME_SIZE, "width": FRAME_SIZE}
    ).save_pretrained(folder)
    return folder


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, answers: list[str]) -> torch.Tensor:
    """Each one-word answer as its single token (as it follows `ASSISTANT:`)."""
    ids = [tokenizer(" " + a, add_special_tokens=False).input_ids for a in answers]
    ids = [i[1:] if len(i) > 1 and tokenizer.convert_ids_to_tokens(i[0]) == "▁" else i for i in ids]
    bad = [a for a, i in zip(answers, ids, strict=True) if len(i) != 1]
    if bad:
        raise ValueError(f"answers must be single tokens of the tokenizer, got {bad}")
    return torch.tensor([i[0] for i in ids])


def pixels_of(samples: list[TrainingSample]) -> torch.Tensor:
    """[B * T, 3, 112, 112] float32, preprocessed exactly as the encode stage does for this model."""
    return PREPROCESS(np.concatenate([s.clip.frames for s in samples]))


def selection_features(model: VideoLlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """hidden_states[vision_feature_layer] of the video tower (blocks after it skipped)."""
    return clip_selection_layer_outputs(model.model.video_tower, pixels, feature_layer(model))[0]


def visual_features(model: VideoLlavaForConditionalGeneration, samples: list[TrainingSample],
                    compression: CompressionConfig = FULL) -> torch.Tensor:
    """Per-frame tokens before the projector [B * T, K, D], without gradients (the tower is frozen after
    phase 1): the selection layer's (blocks after it skipped) for `none`, else the compressed ones.
    Per frame only: temporal merging (`compression.temporal`) is the encode stage's."""
    if compression.temporal.enabled:
        raise ValueError("visual_features gives per-frame tokens: temporal merging is not supported here")
    with torch.no_grad():
        pixels = pixels_of(samples)
        if compression.method == "none":
            return selection_features(model, pixels)
        return frame_tokens(model, pixels, method=compression.method, dominant=compression.dominant,
                            contextual=compression.contextual)  # fmt: skip
