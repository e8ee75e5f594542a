"""Decode stage: a handful of exact frames from (long) videos, two interchangeable backends.

`read_frames(path, ...)` returns `Frames` (uint8 RGB [T, H, W, 3], frame indices, timestamps, metadata);
`DecodeStage` wraps it for batches (Ray Data `map_batches` or plain calls) and turns every failure into an
error row. The backends (`decode_pyav`, `decode_decord`) only open a file, list its frames and decode the
frames asked for; everything else - which frames to take - is decided here by pure functions, so the
same request gives the same frames whichever backend runs it.

Semantics, shared by both backends:
- Frame index i = the i-th frame in presentation order: the order the decoder outputs frames and a
  player shows them, which is the frames sorted by pts except in files whose pts are attached to the
  wrong pictures (AVI with packed B-frames). Variable frame rate does not change this: indices count
  frames, timestamps come from each frame's pts.
- Frame count and timestamps are those of the frames that really decode. They come from the frame table
  of `decode_pyav` (see that module): for most files counted from the container without decoding (the
  sample index, or a demux-only scan of the packets); for GIF, whose demuxer can list a packet that is
  no picture, from decoding every frame. A counted table can still be wrong (a packet with no frame, a
  broken index): when a read finds that out, the reader rebuilds the table by decoding and the request
  is sampled again from it, so a phantom frame gives the right frames, not an error. `stream.frames` in
  the header is not trusted (0 for mkv/webm, wrong for some files). A timestamp is the frame's pts in
  seconds counted from the first frame's pts, so the first frame is at 0.0.
- Window (`start`/`end` seconds, default the whole video): the frames shown at some moment of
  [start, end), i.e. from the frame on screen at `start` to the last frame that starts before `end`.
  `start` at or past the end of the video, or `end` past it, is an error (a clip the video does not
  contain is a bad request, not something to clamp silently).
- `uniform`: n frames spread evenly over the window, exactly as Video-LLaVA's reference samples a video
  for training and evaluation (`load_and_transform_video` in its languagebind/video/processing_video.py;
  the decord backend, its config's default, and the opencv one run `np.linspace(0, duration-1,
  num_frames, dtype=int)` with `duration` the frame count: positions truncated). A window is sampled as
  if it were the whole video: first + that line over the window's frames.
  `rounding=round` rounds the positions half up instead (this project's rule before it followed the
  reference; it can differ by one frame). Short-video policy, the reference's: the output always has
  exactly n frames; a window with fewer than n frames repeats frames (several positions land on one
  frame), because Video-LLaVA needs a fixed frame count. Repeated frames are decoded once.
- `fps`: the frame on screen at start, start + 1/fps, ... (before end); more than `max_frames` such
  times are thinned evenly (the same spread, with the same `rounding`, over the candidates). A rate
  above the video's repeats frames, like `uniform` does.
- `indices`: exactly those frame indices, in the order given (repeats allowed).
- `size`: the shortest side is scaled to `size` (up or down), aspect kept, inside the decoder's filter
  graph, so full-size frames never leave the backend. Rotation metadata is applied first, so frames are
  upright and `meta.width/height` are the upright size before resizing.
- Bit-identical backends: both convert with FFmpeg's `scale` filter (bilinear) to rgb24 after the
  rotation transposes, so for 8-bit sources frames are identical at any size. The known exceptions are
  both at native size, where decord's FFmpeg 4.1 and PyAV's newer FFmpeg take different unscaled
  conversion paths: high-bit-depth sources (e.g. yuv420p10le; mean difference about 1 level) and
  4:2:0 sources with an odd width or height (e.g. 427x241 VP9: mean 0.3 levels, at most 12); resized
  to any other size, they match.
- `recover=True`: frames that cannot be decoded (corrupt or missing data) are left out instead of
  failing the whole request; `Frames.dropped` lists them. It is an error only if nothing decodes.
- A backend that cannot read a file says so, and names the other where that one reads it (decord
  cannot read GIF at all: "decord cannot read GIF files ...; decode.backend=pyav reads it"). It never
  switches backends by itself: the two may differ on such files (that is why one fails), and the
  output fingerprint records the backend.

Backend contract (see BACKENDS): a reader class `(path, *, size, threads, recover, remote)` used as a
context manager (`path` a file or a URL, `remote` the URL's transfer settings), with `timestamps`
(float64 [N]), `duration`, `meta` and `read(unique ascending indices) -> (uint8 [U, H, W, 3], decoded
bool [U])`, which may raise FrameTableChanged once (then `timestamps` and `duration` are the new
table's, and the caller samples again). A reader is opened per call and used by one thread only.
"""

