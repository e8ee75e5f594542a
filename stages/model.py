"""Loading Video-LLaVA checkpoints (a hub id or a local folder) and tuned projector weights.

Tiny random checkpoints for tests and demos are built by `stages.testing` and load through this code.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
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


@dataclass
class ModelConfig:
    """Which checkpoint a job loads and how (the `model` config group)."""

    path: str = DEFAULT_MODEL  # a hub id or a local folder
    dtype: str = "bfloat16"
    device: str = "auto"  # auto: the first CUDA device when there is one, else the CPU
    build_tiny: bool = False  # build the tiny random model into `path` first (`stages.testing`)
    projector_path: str | None = None  # tuned projector weights (projector tuning writes them)

    def problems(self) -> list[str]:
        if self.dtype not in DTYPES:
            return [f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}"]
        return []


def read_model_config(path: str | os.PathLike = DEFAULT_MODEL) -> VideoLlavaConfig:
    """A checkpoint's config (`config.json` of a folder, or of a hub id: from the local cache or the hub),
    checked to be Video-LLaVA: a wrong path fails in a second, before gigabytes of weights load."""
    where = str(path)
    local = Path(where).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"model path {where!r} is a file; expected a model folder or a hub id")
    if not local.exists() and not _HUB_ID.match(where):
        raise ModelLoadError(f"model path {where!r} is neither an existing folder nor a hub id ('org/name')")
    if local.is_dir():
        where = str(local)
    elif not _in_hub_cache(where) and not _hub_reachable():
        raise ModelLoadError(f"cannot load a model config from {where!r}: it is not in the local Hugging "
                             f"Face cache and the hub ({constants.ENDPOINT}) cannot be reached from here")
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a model config from {where!r}: {err}") from err
    if config.model_type != "video_llava":
        raise ModelLoadError(
            f"{where!r} is a {config.model_type!r} checkpoint, not Video-LLaVA (model_type 'video_llava')"
        )
    return config


def _in_hub_cache(hub_id: str) -> bool:
    try:
        AutoConfig.from_pretrained(hub_id, local_files_only=True)
    except (OSError, ValueError):
        return False
    return True


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub's host takes a connection (in seconds, where the hub client would spend half a
    minute retrying). Behind a proxy the client's own attempt decides."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_model(config: ModelConfig, keep: Literal["all", "vision", "language"] = "all"
               ) -> tuple[VideoLlavaForConditionalGeneration, PreTrainedTokenizerBase]:
    """`load_video_llava` as a `ModelConfig` says, with its tuned projector when it names one."""
    model, tokenizer = load_video_llava(config.path, dtype=config.dtype, device=config.device, keep=keep)
    if config.projector_path is not None and keep != "language":
        load_projector(model, config.projector_path)
    return model, tokenizer


def load_video_llava(
    path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "auto",
    keep: Literal["all", "vision", "language"] = "all",
) -> tuple[VideoLlavaForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load a Video-LLaVA checkpoint (hub id or local folder) in eval mode with SDPA attention.

    bf16 is the default on CPU too: fp16 matmuls are slow on CPUs and fp32 doubles the memory (the 7B
    model needs 13.7 GiB in bf16). The config is read first (`read_model_config`).

    `keep` loads only what a stage runs: `vision` reads just the video tower's and the projector's tensors
    from the checkpoint's safetensors (the encoder: ~0.6 GiB of the 7B instead of 13.7; from the hub only
    the shards that hold them are fetched), `language` just the LLM's (the answerer); the other half is
    never read. `all` is transformers' own `from_pretrained`.
    """
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    if keep not in ("all", "vision", "language"):
        raise ValueError(f"keep must be 'all', 'vision' or 'language', got {keep!r}")
    config = read_model_config(path)
    where = str(Path(str(path)).expanduser()) if Path(str(path)).expanduser().is_dir() else str(path)
    if keep == "all":
        model = VideoLlavaForConditionalGeneration.from_pretrained(
            where, config=config, dtype=torch_dtype, attn_implementation="sdpa"
        )
    else:
        model = _load_half(where, config, keep, torch_dtype)
    model = model.to(torch_device)
    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token_id is None:  # left-padded batches need one; EOS never reaches the LM unmasked
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


# The tensors each half runs, by their names in a checkpoint saved by transformers 5.
HALVES = {"vision": ("model.video_tower.", "model.multi_modal_projector."),
          "language": ("model.language_model.", "lm_head.")}
