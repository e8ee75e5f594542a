"""Random tiny Video-LLaVA checkpoints built offline, for tests, demos and `model=tiny`.

The real model (`LanguageBind/Video-LLaVA-7B-hf`) cannot be downloaded on every machine the project runs
on, so tests use `build_tiny_video_llava`: the same architecture with the same visual geometry (224 px,
patch 14, 257 tokens per frame) but a few narrow layers and an offline tokenizer. It is saved with
`save_pretrained` and loaded back with `stages.model.load_video_llava`, so the loading path is exercised.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
)

from stages.model import ModelLoadError

# Word pieces of the tiny tokenizer: the chat template and the demo's prompts tokenise to whole words.
_WORDS = (
    "USER ASSISTANT What Which Where How Is Are Does Describe the video in detail this that is are "
    "a an of on to and or what which color colour shape object objects moving move moves left right up "
    "down top bottom half many count there red green blue yellow white black circle square triangle one "
    "two three four yes no frame scene person"
).split()
_BUILD_MARKER = "TINY_BUILD_COMPLETE"
_BUILD_VERSION = 1  # bump when the recipe changes, so cached builds are rebuilt


def tiny_tokenizer() -> LlamaTokenizer:
    """A Llama-style BPE tokenizer with byte fallback, built in memory (no files, no download).

    Vocabulary: <unk> <s> </s>, the 256 byte tokens, `▁` and printable ASCII, then the words above with
    and without the `▁` word-start marker (every prefix of a word is a token, and merges build words left
    to right), then the special tokens <pad>, <image>, <video>. Any text encodes and decodes losslessly.
    """
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for char in ["▁", *map(chr, range(0x21, 0x7F))]:
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    # Word-start pieces first: merges apply by rank, and "U"+"S" ranked before "▁"+"U" would leave "▁USER"
    # unreachable.
    for piece in [f"▁{word}" for word in _WORDS] + list(_WORDS):
        for end in range(2, len(piece) + 1):
            if piece[:end] not in vocab:
                vocab[piece[:end]] = len(vocab)
                merges.append((piece[: end - 1], piece[end - 1]))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>", "<video>"]})
    return tokenizer


def tiny_config(tokenizer: PreTrainedTokenizerBase) -> VideoLlavaConfig:
    """Video-LLaVA-7B's visual geometry (224 px, patch 14, 257 tokens, layer -2) at toy width and depth."""
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=14, projection_dim=64,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    return video_llava_config(tokenizer, vision, text)


def video_llava_config(
    tokenizer: PreTrainedTokenizerBase, vision: CLIPVisionConfig, text: LlamaConfig, frames: int = 8
) -> VideoLlavaConfig:
    """A Video-LLaVA config around a CLIP tower and a Llama, wired as the real one: the tokenizer's
    <image>/<video> tokens, layer -2, and placeholder counts for `frames` frames (CLS kept for video)."""
    patches = (vision.image_size // vision.patch_size) ** 2
    return VideoLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2,
        image_seq_length=patches,
        video_seq_length=frames * (patches + 1),
    )


def build_tiny_video_llava(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build (once) a random tiny Video-LLaVA with tokenizer and image processor into `folder`.

    Deterministic: the same seed writes byte-identical files. Cached: a folder whose marker (written
    last) records the same seed and builder version is returned as is. The model is written to a
    temporary sibling and renamed into place, so concurrent builders and crashes never leave a
    half-written folder behind; a stale one (no marker) is replaced.
    """
    folder = Path(folder)
    marker = {"seed": seed, "version": _BUILD_VERSION}
    if _read_marker(folder) == marker:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tokenizer = tiny_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VideoLlavaForConditionalGeneration(tiny_config(tokenizer))
        write_checkpoint(model, tokenizer, tmp)
        (tmp / _BUILD_MARKER).write_text(json.dumps(marker) + "\n")
        if _read_marker(folder) == marker:  # another process finished first
            return folder
        if folder.exists():
            _remove_stale_build(folder, expected={p.name for p in tmp.iterdir()})
        try:
            tmp.rename(folder)
        except OSError:
            if _read_marker(folder) != marker:  # not merely another process finishing in between
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_checkpoint(model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                     folder: str | os.PathLike) -> Path:
    """Save a built Video-LLaVA as a checkpoint folder `load_video_llava` reads: safetensors weights, config,
    a generation config with the tokenizer's special tokens, the tokenizer and an image processor."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    VideoLlavaImageProcessor().save_pretrained(folder)
    return Path(folder)


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _BUILD_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale_build(folder: Path, expected: set[str]) -> None:
    """Delete an unfinished or outdated build, refusing to delete a folder that holds anything else."""
    unexpected = sorted(p.name for p in folder.iterdir() if p.name not in expected) if folder.is_dir() else []
    if not folder.is_dir() or unexpected:
        raise ModelLoadError(
            f"cannot build the tiny model into {str(folder)!r}: it exists and holds files a build does not "
            f"write ({', '.join(unexpected) or 'not a folder'}); choose an empty or new folder"
        )
    shutil.rmtree(folder)