from __future__ import annotations

import importlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from stages.columns import RowErrors, is_missing
from stages.remote import RemoteConfig, RemoteError, is_remote, local_path

BACKENDS = {"pyav": "stages.decode_pyav:PyAVReader", "decord": "stages.decode_decord:DecordReader"}
DEFAULT_BACKEND = "pyav"  # faster for sparse requests on long videos: see bench/results/decode.json
STRATEGIES = ("uniform", "fps", "indices")
ROUNDINGS = ("truncate", "round")  # how an even spread lands on frames: Video-LLaVA's reference, or half up


class DecodeError(Exception):
    """A video could not be decoded as requested; the message names the file and the cause."""

    def __init__(self, path: str | os.PathLike, cause: str):
        super().__init__(f"{os.fspath(path)}: {cause}")
        self.path = os.fspath(path)
        self.cause = cause


class FrameTableChanged(Exception):
    """A reader found that its frame table listed frames that do not decode as listed, and rebuilt it
    from decoding: the request must be sampled again from the reader's new `timestamps`."""

    def __init__(self, path: str | os.PathLike, why: str):
        super().__init__(f"{os.fspath(path)}: frame table rebuilt from decoding: {why}")


@dataclass(frozen=True)
class VideoMeta:
    """What the source says about itself (before any resize)."""

    path: str
    duration: float  # seconds, from the first frame's start to the last frame's end
    fps: float  # average frame rate
    num_frames: int  # frames in the frame table
    width: int  # upright width (rotation applied)
    height: int
    codec: str
    pix_fmt: str
    rotation: int  # degrees counter-clockwise the stored pictures are turned for display: 0/90/180/270
    variable_frame_rate: bool
    container: str


@dataclass
class Frames:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB
    indices: np.ndarray  # int64 [T] frame index of each output frame
    timestamps: np.ndarray  # float64 [T] seconds
    meta: VideoMeta
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # only with recover=True


# ---------------------------------------------------------------- pure sampling logic (both backends)


def even_spread(first: int, last: int, n: int, rounding: str = "truncate") -> np.ndarray:
    """n indices spread evenly over first..last (both included), int64.

    `truncate`: Video-LLaVA's reference line on the range as if it were a whole video,
    first + np.linspace(0, last - first, n, dtype=int); `round`: round(linspace(first, last, n)), halves up.
    """
    if rounding == "truncate":
        return first + np.linspace(0, last - first, n, dtype=np.int64)
    if rounding == "round":
        return np.floor(np.linspace(first, last, n) + 0.5).astype(np.int64)
    raise ValueError(f"rounding={rounding!r}: choose one of {', '.join(ROUNDINGS)}")


def frame_window(
    timestamps: np.ndarray, duration: float, start: float | None, end: float | None
) -> tuple[int, int]:
    """First and last (inclusive) frame index shown during [start, end) seconds."""
    start = 0.0 if start is None else float(start)
    end = duration if end is None else float(end)
    eps = 1e-6
    if start >= duration - eps:
        raise ValueError(f"start={start:g} s is at or past the end of the video (duration {duration:.3f} s)")
    if end > duration + eps:
        raise ValueError(f"end={end:g} s is past the end of the video (duration {duration:.3f} s)")
    first = max(0, int(np.searchsorted(timestamps, start + eps, side="right")) - 1)
    last = int(np.searchsorted(timestamps, end - eps, side="left")) - 1
    return first, max(first, last)


