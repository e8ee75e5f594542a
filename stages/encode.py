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
from typing import NamedTuple

import numpy as np
import torch
from transformers import VideoLlavaForConditionalGeneration

from stages.columns import RowErrors, to_column
from stages.model import ModelConfig, load_model
from stages.preprocess import ClipPreprocess, check_frames
from visionzip import MergeResult, ZipResult, merge_frames, zip_clip
from visionzip.baselines import pool_grid, random_patch_index
from visionzip.positions import clip_positions, pool_offsets, position_order, zip_offsets
from visionzip.temporal import MATCH_MODES, POSITION_MODES
from visionzip.video_llava import COMPRESSION_METHODS, feature_layer, frame_tokens, project, tokens_per_frame

POSITION_RULES: tuple[str, ...] = ("compact", "original")


@dataclass
class EncodedVideo:
    """One video's visual embeddings and what the compression did to it."""

    embeds: torch.Tensor  # [M, text_hidden] in the model's dtype, on its device
    visual_tokens_full: int  # T * 257: what Video-LLaVA reads without compression
    visual_tokens_after_zip: int  # T * (dominant + contextual) (= full for compression "none")
    visual_tokens_kept: int  # M, after temporal merging: what the LLM reads
    encode_seconds: float  # the batch's wall time, shared out by frame count
    positions: torch.Tensor | None = None  # [M] long: each token's place among all tokens (`original`)
    span: int | None = None  # with positions: T * tokens_per_frame, where the text after the video goes


@dataclass
class CompressedVideo:
    """One video's tokens before the projector and, with `positions=original`, where each stands."""

    tokens: torch.Tensor  # [M, vision_hidden] in the model's dtype
    positions: torch.Tensor | None = None  # [M] long, non-decreasing (`visionzip.positions`); None: compact
    span: int | None = None  # with positions: the full token count T * tokens_per_frame


class FrameTokens(NamedTuple):
    """One chunk of frames' kept tokens and what is known of their places (`EncodeStage._frame_tokens`)."""

    tokens: torch.Tensor  # [F, K, D]
    patches: torch.Tensor | None  # [F, K]: patch positions for temporal merging's position modes, else None
    offsets: torch.Tensor | None  # [F, K]: offsets within the frame for positions=original, else None


@dataclass
class TokenSelection:
    """What VisionZip and temporal merging kept of one video's frames (`EncodeStage.selection`)."""

    pixels: torch.Tensor  # [T, 3, H, W]: the preprocessed frames the tower saw
    zipped: ZipResult  # per frame: dominant_index, contextual_assignment
    merged: MergeResult | None  # temporal merging (group_of: each token's group); None when it is off


@dataclass
class TemporalConfig:
    """Temporal merging across adjacent frames (`visionzip.merge_frames`)."""

    enabled: bool = False
    threshold: float = 0.9  # cosine similarity above which a token folds into the previous frame's
    max_tokens: int | None = None  # merge further, least similar last, until a video has at most this many
    # which token of frame t-1 a token may fold into: any (its best match anywhere), same (the token at its
    # patch position), radius (within `radius` patches), prune (as same, but dropped, not averaged: vLLM's
    # static-patch pruning); see visionzip.temporal. Tokens without a position (CLS, contextual) never fold
    # in the position modes; method=pool has no positions, so it takes only `any`.
    match: str = "any"
    radius: int = 1  # patches (Chebyshev distance), for match=radius
    # position modes: VisionZip's contextual token j may fold into contextual token j of frame t-1 (its
    # slot: the same rank among the frame's merged background) instead of never folding
    fold_contextual: bool = False


