"""What determines a job's answers, recorded beside its output: `pipelines.sink` resumes an output only for
a job with the same fingerprint, so one file never mixes the answers of two models or two settings.

The model is fingerprinted by what it computes with, not only by where it lies: a checkpoint retrained in
place keeps its path and config but not its weights, and a hub id names whatever commit `main` points to
today. A local folder's weight files are hashed; a hub id's commit is read from the local Hugging Face
cache (without the network). Weight files are large (14 GB for the 7B), so each file's sha256 is computed
once and kept by (absolute path, size, mtime) in `digests.json` under vzpipe's cache folder
(`stages.digests`): later jobs only stat the files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import try_to_load_from_cache

from stages.digests import file_digests
from stages.remote import is_remote, local_path, read_bytes

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from pipelines.config import JobConfig
    from pipelines.datasets import DataConfig
    from stages.model import ModelConfig

# how caption rows are named: by their clip (`pipelines.job.clip_ids`); an output whose rows were named
# otherwise (by a question's id, before) is not resumed under the new names
CAPTION_IDS = "clip"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def job_fingerprint(job: JobConfig, model_config: PretrainedConfig) -> dict:
    """What determines a job's answers: the model (`model_fingerprint`), compression, decoding, prompts
    (as resolved: the set's own unless set) and generation, the data files' digests, and the rule that
    reads its multiple-choice replies. Resources (batch sizes, devices, pools, threads, prefix reuse,
    vLLM's memory settings, URL transfer settings) are left out: they change speed, not answers."""
    # how answers are computed, not what they are: batching, prefix reuse (exact), the engine's resources
    generation = {k: v for k, v in asdict(job.pipeline.generation).items()
                  if k not in ("batch_size", "reuse_prefix")}
    answering = {k: v for k, v in asdict(job.pipeline).items() if k != "vllm"}
    if job.pipeline.task == "caption":
        answering["caption_ids"] = CAPTION_IDS
    return {
        "model": model_fingerprint(job.model, model_config),
        "compression": asdict(job.compression),
        "decode": {k: v for k, v in asdict(job.decode).items() if k not in ("threads", "remote")},
        "pipeline": {**answering, "generation": generation},
        "data": _data_fingerprint(job.data),
        "score": {"rule": job.score.rule_for(job.data.format)},
    }


def model_fingerprint(model: ModelConfig, model_config: PretrainedConfig) -> dict:
    """The weights a job answers with: path, dtype and the config's digest, and
    - `weights_sha256`: of a local folder's weight files (`weight_files`), one digest over their names
      and sha256s; null for a hub id,
    - `revision`: for a hub id, the commit `main` resolves to in the local Hugging Face cache (a commit
      fixes every file; the weights are not hashed, as the cache may hold only the shards fetched so
      far); null for a local folder,
    - `projector`: the tuned projector file's sha256 (`model.projector_path`), null when there is none.
    """
    folder = Path(model.path).expanduser()
    local = folder.is_dir()
    weights = weight_files(folder) if local else []
    projector = Path(model.projector_path).expanduser() if model.projector_path else None
    projector = projector if projector is not None and projector.is_file() else None
    digests = file_digests([*weights, *([projector] if projector else [])])
    listing = "".join(f"{file.name}:{digests[file]}\n" for file in weights)  # sorted by name
    return {"path": model.path, "dtype": model.dtype,
            "config_sha256": _digest(json.dumps(model_config.to_dict(), sort_keys=True).encode()),
            "weights_sha256": _digest(listing.encode()) if local else None,
            "revision": None if local else hub_revision(model.path),
            "projector": digests[projector] if projector else None}


def weight_files(folder: Path) -> list[Path]:
    """A checkpoint folder's weight files (safetensors, PyTorch pickles and their shard indexes), by name;
    subfolders (a trainer's checkpoints) are not the checkpoint's."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def hub_revision(repo_id: str) -> str | None:
    """The commit `main` of a hub repository resolves to in the local Hugging Face cache, or None when
    the cache does not hold the repository (the hub is not asked)."""
    config = try_to_load_from_cache(repo_id, "config.json")
    return Path(config).parent.name if isinstance(config, str) else None


def _data_fingerprint(data: DataConfig) -> dict:
    return {"format": data.format, "video_root": data.video_root,
            "files": {key: {"path": path if is_remote(path) else str(Path(local_path(path)).resolve()),
                            "sha256": _file_digest(path)}
                      for key, path in data.files().items() if path}}


def _file_digest(path: str | None) -> str | None:
    """A file's sha256; a folder's (e.g. MVBench's one JSON per task): of its files' names and bytes; a
    URL's (a manifest in object storage): of its bytes."""
    if path is not None and is_remote(path):
        return _digest(read_bytes(path))
    path = None if path is None else local_path(path)
    if path is None or not Path(path).exists():
        return None
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return _digest(b"".join(str(p.relative_to(path.parent)).encode() + p.read_bytes() for p in files))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
