"""Sample videos whose every frame says which frame it is, plus the broken files a decoder must survive.

Tests, benchmarks and the demo all need videos, and nothing may be downloaded, so they are made here
with PyAV (libx264 ships in its bundled FFmpeg). Each frame carries its own frame number as a grid of
large black/white cells in the top three quarters of the picture (18 data bits + 6 check bits), so a
test can read back WHICH frame a decoder returned, even after lossy compression, colour conversion and
downscaling. The bottom quarter is a scrolling colour gradient: it gives the encoder motion and chroma
to work on and makes colour-conversion differences between decoders visible.

Everything is deterministic: the same arguments give the same pictures. (x264 runs with a fixed
thread count, yet within a full test run it has written a few different bytes for the same frames, so
tests compare decoded frames, not files.)
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import Colorspace

GRID_ROWS, GRID_COLS = 4, 6
DATA_BITS = 18  # up to 262143 frames: over 2 hours at 30 fps
CHECK_BITS = GRID_ROWS * GRID_COLS - DATA_BITS
MAX_FRAME_NUMBER = (1 << DATA_BITS) - 1


def _check(n: int) -> int:
    """6-bit check word: an XOR fold of the data bits, offset so that an all-black frame is invalid."""
    return (n ^ (n >> CHECK_BITS) ^ (n >> 2 * CHECK_BITS) ^ 0b101010) & ((1 << CHECK_BITS) - 1)


def _bits(n: int) -> np.ndarray:
    word = n | (_check(n) << DATA_BITS)
    return np.array([(word >> b) & 1 for b in range(GRID_ROWS * GRID_COLS)], dtype=bool)


def _grid_height(height: int) -> int:
    return height * 3 // 4


def frame_image(n: int, width: int, height: int) -> np.ndarray:
    """The upright RGB picture of frame `n`: [height, width, 3] uint8."""
    if not 0 <= n <= MAX_FRAME_NUMBER:
        raise ValueError(f"frame number {n} outside 0..{MAX_FRAME_NUMBER}")
    img = np.empty((height, width, 3), dtype=np.uint8)
    gh = _grid_height(height)
    rows = np.arange(gh) * GRID_ROWS // gh
    cols = np.arange(width) * GRID_COLS // width
    cell = rows[:, None] * GRID_COLS + cols[None, :]
    img[:gh] = (_bits(n)[cell] * 255).astype(np.uint8)[..., None]
    x = np.arange(width)[None, :]
    y = np.arange(height - gh)[:, None]
    img[gh:, :, 0] = (x * 3 + n * 6) % 256
    img[gh:, :, 1] = (y * 255 // max(1, height - gh - 1) + 0 * x).astype(np.uint8)
    img[gh:, :, 2] = 255 - (x * 2 + n * 4) % 256
    return img


def read_frame_number(frame_rgb: np.ndarray) -> int:
    """Read back the frame number drawn by `frame_image` (any size, after lossy coding).

    Raises ValueError when the cells do not form a valid word (wrong orientation, not a sample frame).
    """
    if frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB frame [H, W, 3], got shape {frame_rgb.shape}")
    height, width = frame_rgb.shape[:2]
    gh = _grid_height(height)
    luma = frame_rgb[:gh].astype(np.float32).mean(axis=2)
    word = 0
    for b in range(GRID_ROWS * GRID_COLS):
        r, c = divmod(b, GRID_COLS)
        # the central half of the cell: away from edges blurred by compression and scaling
        y0, y1 = (4 * r + 1) * gh // (4 * GRID_ROWS), (4 * r + 3) * gh // (4 * GRID_ROWS)
        x0, x1 = (4 * c + 1) * width // (4 * GRID_COLS), (4 * c + 3) * width // (4 * GRID_COLS)
        patch = luma[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
        word |= int(patch.mean() > 127.5) << b
    n = word & MAX_FRAME_NUMBER
    if word >> DATA_BITS != _check(n):
        raise ValueError(
            "frame does not carry a valid frame number (wrong orientation or not a sample frame)"
        )
    return n


def write_video(
    path: str | Path,
    num_frames: int,
    width: int = 128,
    height: int = 96,
    fps: int = 25,
    *,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    gop: int | None = None,
    bframes: int = 2,
    preset: str = "veryfast",
    crf: int = 23,
    rotation: int = 0,
    durations_ms: list[int] | None = None,
    audio: bool = False,
    faststart: bool = False,
    threads: int = 1,
    bt709: bool = False,
) -> Path:
    """Write a sample video; returns its path.

    `width`/`height` are the upright (display) size. `rotation` (degrees counter-clockwise, the
    convention of `VideoFrame.rotation`) stores the pictures turned the other way with a display matrix
    that turns them upright again. `faststart` puts the mp4 index (moov) before the data, as streaming
    services do, so a truncated copy still opens. `durations_ms` makes a variable-frame-rate file:
    frame i lasts durations_ms[i % len(durations_ms)] milliseconds (time base 1/1000). `gop` defaults
    to 2 seconds; `bframes`, `preset`, `crf` and `threads` go to libx264. `bt709` converts with the
    BT.709 matrix and tags the stream so (as HD cameras do); untagged streams are read as BT.601.
    """
    path = Path(path)
    if rotation % 90:
        raise ValueError(f"rotation must be a multiple of 90 degrees, got {rotation}")
    k = (rotation // 90) % 4
    stored_w, stored_h = (height, width) if k % 2 else (width, height)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = stored_w, stored_h, pix_fmt
        if codec.startswith("libx264"):
            stream.codec_context.gop_size = gop or 2 * fps
            stream.codec_context.max_b_frames = bframes
            # a fixed thread count keeps x264's output independent of the machine's core count
            stream.options = {"preset": preset, "crf": str(crf), "threads": str(threads)}
        elif gop:
            stream.codec_context.gop_size = gop
        if bt709:
            ctx = stream.codec_context
            ctx.colorspace = ctx.color_primaries = ctx.color_trc = 1  # AVCOL_*_BT709
            ctx.color_range = 1  # limited ("tv") range
        if durations_ms is not None:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        if k:
            stream.set_display_rotation(rotation)
        astream = out.add_stream("aac", rate=16000) if audio else None
        pts = 0
        for n in range(num_frames):
            img = np.ascontiguousarray(np.rot90(frame_image(n, width, height), -k))
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(
                format=pix_fmt, dst_colorspace=Colorspace.ITU709 if bt709 else None
            )
            if durations_ms is not None:
                frame.pts = pts
                frame.time_base = Fraction(1, 1000)
                pts += durations_ms[n % len(durations_ms)]
            else:
                frame.pts = n
                frame.time_base = Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if astream is not None:
            _write_tone(out, astream, num_frames / fps)
    return path


def _write_tone(
    out: av.container.OutputContainer, stream: av.audio.stream.AudioStream, seconds: float
) -> None:
    rate = stream.codec_context.sample_rate
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    chunk = stream.codec_context.frame_size or 1024
    for i in range(0, len(samples), chunk):
        part = samples[i : i + chunk]
        frame = av.AudioFrame.from_ndarray(part[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = i
        out.mux(stream.encode(frame))
    out.mux(stream.encode())


def write_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """An .m4a-style file in an .mp4 container with one AAC stream and no video."""
    path = Path(path)
    with av.open(str(path), mode="w") as out:
        _write_tone(out, out.add_stream("aac", rate=16000), seconds)
    return path


def write_truncated(src: str | Path, dst: str | Path, keep: float = 0.5) -> Path:
    """Copy the first `keep` fraction of the bytes of `src`: a download or copy that stopped midway."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


