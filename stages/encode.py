"""Encode stage: frames of videos -> the visual embeddings Video-LLaVA's LLM reads, shortened.

Per batch of videos: CLIP preprocessing on the model's device, one tower pass over all frames (chunked
by `frame_batch_size`), VisionZip per frame, temporal merging per video on the zipped tokens, then one
projector call. Each video comes out with its own length M, ready for `stages.answer`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import VideoLlavaForConditionalGeneration

from stages.batch import errors_of
from stages.model import DEFAULT_MODEL, load_projector, load_video_llava
from stages.preprocess import ClipPreprocess, check_frames
from visionzip import merge_frames
from visionzip.baselines import pool_grid
from visionzip.video_llava import COMPRESSION_METHODS, Compression, frame_features, project, tokens_per_frame


@dataclass
class EncodedVideo:
    """One video's visual embeddings and what the compression did to it."""

    embeds: torch.Tensor  # [M, text_hidden] in the model's dtype, on its device
    visual_tokens_full: int  # T * 257: what Video-LLaVA reads without compression
    visual_tokens_after_zip: int  # T * (dominant + contextual) (= full for compression "none")
    visual_tokens_kept: int  # M, after temporal merging: what the LLM reads
    encode_seconds: float  # the batch's wall time, shared out by frame count