@dataclass
class CompressionConfig:
    """Which visual tokens of each frame the LLM reads (the `compression` config group)."""

    method: str = "visionzip"  # none | visionzip | random | pool (see visionzip.video_llava.frame_tokens)
    dominant: int = 14  # VisionZip's dominant tokens per frame, CLS included
    contextual: int = 3  # VisionZip's merged contextual tokens per frame
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    # where the kept tokens stand in the LLM's sequence: original (each at its place among all of the clip's
    # tokens, the text after the video where it is with every token; visionzip.positions) or compact
    # (renumbered 0..M-1, VisionZip's way; the only rule vLLM can take). original was chosen on val500 by
    # the quality rule on both shipped models (docs/quality.md)
    positions: str = "original"

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
        match = self.temporal.match
        if match not in MATCH_MODES:
            found.append(f"temporal.match={match!r} is not one of {', '.join(MATCH_MODES)}")
        elif match in POSITION_MODES and self.method == "pool" and self.temporal.enabled:
            found.append(f"temporal.match={match!r} folds tokens by patch position and method=pool has no "
                         "positions (its tokens are pooled cells): use temporal.match=any")
        if isinstance(self.temporal.radius, bool) or not isinstance(self.temporal.radius, int) \
                or self.temporal.radius < 0:
            found.append(f"temporal.radius={self.temporal.radius!r} must be an integer >= 0 (patches)")
        if self.positions not in POSITION_RULES:
            found.append(f"positions={self.positions!r} is not one of {', '.join(POSITION_RULES)}")
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
        kept = self.compressed_videos(videos)
        if not kept:
            return []
        embeds = project(self.model, torch.cat([video.tokens for video in kept])).split(
            [len(video.tokens) for video in kept])
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
                positions=video.positions,
                span=video.span,
            )
            for emb, n, video in zip(embeds, counts, kept, strict=True)
        ]

    def compressed_tokens(self, videos: Sequence[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Each video's tokens before the projector (`compressed_videos`' tokens)."""
        return [video.tokens for video in self.compressed_videos(videos)]

    @torch.inference_mode()
    def compressed_videos(self, videos: Sequence[np.ndarray | torch.Tensor]) -> list[CompressedVideo]:
        """Each video's tokens before the projector, [M, vision_hidden] in the model's dtype: the tower's
        selection-layer tokens after VisionZip (or a control) and temporal merging, with their positions
        for `positions=original` (in position order). `encode` projects them; projector tuning
        (`pipelines.tune`) trains on them."""
        videos = [check_frames(frames, f"frames of video {i}") for i, frames in enumerate(videos)]
        if not videos:
            return []
        device, dtype = self.model.device, self.model.dtype
        pixels = torch.cat([self.preprocess(frames, device, dtype) for frames in videos])
        # the random control draws each frame's patches from a seed of its own pixels: the same video gives
        # the same tokens whatever batch or runner it goes through
        seeds = [zlib.crc32(np.ascontiguousarray(frame).tobytes()) for frames in videos for frame in frames]
        size = self.frame_batch_size
        chunks = [self._frame_tokens(chunk, seeds[start : start + size])
                  for start, chunk in zip(range(0, len(pixels), size), pixels.split(size), strict=True)]
        counts = [len(frames) for frames in videos]

        def per_video(part: str) -> list[torch.Tensor | None]:
            if getattr(chunks[0], part) is None:
                return [None] * len(videos)
            return list(torch.cat([getattr(chunk, part) for chunk in chunks]).split(counts))

        return [self._compress(*parts) for parts in
                zip(per_video("tokens"), per_video("patches"), per_video("offsets"), strict=True)]

    def _frame_tokens(self, pixels: torch.Tensor, seeds: list[int]) -> FrameTokens:
        """One chunk's per-frame tokens [F, K, D] with, when temporal merging folds by position, each
        token's patch position [F, K] (raster order of the patch grid, CLS excluded; -1: none, i.e. CLS,
        contextual and pooled tokens; with `fold_contextual` contextual token j is slot -2 - j) and, for
        `positions=original`, each token's offset within its frame [F, K] (`visionzip.positions`)."""
        c = self.compression
        positional = c.temporal.enabled and c.temporal.match in POSITION_MODES
        original = c.positions == "original"
        if c.method == "visionzip" and (positional or original):  # frame_tokens' call, keeping the indices
            zipped = self._zip(pixels)
            return FrameTokens(zipped.tokens, self._zip_positions(zipped) if positional else None,
                               zip_offsets(zipped) if original else None)
        tokens = frame_tokens(self.model, pixels, method=c.method, dominant=c.dominant,
                              contextual=c.contextual, seed=seeds)
        if not (positional or original):
            return FrameTokens(tokens, None, None)
        frames, k, _ = tokens.shape
        if c.method == "pool":  # cells, not patches: no patch position, each at its window's centre
            patches = torch.full((frames, k), -1, device=tokens.device)
            offsets = pool_offsets(self.full_per_frame, k).to(tokens.device).expand(frames, k)
        else:
            offsets = (torch.arange(k, device=tokens.device).expand(frames, k) if c.method == "none"
                       else random_patch_index(frames, self.full_per_frame, k, seeds, tokens.device))
            patches = offsets - 1
        return FrameTokens(tokens, patches if positional else None, offsets if original else None)

    def _zip(self, pixels: torch.Tensor) -> ZipResult:
        """VisionZip on preprocessed frames, as `frame_tokens` runs it for method=visionzip."""
        c = self.compression
        return zip_clip(self.model.model.video_tower, pixels, dominant=c.dominant, contextual=c.contextual,
                        layer=feature_layer(self.model))

    def _zip_positions(self, zipped: ZipResult) -> torch.Tensor:
        """[F, K] patch position of each VisionZip token for the position modes (see `_frame_tokens`)."""
        c = self.compression
        slots = -2 - torch.arange(c.contextual, device=zipped.tokens.device)  # contextual token j: slot j
        contextual = slots if c.temporal.fold_contextual else torch.full_like(slots, -1)
        return torch.cat([zipped.dominant_index - 1, contextual.expand(len(zipped.tokens), -1)], dim=1)

    def _compress(self, tokens: torch.Tensor, patches: torch.Tensor | None, offsets: torch.Tensor | None
                  ) -> CompressedVideo:
        """One video's [T, K, D] tokens -> [M, D]: temporal merging when enabled (CLS of each frame
        protected; `patches` [T, K] for the position modes), else flattened. With `offsets` [T, K]
        (positions=original) each kept token's place among all T * tokens_per_frame, a merged group at its
        first member's, the tokens put in position order."""
        merged = self._merge_result(tokens, patches) if self.compression.temporal.enabled else None
        kept = tokens.flatten(0, 1) if merged is None else merged.tokens
        if offsets is None:
            return CompressedVideo(kept)
        positions = clip_positions(offsets, self.full_per_frame, None if merged is None else merged.first)
        order = position_order(positions)
        return CompressedVideo(kept[order], positions[order], len(tokens) * self.full_per_frame)

    def _merge_result(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> MergeResult:
        """`merge_frames` of one video's [T, K, D] tokens with the job's temporal settings."""
        temporal = self.compression.temporal
        return merge_frames(tokens, temporal.threshold, protect_first=True, max_tokens=temporal.max_tokens,
                            match=temporal.match, positions=positions, radius=temporal.radius,
                            grid_width=math.isqrt(self.full_per_frame - 1))  # fmt: skip

    @torch.inference_mode()
    def selection(self, frames: np.ndarray | torch.Tensor) -> TokenSelection:
        """Which patches of one video's frames (uint8 [T, H, W, 3]) VisionZip keeps, merges into its
        contextual tokens, and temporal merging folds: the same calls `encode` makes, for pictures
        (`pipelines.show_kept`). Needs compression method=visionzip."""
        if self.compression.method != "visionzip":
            raise ValueError(f"compression.method={self.compression.method!r}: the selection is VisionZip's, "
                             "use compression=visionzip or compression=visionzip_temporal")
        frames = check_frames(frames, "frames")
        pixels = self.preprocess(frames, self.model.device, self.model.dtype)
        zipped = self._zip(pixels)
        merged = (self._merge_result(zipped.tokens, self._zip_positions(zipped))
                  if self.compression.temporal.enabled else None)
        return TokenSelection(pixels, zipped, merged)

    def __call__(self, batch: dict) -> dict:
        """Ray Data / local batch: column `frames` (uint8 [T, H, W, 3] per row) -> embeddings and stats.

        Adds `visual_embeds` (numpy [M, text_hidden] in the model's dtype, bfloat16 as its int16 bits:
        `stages.columns.to_column`) with `visual_embeds_dtype`,
        `visual_tokens_full`, `visual_tokens_after_zip`, `visual_tokens_kept`, `encode_seconds` and
        `error` (with `positions=original` also `visual_positions`, [M] int64, and `visual_span`, the
        answer stage's `Video.positions` and `Video.span`); drops `frames` so decoded pixels do not travel
        further. A row that arrives with an `error`
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
        empty = torch.empty(0, hidden, dtype=self.model.dtype)
        columns = [to_column(done[i].embeds if i in done else empty) for i in range(rows)]
        out["visual_embeds"] = [array for array, _ in columns]
        out["visual_embeds_dtype"] = [dtype for _, dtype in columns]
        for key in ("visual_tokens_full", "visual_tokens_after_zip", "visual_tokens_kept", "encode_seconds"):
            out[key] = [getattr(done[i], key) if i in done else None for i in range(rows)]
        if self.compression.positions == "original":
            none = np.zeros(0, dtype=np.int64)  # an error row's: empty, as its embeddings
            out["visual_positions"] = [done[i].positions.cpu().numpy() if i in done else none
                                       for i in range(rows)]
            out["visual_span"] = [done[i].span if i in done else None for i in range(rows)]
        return {**out, **errors.columns()}