# How checkpoints name them on disk: transformers 5 still saves Video-LLaVA under its old names, and
# LanguageBind/Video-LLaVA-7B-hf (saved before) also keeps CLIP's `vision_model.` level.
_LEGACY_PREFIXES = (("language_model.lm_head.", "lm_head."),
                    ("language_model.model.", "model.language_model."),
                    ("video_tower.vision_model.", "model.video_tower."),
                    ("image_tower.vision_model.", "model.image_tower."),
                    ("video_tower.", "model.video_tower."), ("image_tower.", "model.image_tower."),
                    ("multi_modal_projector.", "model.multi_modal_projector."))


def half_parameters(config: VideoLlavaConfig) -> dict[str, int]:
    """Parameters of each half (`HALVES`), counted on a model built without memory from its config."""
    with torch.device("meta"):
        model = VideoLlavaForConditionalGeneration(config)
    counts = dict.fromkeys(HALVES, 0)
    for name, parameter in model.named_parameters():
        for half, prefixes in HALVES.items():
            counts[half] += parameter.numel() if name.startswith(prefixes) else 0
    return counts


def current_name(name: str) -> str:
    """A checkpoint tensor's name as transformers 5 names it."""
    for old, new in _LEGACY_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def checkpoint_tensors(where: str, keep: Literal["vision", "language"] | None = None
                       ) -> dict[str, tuple[Path, str]]:
    """{name: (safetensors file, name stored in it)} of a checkpoint's tensors (only `keep`'s half when
    given). A sharded checkpoint is read through its index, and from the hub only the shards that hold
    the wanted tensors are fetched."""
    def fetch(filename: str) -> Path | None:
        if Path(where).is_dir():
            return Path(where) / filename if (Path(where) / filename).is_file() else None
        try:
            return Path(hf_hub_download(where, filename))
        except EntryNotFoundError:
            return None

    wanted = (lambda name: True) if keep is None else (lambda name: name.startswith(HALVES[keep]))
    index = fetch("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        stored = {current_name(name): (shard, name) for name, shard in weight_map.items()}
        stored = {name: pair for name, pair in stored.items() if wanted(name)}
        files = {shard: fetch(shard) for shard in {shard for shard, _ in stored.values()}}
        return {name: (files[shard], original) for name, (shard, original) in stored.items()}
    single = fetch("model.safetensors")
    if single is None:
        raise ModelLoadError(f"{where!r} has no model.safetensors(.index.json): only safetensors checkpoints "
                             "can be loaded a half at a time")
    with safe_open(str(single), "pt") as f:
        return {current_name(n): (single, n) for n in f.keys() if wanted(current_name(n))}


def _load_half(where: str, config: VideoLlavaConfig, keep: Literal["vision", "language"],
               dtype: torch.dtype) -> VideoLlavaForConditionalGeneration:
    """The model with only `keep`'s modules, built without memory (meta device) and filled with that
    half's tensors alone, read from the safetensors files; the few buffers that are not in a checkpoint
    (position ids, rotary frequencies) computed as their modules compute them."""
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = VideoLlavaForConditionalGeneration(config)
    model.model.image_tower = None
    if keep == "vision":
        model.model.language_model = model.lm_head = None
    else:
        model.model.video_tower = model.model.multi_modal_projector = None
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, stored) in checkpoint_tensors(where, keep).items():
        by_file.setdefault(file, []).append((name, stored))
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), "pt") as f:
            state.update({name: f.get_tensor(stored).to(dtype) for name, stored in names})
    model.load_state_dict(state, strict=False, assign=True)
    if keep == "language" and config.text_config.tie_word_embeddings and "lm_head.weight" not in state:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    for module in model.modules():  # buffers a checkpoint does not hold: computed anew
        meta = [name for name, buffer in module.named_buffers(recurse=False) if buffer.is_meta]
        if meta:
            fresh = type(module)(module.config)
            for name in meta:
                module.register_buffer(name, getattr(fresh, name), persistent=False)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"{where!r}: the checkpoint has no tensors for {', '.join(left[:5])}"
                             f"{' ...' if len(left) > 5 else ''} ({len(left)} missing for the {keep} half)")
    model.name_or_path = where
    return model


def load_projector(model: VideoLlavaForConditionalGeneration, path: str | os.PathLike) -> None:
    """Replace the model's projector weights with tuned ones (`pipelines.tune` writes them; shapes must
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