class EncodeStage:
    """Frames -> projected visual tokens. A plain callable, and a Ray Data `map_batches` class.

    `model` is a path or hub id (loaded here, as a Ray actor does) or an already loaded
    `VideoLlavaForConditionalGeneration` (shared with an `AnswerStage` in one process; `dtype` and
    `device` are then ignored). Preprocessing parameters come from the model folder's
    `preprocessor_config.json`, or CLIP's defaults. `projector_path`: tuned projector weights to use
    instead of the checkpoint's (they replace them in `model` when it is a loaded one).
    """

    def __init__(
        self,
        model: str | os.PathLike | VideoLlavaForConditionalGeneration = DEFAULT_MODEL,
        *,
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device = "auto",
        compression: Compression = "visionzip",
        dominant: int = 14,
        contextual: int = 3,
        temporal: bool = False,
        threshold: float = 0.9,
        max_tokens: int | None = None,
        frame_batch_size: int = 64,
        projector_path: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(model, VideoLlavaForConditionalGeneration):
            model = load_video_llava(model, dtype=dtype, device=device, keep="vision")[0]
        if projector_path is not None:
            load_projector(model, projector_path)
        self.model = model
        self.preprocess = ClipPreprocess.from_pretrained(model.name_or_path)
        self.full_per_frame = tokens_per_frame(model)
        if compression not in COMPRESSION_METHODS:
            methods = ", ".join(COMPRESSION_METHODS)
            raise ValueError(f"compression must be one of {methods}, got {compression!r}")
        if compression != "none" and (dominant < 1 or contextual < 0):
            raise ValueError(f"need dominant >= 1 and contextual >= 0, got {dominant} and {contextual}")
        if compression != "none" and dominant + contextual > self.full_per_frame:
            raise ValueError(
                f"dominant + contextual = {dominant + contextual} exceeds the {self.full_per_frame} tokens "
                "of a frame"
            )
        if compression == "pool":  # the pooled grid must fit the patch grid: fail here, not per batch
            pool_grid(dominant + contextual - 1, math.isqrt(self.full_per_frame - 1))
        if frame_batch_size < 1:
            raise ValueError(f"frame_batch_size must be >= 1, got {frame_batch_size}")
        self.compression = compression
        self.dominant, self.contextual = dominant, contextual
        self.temporal, self.threshold, self.max_tokens = temporal, threshold, max_tokens
        self.frame_batch_size = frame_batch_size

    @torch.inference_mode()
    def encode(self, videos: Sequence[np.ndarray | torch.Tensor]) -> list[EncodedVideo]:
        """Encode the frames of each video (uint8 [T, H, W, 3] each; sizes and T may differ per video).

        Raises ValueError naming the video when its frames are not such an array.
        """
        start = time.perf_counter()
        kept = self.compressed_tokens(videos)
        if not kept:
            return []
        embeds = project(self.model, torch.cat(kept)).split([len(tokens) for tokens in kept])
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        seconds = time.perf_counter() - start
        counts = [len(frames) for frames in videos]
        per_frame = self.full_per_frame if self.compression == "none" else self.dominant + self.contextual
        return [
            EncodedVideo(
                embeds=emb,
                visual_tokens_full=n * self.full_per_frame,
                visual_tokens_after_zip=n * per_frame,
                visual_tokens_kept=len(emb),
                encode_seconds=seconds * n / sum(counts),
            )
            for emb, n in zip(embeds, counts, strict=True)
        ]

    @torch.inference_mode()
    def compressed_tokens(self, videos: Sequence[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Each video's tokens before the projector, [M, vision_hidden] in the model's dtype: the tower's
        selection-layer tokens after VisionZip (or a control) and temporal merging. `encode` projects
        them; projector tuning (`pipelines.tune`) trains on them."""
        videos = [check_frames(frames, f"frames of video {i}") for i, frames in enumerate(videos)]
        if not videos:
            return []
        device, dtype = self.model.device, self.model.dtype
        pixels = torch.cat([self.preprocess(frames, device, dtype) for frames in videos])
        features = torch.cat([
            frame_features(self.model, chunk, self.compression, self.dominant, self.contextual)
            for chunk in pixels.split(self.frame_batch_size)
        ])  # fmt: skip
        return [self._merge(per_video) for per_video in features.split([len(frames) for frames in videos])]

    def _merge(self, features: torch.Tensor) -> torch.Tensor:
        """[T, K, D] -> [M, D]: temporal merging when enabled (CLS of each frame protected), else flatten."""
        if not self.temporal:
            return features.flatten(0, 1)
        merged = merge_frames(features, self.threshold, protect_first=True, max_tokens=self.max_tokens)
        return merged.tokens

    def __call__(self, batch: dict) -> dict:
        """Ray Data / local batch: column `frames` (uint8 [T, H, W, 3] per row) -> embeddings and stats.

        Adds `visual_embeds` (float32 numpy [M, text_hidden], exact for bf16/fp16 models),
        `visual_tokens_full`, `visual_tokens_after_zip`, `visual_tokens_kept`, `encode_seconds` and
        `error`; drops `frames` so decoded pixels do not travel further. A row that arrives with an `error`
        or whose frames are invalid is not encoded: its `visual_embeds` is empty ([0, text_hidden], not
        None, so Ray Data keeps a tensor column), its stats are None and `error` says why. A failure of
        the batched encode is retried one video at a time, so it costs only the failing video. Other
        columns pass through.
        """
        rows = len(batch["frames"])
        errors = errors_of(batch, rows)
        todo = []
        for i, frames in enumerate(batch["frames"]):
            if errors[i] is None:
                try:
                    todo.append((i, check_frames(frames, "frames")))
                except ValueError as err:
                    errors[i] = f"encode: {err}"
        done: dict[int, EncodedVideo] = {}
        try:
            done = dict(zip([i for i, _ in todo], self.encode([frames for _, frames in todo]), strict=True))
        except Exception:  # noqa: BLE001 - isolate the failing video(s) below
            for i, frames in todo:
                try:
                    done[i] = self.encode([frames])[0]
                except Exception as err:  # noqa: BLE001 - one video's failure becomes its error
                    errors[i] = f"encode: {type(err).__name__}: {err}"
        hidden = self.model.config.text_config.hidden_size
        out = {key: value for key, value in batch.items() if key != "frames"}
        out["visual_embeds"] = [
            done[i].embeds.float().cpu().numpy() if i in done else np.empty((0, hidden), np.float32)
            for i in range(rows)
        ]
        for key in ("visual_tokens_full", "visual_tokens_after_zip", "visual_tokens_kept", "encode_seconds"):
            out[key] = [getattr(done[i], key) if i in done else None for i in range(rows)]
        out["error"] = errors
        return out