def fps_times(
    start: float, end: float, fps: float, max_frames: int, rounding: str = "truncate"
) -> np.ndarray:
    """Sampling times start, start + 1/fps, ... before end, thinned evenly to at most max_frames."""
    count = max(1, math.ceil((end - start) * fps - 1e-9))
    times = start + np.arange(count) / fps
    if count > max_frames:
        times = times[even_spread(0, count - 1, max_frames, rounding)]
    return times


def sample_indices(
    timestamps: np.ndarray,
    duration: float,
    *,
    strategy: str = "uniform",
    num_frames: int = 8,
    start: float | None = None,
    end: float | None = None,
    fps: float | None = None,
    max_frames: int = 64,
    indices: Sequence[int] | np.ndarray | None = None,
    rounding: str = "truncate",
) -> np.ndarray:
    """The frame indices a request asks for, given the video's frame timestamps (see module docstring).

    Raises ValueError when the request does not fit this video (window or indices outside it).
    """
    n = len(timestamps)
    if strategy == "indices":
        wanted = np.asarray(indices, dtype=np.int64)
        outside = wanted[(wanted < 0) | (wanted >= n)]
        if outside.size:
            raise ValueError(f"frame indices {outside.tolist()[:5]} outside 0..{n - 1} ({n} frames)")
        return wanted
    first, last = frame_window(timestamps, duration, start, end)
    if strategy == "uniform":
        return even_spread(first, last, num_frames, rounding)
    window_start = float(timestamps[first]) if start is None else float(start)
    window_end = duration if end is None else float(end)
    times = fps_times(window_start, window_end, fps, max_frames, rounding)
    picked = np.searchsorted(timestamps, times + 1e-6, side="right") - 1
    return np.clip(picked, first, last).astype(np.int64)


def resized_shape(width: int, height: int, size: int | None) -> tuple[int, int]:
    """(width, height) with the shortest side scaled to `size`, aspect kept (rounded half up)."""
    if size is None:
        return width, height
    short = min(width, height)
    scale = size / short
    if width <= height:
        return size, max(1, int(height * scale + 0.5))
    return max(1, int(width * scale + 0.5)), size


def request_problems(
    *,
    strategy: str = "uniform",
    num_frames: int = 8,
    start: float | None = None,
    end: float | None = None,
    fps: float | None = None,
    max_frames: int = 64,
    indices: Sequence[int] | np.ndarray | None = None,
    size: int | None = None,
    backend: str = DEFAULT_BACKEND,
    threads: int = 0,
    rounding: str = "truncate",
) -> list[str]:
    """Everything wrong with a request whatever the video, each problem naming its argument: the one
    place decode settings are checked (`DecodeConfig.problems`, `read_frames`)."""
    problems = []
    if backend not in BACKENDS:
        problems.append(f"backend={backend!r}: unknown decode backend; choose one of {', '.join(BACKENDS)}")
    if strategy not in STRATEGIES:
        problems.append(f"strategy={strategy!r}: unknown sampling strategy; choose one of "
                        f"{', '.join(STRATEGIES)}")
    if rounding not in ROUNDINGS:
        problems.append(f"rounding={rounding!r}: choose one of {', '.join(ROUNDINGS)} (truncate: "
                        "Video-LLaVA's reference sampling)")
    if strategy == "uniform" and num_frames < 1:
        problems.append(f"num_frames={num_frames} must be >= 1")
    if strategy == "fps" and (fps is None or not fps > 0):
        problems.append(f"fps={fps}: strategy 'fps' needs fps > 0")
    if max_frames < 1:
        problems.append(f"max_frames={max_frames} must be >= 1")
    if strategy != "fps" and fps is not None and not fps > 0:
        problems.append(f"fps={fps} must be > 0 or None")
    if strategy == "indices":
        if indices is None or len(indices) == 0:
            problems.append("indices: strategy 'indices' needs a non-empty `indices`")
        if start is not None or end is not None:
            problems.append("start/end do not apply to strategy 'indices' (indices are absolute)")
    elif indices is not None:
        problems.append(f"indices given with strategy {strategy!r}; use strategy='indices'")
    if start is not None and start < 0:
        problems.append(f"start must be >= 0 seconds, got {start}")
    if start is not None and end is not None and end <= start:
        problems.append(f"end ({end}) must be after start ({start})")
    if size is not None and size < 1:
        problems.append(f"size must be >= 1 pixel or None, got {size}")
    if threads < 0:
        problems.append(f"threads={threads} must be >= 0 (0 = FFmpeg's choice)")
    return problems