def write_corrupted(src: str | Path, dst: str | Path, start: float = 0.35, stop: float = 0.65) -> Path:
    """Copy `src` with the bytes between the `start` and `stop` fractions overwritten by seeded noise.

    The container header and index (moov at the end for PyAV-written mp4) stay intact, so the file
    opens and the frames before and after the damaged region still decode.
    """
    data = bytearray(Path(src).read_bytes())
    a, b = int(len(data) * start), int(len(data) * stop)
    data[a:b] = np.random.default_rng(0).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def write_not_a_video(path: str | Path) -> Path:
    """A text file with a video's extension."""
    path = Path(path)
    path.write_text("this is not a video, just text with an .mp4 name\n" * 20)
    return path


def write_empty(path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


VFR_DURATIONS_MS = [40, 40, 80, 20, 120, 40]  # frame display times of the variable-frame-rate sample


def write_sample_set(folder: str | Path, num_frames: int = 100) -> dict[str, Path]:
    """The standard set of good and broken sample files (tests and demo), written into `folder`.

    Good: `plain` (H.264 with B-frames, 25 fps, 2 s GOP), `bt709` (tagged BT.709, like HD cameras),
    `short` (5 frames), `vfr`, `rot90`, `rot180`, `rot270`, `10bit` (yuv420p10le H.264), `gray` and
    `rgba` (PNG in .mov: lossless, so frames equal `frame_image` exactly), `mkv` (H.264 in Matroska:
    no per-frame index, `stream.frames` is 0).
    Broken: `audio_only`, `truncated` (mp4 cut before its index), `truncated_faststart` (index first,
    data cut: opens, later frames missing), `corrupted` (noise over the middle third), `empty`,
    `not_a_video`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = num_frames
    paths = {
        "plain": write_video(folder / "plain.mp4", n),
        "bt709": write_video(folder / "bt709.mp4", 30, bt709=True),
        "short": write_video(folder / "short.mp4", 5),
        "vfr": write_video(folder / "vfr.mp4", n, durations_ms=VFR_DURATIONS_MS),
        "rot90": write_video(folder / "rot90.mp4", 30, rotation=90),
        "rot180": write_video(folder / "rot180.mp4", 30, rotation=180),
        "rot270": write_video(folder / "rot270.mp4", 30, rotation=270),
        "10bit": write_video(folder / "10bit.mp4", 30, pix_fmt="yuv420p10le"),
        "gray": write_video(folder / "gray.mov", 30, codec="png", pix_fmt="gray"),
        "rgba": write_video(folder / "rgba.mov", 30, codec="png", pix_fmt="rgba"),
        "mkv": write_video(folder / "mkv.mkv", n),
        "audio_only": write_audio_only(folder / "audio_only.mp4"),
        "empty": write_empty(folder / "empty.mp4"),
        "not_a_video": write_not_a_video(folder / "not_a_video.mp4"),
    }
    whole = write_video(folder / "whole_faststart.mp4", n, gop=25, faststart=True)
    paths["truncated"] = write_truncated(paths["plain"], folder / "truncated.mp4")
    paths["truncated_faststart"] = write_truncated(whole, folder / "truncated_faststart.mp4")
    paths["corrupted"] = write_corrupted(
        write_video(folder / "whole.mp4", n, gop=25), folder / "corrupted.mp4"
    )
    return paths
