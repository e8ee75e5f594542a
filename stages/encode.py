"""Encode stage: frames of videos -> the visual embeddings Video-LLaVA's LLM reads, shortened.

Per batch of videos: CLIP preprocessing on the model's device, one tower pass over all frames (chunked
by `frame_batch_size`), VisionZip per frame, temporal merging per video on the zipped tokens, then one
projector call. Each video comes out with its own length M, ready for `stages.answer`.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import VideoLlavaForConditionalGeneration

from stages.columns import RowErrors
from stages.model import ModelConfig, load_model
from stages.preprocess import ClipPreprocess, check_frames
from visionzip import merge_frames
from visionzip.baselines import pool_grid
from visionzip.video_llava import COMPRESSION_METHODS, frame_tokens, project, tokens_per_frame


@dataclass
class EncodedVideo:
    """One video's visual embeddings and what the compression did to it."""

    embeds: torch.Tensor  # [M, text_hidden] in the model's dtype, on its device
    visual_tokens_full: int  # T * 257: what Video-LLaVA reads without compression
    visual_tokens_after_zip: int  # T * (dominant + contextual) (= full for compression "none")
    visual_tokens_kept: int  # M, after temporal merging: what the LLM reads
    encode_seconds: float  # the batch's wall time, shared out by frame count


@dataclass
class TemporalConfig:
    """Temporal merging across adjacent frames (`visionzip.merge_frames`)."""

    enabled: bool = False
    threshold: float = 0.9  # cosine similarity above which a token folds into the previous frame's
    max_tokens: int | None = None  # merge further, least similar last, until a video has at most this many


@dataclass
class CompressionConfig:
    """Which visual tokens of each frame the LLM reads (the `compression` config group)."""

    method: str = "visionzip"  # none | visionzip | random | pool (see visionzip.video_llava.frame_tokens)
    dominant: int = 14  # VisionZip's dominant tokens per frame, CLS included
    contextual: int = 3  # VisionZip's merged contextual tokens per frame
    temporal: TemporalConfig = field(default_factory=TemporalConfig)

    def per_frame(self, tokens_per_frame: int) -> int:
        """Tokens a frame keeps, given the model's `tokens_per_frame`."""
        return tokens_per_frame if self.method == "none" else self.dominant + self.contextual

    def problems(self, tokens_per_frame: int | None = None) -> list[str]:
        """Everything wrong with these settings; `tokens_per_frame` (the model's, from its config) adds
        the checks that depend on it."""
        found = []
        if self.method not in COMPRESSION_METHODS:
            found.append(f"method={self.method!r} is not one of {', '.join(COMPRESSION_METHODS)}")
        elif self.method != "none":  # visionzip, and the baselines that keep as many tokens
            if self.dominant < 1:
                found.append(f"dominant={self.dominant} must be >= 1 (it counts the CLS token)")
            if self.contextual < 0:
                found.append(f"contextual={self.contextual} must be >= 0")
            keep = self.dominant + self.contextual
            if tokens_per_frame is not None and keep > tokens_per_frame:
                found.append(f"dominant + contextual = {self.dominant} + {self.contextual} = {keep} exceeds "
                             f"the {tokens_per_frame} tokens of a frame of this model")
            elif tokens_per_frame is not None and self.method == "pool" and self.dominant >= 1:
                try:  # the pooled grid must fit the patch grid
                    pool_grid(keep - 1, math.isqrt(tokens_per_frame - 1))
                except ValueError as err:
                    found.append(f"method=pool: {err}")
        threshold = self.temporal.threshold
        if not -1 <= threshold <= 1:  # a cosine similarity; NaN fails too
            found.append(f"temporal.threshold={threshold} must be in [-1, 1] (a cosine similarity)")
        if self.temporal.max_tokens is not None and self.temporal.max_tokens < 1:
            found.append(f"temporal.max_tokens={self.temporal.max_tokens} must be >= 1 or null")
        return found


class EncodeStage:
    """Frames -> projected visual tokens. A plain callable, and a Ray Data `map_batches` class.

    `model` is a `ModelConfig` (loaded here with only the tower and projector, as a Ray actor does, with
    its tuned projector if it names one) or an already loaded `VideoLlavaForConditionalGeneration`
    (shared with an `AnswerStage` in one process). Preprocessing parameters come from the model
    folder's `preprocessor_config.json`, or CLIP's defaults.
    """

    def __init__(
        self,
        model: ModelConfig | VideoLlavaForConditionalGeneration,
        *,
        compression: CompressionConfig | None = None,
        frame_batch_size: int = 64,
    ) -> None:
        if isinstance(model, ModelConfig):
            model = load_model(model, keep="vision")[0]
        compression = compression or CompressionConfig()
        self.full_per_frame = tokens_per_frame(model.config)
        problems = compression.problems(self.full_per_frame)
        if frame_batch_size < 1:
            problems.append(f"frame_batch_size={frame_batch_size} must be >= 1")
        if problems:
            raise ValueError("invalid compression settings: " + "; ".join(problems))
        self.model = model
        self.preprocess = ClipPreprocess.from_pretrained(model.name_or_path)
        self.compression = compression
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
        per_frame = self.compression.per_frame(self.full_per_frame)
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
        c = self.compression
        # the random control draws each frame's patches from a seed of its own pixels: the same video gives
        # the same tokens whatever batch or runner it goes through
        seeds = [zlib.crc32(np.ascontiguousarray(frame).tobytes()) for frames in videos for frame in frames]
        size = self.frame_batch_size
        tokens = torch.cat([
            frame_tokens(self.model, chunk, method=c.method, dominant=c.dominant, contextual=c.contextual,
                         seed=seeds[start : start + size])
            for start, chunk in zip(range(0, len(pixels), size), pixels.split(size), strict=True)
        ])  # fmt: skip
        return [self._merge(per_video) for per_video in tokens.split([len(frames) for frames in videos])]

    def _merge(self, tokens: torch.Tensor) -> torch.Tensor:
        """[T, K, D] -> [M, D]: temporal merging when enabled (CLS of each frame protected), else flatten."""
        temporal = self.compression.temporal
        if not temporal.enabled:
            return tokens.flatten(0, 1)
        merged = merge_frames(tokens, temporal.threshold, protect_first=True, max_tokens=temporal.max_tokens)
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
        errors = RowErrors(batch, rows)
        todo = []
        for i, frames in enumerate(batch["frames"]):
            if errors.ok(i):
                try:
                    todo.append((i, check_frames(frames, "frames")))
                except ValueError as err:
                    errors.fail(i, f"encode: {err}")
        done: dict[int, EncodedVideo] = {}
        try:
            done = dict(zip([i for i, _ in todo], self.encode([frames for _, frames in todo]), strict=True))
        except Exception:  # noqa: BLE001 - isolate the failing video(s) below
            for i, frames in todo:
                try:
                    done[i] = self.encode([frames])[0]
                except Exception as err:  # noqa: BLE001 - one video's failure becomes its error
                    errors.fail(i, f"encode: {type(err).__name__}: {err}")
        hidden = self.model.config.text_config.hidden_size
        out = {key: value for key, value in batch.items() if key != "frames"}
        out["visual_embeds"] = [
            done[i].embeds.float().cpu().numpy() if i in done else np.empty((0, hidden), np.float32)
            for i in range(rows)
        ]
        for key in ("visual_tokens_full", "visual_tokens_after_zip", "visual_tokens_kept", "encode_seconds"):
            out[key] = [getattr(done[i], key) if i in done else None for i in range(rows)]
        return {**out, **errors.columns()}
