"""Loading Video-LLaVA checkpoints, and building a tiny random one that loads through the same code.

The real model (`LanguageBind/Video-LLaVA-7B-hf`) cannot be downloaded on every machine the project runs
on, so tests and the demo use `build_tiny_video_llava`: the same architecture with the same visual
geometry (224 px, patch 14, 257 tokens per frame) but a few narrow layers and an offline tokenizer. It is
saved with `save_pretrained` and loaded back with `load_video_llava`, so the loading path is exercised.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
)

DEFAULT_MODEL = "LanguageBind/Video-LLaVA-7B-hf"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    """A model path that cannot be loaded as a Video-LLaVA checkpoint (message names path and cause)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` = the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_video_llava(
    path: str | os.PathLike = DEFAULT_MODEL,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "auto",
    keep: Literal["all", "vision", "language"] = "all",
) -> tuple[VideoLlavaForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load a Video-LLaVA checkpoint (hub id or local folder) in eval mode with SDPA attention.

    bf16 is the default on CPU too: fp16 matmuls are slow on CPUs and fp32 doubles the memory (the 7B
    model needs 13.7 GiB in bf16). The config is read first, so a wrong checkpoint fails in a second
    with its `model_type` named instead of after loading gigabytes of weights.

    `keep` drops what a stage never runs before the model moves to its device: `vision` keeps the video
    tower and the projector (the encoder: ~0.6 GiB of the 7B instead of 13.7), `language` keeps the LLM (the
    answerer). Separate encode and answer actors then do not hold two whole models on a GPU.
    """
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    if keep not in ("all", "vision", "language"):
        raise ValueError(f"keep must be 'all', 'vision' or 'language', got {keep!r}")
    where = str(path)
    local = Path(where).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"model path {where!r} is a file; expected a model folder or a hub id")
    if not local.exists() and not _HUB_ID.match(where):
        raise ModelLoadError(f"model path {where!r} is neither an existing folder nor a hub id ('org/name')")
    if local.is_dir():
        where = str(local)
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a model config from {where!r}: {err}") from err
    if config.model_type != "video_llava":
        raise ModelLoadError(
            f"{where!r} is a {config.model_type!r} checkpoint, not Video-LLaVA (model_type 'video_llava')"
        )
    model = VideoLlavaForConditionalGeneration.from_pretrained(
        where, config=config, dtype=torch_dtype, attn_implementation="sdpa"
    )
    if keep == "vision":
        model.model.language_model = model.lm_head = model.model.image_tower = None
    elif keep == "language":
        model.model.video_tower = model.model.image_tower = model.model.multi_modal_projector = None
    model = model.to(torch_device)
    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token_id is None:  # left-padded batches need one; EOS never reaches the LM unmasked
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def load_projector(model: VideoLlavaForConditionalGeneration, path: str | os.PathLike) -> None:
    """Replace the model's projector weights with tuned ones (`pipeline=tune`, `pipelines.tune`; shapes must
    match: same architecture)."""
    projector = model.model.multi_modal_projector
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ModelLoadError(f"projector {str(path)!r}: cannot read safetensors weights: {err}") from err
    expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != expected:
        raise ModelLoadError(
            f"projector {str(path)!r}: weights {got} do not fit this model's projector {expected}"
        )
    projector.load_state_dict({k: v.to(device=model.device, dtype=model.dtype) for k, v in weights.items()})


def save_projector(model: VideoLlavaForConditionalGeneration, folder: str | Path) -> Path:
    """The multimodal projector's weights alone (float32 safetensors) as FOLDER/projector.safetensors:
    what projector tuning changes, for `load_projector` (`model.projector_path`). Written to a temporary
    file first and renamed, so a crash never leaves a torn file."""
    path = Path(folder) / "projector.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = model.model.multi_modal_projector.state_dict()
    partial = path.with_suffix(".partial")
    save_file({k: v.detach().float().contiguous() for k, v in weights.items()}, str(partial))
    os.replace(partial, path)
    return path


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
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        VideoLlavaImageProcessor().save_pretrained(tmp)
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