@dataclass
class DecodeConfig:
    """How a video is sampled and decoded (the `decode` config group; semantics in the module doc)."""

    backend: str = DEFAULT_BACKEND
    num_frames: int = 8  # strategy uniform: Video-LLaVA's default
    strategy: str = "uniform"  # uniform | fps (per video; `indices` is for `read_frames` only)
    rounding: str = "truncate"  # even spreads (uniform, fps thinning): truncate (Video-LLaVA's) | round
    fps: float | None = None  # strategy fps: one frame every 1/fps seconds ...
    max_frames: int = 64  # ... evenly thinned past this cap
    size: int | None = 224  # shortest side resized at decode time (None: keep)
    recover: bool = False  # leave out frames that cannot be decoded instead of failing the video
    threads: int = 1  # decoder threads per video (0 = FFmpeg's choice); 1 matches a decode actor's 1 CPU
    remote: RemoteConfig = field(default_factory=RemoteConfig)  # URL videos: tries, timeout, block sizes

    def problems(self) -> list[str]:
        found = request_problems(**{k: v for k, v in asdict(self).items() if k not in ("recover", "remote")})
        if self.strategy == "indices":
            found.append("strategy 'indices' is for read_frames only: a stage samples each video itself")
        return found + [f"remote.{problem}" for problem in self.remote.problems()]


def _raise_problems(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"invalid {what}: " + "; ".join(problems))


# ---------------------------------------------------------------- entry point


def _reader_class(backend: str) -> type:
    module, name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), name)


def read_frames(
    path: str | os.PathLike,
    *,
    num_frames: int = 8,
    strategy: str = "uniform",
    backend: str = DEFAULT_BACKEND,
    start: float | None = None,
    end: float | None = None,
    fps: float | None = None,
    max_frames: int = 64,
    indices: Sequence[int] | np.ndarray | None = None,
    size: int | None = None,
    recover: bool = False,
    threads: int = 0,
    rounding: str = "truncate",
    remote: RemoteConfig | None = None,
) -> Frames:
    """Decode the frames a request asks for from one video file (semantics: module docstring).

    Raises ValueError for a request that is wrong whatever the video, DecodeError (naming the file) for
    everything about this file: missing, unreadable, no video stream, window outside it, corrupt data.
    `threads` = decoder threads (0 = FFmpeg's choice; 1 inside single-CPU workers). `path` may be a URL,
    read with `remote`'s settings (`stages.remote`); a transfer that fails is a DecodeError too.
    """
    _raise_problems(request_problems(strategy=strategy, num_frames=num_frames, start=start, end=end, fps=fps,
                                     max_frames=max_frames, indices=indices, size=size, backend=backend,
                                     threads=threads, rounding=rounding), "decode request")
    path = local_path(os.fspath(path))
    if not is_remote(path) and not Path(path).is_file():
        raise DecodeError(path, "no such file" if not Path(path).exists() else "not a regular file")

    def sample(reader) -> np.ndarray:
        try:
            return sample_indices(reader.timestamps, reader.duration, strategy=strategy,
                                  num_frames=num_frames, start=start, end=end, fps=fps,
                                  max_frames=max_frames, indices=indices, rounding=rounding)
        except ValueError as e:
            raise DecodeError(path, str(e)) from None

    try:
        reader_class = _reader_class(backend)
        with reader_class(path, size=size, threads=threads, recover=recover, remote=remote) as reader:
            wanted = sample(reader)
            unique = np.unique(wanted)
            try:
                frames, decoded = reader.read(unique)
            except FrameTableChanged:  # the table counted frames that do not decode; now it lists those
                wanted = sample(reader)
                unique = np.unique(wanted)
                frames, decoded = reader.read(unique)
            meta = reader.meta
    except RemoteError as e:  # opening the URL, or a read inside FFmpeg, failed after its retries
        raise DecodeError(path, e.cause) from None
    slot = np.searchsorted(unique, wanted)
    keep = decoded[slot]
    if not keep.any():
        raise DecodeError(path, f"none of the {len(wanted)} requested frames could be decoded")
    slot = slot[keep]
    if len(slot) != len(frames) or (slot != np.arange(len(frames))).any():
        frames = frames[slot]  # repeats, order or dropped frames: one gather; otherwise no copy at all
    kept = wanted[keep]
    return Frames(
        frames=frames,
        indices=kept,
        timestamps=reader.timestamps[kept].astype(np.float64),
        meta=meta,
        dropped=np.unique(wanted[~keep]),
    )


