"""decord backend of the decode stage.

The frame table, timestamps and metadata come from `decode_pyav.PyAVReader` (header and index only,
plus the first frame for rotation and pixel format), so both backends sample the same indices; decord
then decodes them with `get_batch`. decord's own frame list is the pts-sorted list of all packets, the
same order as ours; its count must equal the table's or the request fails rather than mixing up frames.

decord pitfalls handled here:
- A `VideoReader` left alive after `get_batch` keeps decoding in a background thread and grows memory
  by hundreds of MB per second; `seek(0)` stops it, so every read ends with `seek(0)` and drops the
  reader. One reader per call, never shared between threads (sharing one aborts the process).
- decord 0.6 turns pictures upright itself from the mp4/mov "rotate" tag (transpose filters before its
  `scale=W:H` and rgb24 conversion); in other containers it ignores rotation, so a rotated non-mp4 file
  is refused here rather than returned sideways.
- decord cannot resume after a decode error, so `recover=True` re-reads a failing file with PyAV.
"""

from __future__ import annotations

import re

import decord
import numpy as np

from stages.decode import DecodeError, VideoMeta, resized_shape
from stages.decode_pyav import PyAVReader

_ROTATING_CONTAINERS = ("mov", "mp4")
_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


class DecordReader:
    """Same interface as PyAVReader: `timestamps`, `duration`, `meta`, `read(indices)`."""

    def __init__(self, path: str, *, size: int | None = None, threads: int = 0, recover: bool = False):
        # decord's FFmpeg log lines duplicate our DecodeError messages; set on use, not on import
        decord.logging.set_level(decord.logging.QUIET)
        self.path, self.size, self.threads, self.recover = path, size, threads, recover
        self._index = PyAVReader(path, size=size, threads=threads, recover=recover)
        self.timestamps = self._index.timestamps
        self.duration = self._index.duration

    @property
    def meta(self) -> VideoMeta:
        return self._index.meta

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decode the frames at these (unique, ascending) indices: (uint8 [U, H, W, 3], decoded bool [U])."""
        meta = self.meta
        if meta.rotation and not any(c in meta.container.split(",") for c in _ROTATING_CONTAINERS):
            raise DecodeError(
                self.path, f"decord ignores rotation in {meta.container} files; use backend='pyav'"
            )
        width, height = resized_shape(meta.width, meta.height, self.size) if self.size else (-1, -1)
        todo = [int(i) for i in indices]
        try:
            batch = self._get_batch(todo, width, height, meta.num_frames)
        except DecodeError:
            if self.recover:
                return self._index.read(indices)
            raise
        want = (meta.height, meta.width) if self.size is None else (height, width)
        if batch.shape[1:3] != want:
            raise DecodeError(self.path, f"decord returned {batch.shape[1:3]} frames, expected {want}")
        return batch, np.ones(len(todo), dtype=bool)

    def _get_batch(self, todo: list[int], width: int, height: int, num_frames: int) -> np.ndarray:
        try:
            reader = decord.VideoReader(self.path, width=width, height=height, num_threads=self.threads)
        except (decord.DECORDError, RuntimeError) as e:
            raise DecodeError(self.path, f"decord cannot open it ({_first_line(e)})") from None
        try:
            if len(reader) != num_frames:
                raise DecodeError(
                    self.path,
                    f"decord counts {len(reader)} frames, the container {num_frames}; use backend='pyav'",
                )
            return reader.get_batch(todo).asnumpy()
        except decord.DECORDError as e:
            raise DecodeError(self.path, f"decord failed to decode ({_first_line(e)})") from None
        finally:
            try:
                reader.seek(0)  # stops the background decoding thread before the reader is dropped
            except (decord.DECORDError, RuntimeError):
                pass  # a reader whose worker already failed has nothing left running
            del reader

    def close(self) -> None:
        self._index.close()

    def __enter__(self) -> DecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_line(error: Exception) -> str:
    """decord errors carry C++ log prefixes and a stack trace; keep the message itself."""
    lines = [
        line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith("Stack")
    ]
    message = _LOG_PREFIX.sub("", lines[0]) if lines else type(error).__name__
    return message[:300]