# ---------------------------------------------------------------- stage


def _optional_seconds(column: object, row: int) -> float | None:
    """A start/end cell: None, NaN (a null from Arrow/pandas) and missing columns mean 'not given'."""
    if column is None:
        return None
    value = column[row]
    return None if is_missing(value) else float(value)


class DecodeStage:
    """Batch stage: column `video` (paths) and optional `start`/`end` seconds -> frames per row.

    Adds columns `frames` (uint8 [T, H, W, 3]), `frame_indices` (int64 [T]), `timestamps` (float64 [T]),
    `decode_seconds` (float64) and `error` (None or a message naming the file). A bad video becomes an
    error row with empty arrays (T = 0; empty rather than None so Ray Data can still store the column as
    a tensor column); it never raises out of the stage.
    Each call opens and releases its own readers, so one instance may serve one thread at a time and
    nothing is shared between threads (decord aborts when a reader is shared).
    """

    def __init__(self, config: DecodeConfig | None = None) -> None:
        config = config or DecodeConfig()
        _raise_problems(config.problems(), "decode settings")
        self.options = {**asdict(config), "remote": config.remote}

    def __call__(self, batch: dict[str, np.ndarray | list]) -> dict:
        videos = list(batch["video"])
        starts, ends = batch.get("start"), batch.get("end")
        out: dict[str, list] = {"frames": [], "frame_indices": [], "timestamps": []}
        errors = RowErrors({}, len(videos))
        seconds = np.zeros(len(videos), dtype=np.float64)
        for row, video in enumerate(videos):
            t0 = time.perf_counter()
            try:
                got = read_frames(
                    str(video),
                    start=_optional_seconds(starts, row),
                    end=_optional_seconds(ends, row),
                    **self.options,
                )
                out["frames"].append(got.frames)
                out["frame_indices"].append(got.indices)
                out["timestamps"].append(got.timestamps)
            except Exception as e:  # noqa: BLE001 - any failure of one video becomes its error row
                message = str(e) if isinstance(e, DecodeError) else f"{video}: {type(e).__name__}: {e}"
                errors.fail(row, message)
                out["frames"].append(np.empty((0, 0, 0, 3), np.uint8))
                out["frame_indices"].append(np.empty(0, np.int64))
                out["timestamps"].append(np.empty(0, np.float64))
            seconds[row] = time.perf_counter() - t0
        return {**batch, **out, **errors.columns(), "decode_seconds": seconds}
