"""decord backend of the decode stage.

The frame table, timestamps and metadata come from `decode_pyav.PyAVReader` (header and index only,
plus the first frame for rotation and pixel format; for GIF a full decode), so both backends sample the
same indices; decord then decodes them with `get_batch`. decord's own frame list is the pts-sorted list
of all packets, the same order as ours; its count must equal the table's or the request fails rather
than mixing up frames. decord cannot tell a packet that is no picture (a phantom frame) from a frame,
so wanted frames in the last GOP, where such packets mostly are, are first decoded by PyAV (one GOP
more per read); a phantom found there rebuilds the table and makes the counts differ, an error that
names pyav. A phantom earlier in a long file shifts decord's indices after it by one, unnoticed.
The same PyAV pictures check decord's: near the end of a file with delayed output (B-frames whose pts
do not follow the pictures' order), decord can return the previous wanted picture again - with one
thread nearly always, with its own threads now and then - and a picture that is not the one PyAV
decoded (`_misread`) is refused, naming pyav.

A file decord cannot read is an error that says why and whether `decode.backend=pyav` reads it: the
PyAV reader tries the same frames, and the message names it only when it succeeds. There is no silent
switch (the frames could differ from decord's, under the same fingerprint). decord 0.6 cannot read
GIF at all (every GIF fails with "broken metadata"), so GIFs are refused without trying.

decord pitfalls handled here:
- A `VideoReader` left alive after `get_batch` keeps decoding in a background thread and grows memory
  by hundreds of MB per second; `seek(0)` stops it, so every read ends with `seek(0)` and drops the
  reader. One reader per call, never shared between threads (sharing one aborts the process).
- decord 0.6 turns pictures upright itself from the mp4/mov "rotate" tag (transpose filters before its
  `scale=W:H` and rgb24 conversion); in other containers it ignores rotation, so a rotated non-mp4 file
  is refused here rather than returned sideways.
- decord cannot resume after a decode error, so `recover=True` re-reads a failing file with PyAV.
- decord reads only local files (given a file object it reads the whole object into memory), so a URL
  video is downloaded whole to a temporary file first (`stages.remote.download`), deleted on `close`;
  `decode.backend=pyav` reads only the byte ranges it needs.
"""

from __future__ import annotations

import os
import posixpath
import re
from urllib.parse import urlsplit

import decord
import numpy as np

from stages.decode import DecodeError, VideoMeta, resized_shape
from stages.decode_pyav import PyAVReader
from stages.remote import RemoteConfig, download, is_remote

_ROTATING_CONTAINERS = ("mov", "mp4")
_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


class DecordReader:
    """Same interface as PyAVReader: `timestamps`, `duration`, `meta`, `read(indices)`."""

    def __init__(self, path: str, *, size: int | None = None, threads: int = 0, recover: bool = False,
                 remote: RemoteConfig | None = None):
        # decord's FFmpeg log lines duplicate our DecodeError messages; set on use, not on import
        decord.logging.set_level(decord.logging.QUIET)
        self.path, self.size, self.threads, self.recover = path, size, threads, recover
        suffix = posixpath.splitext(urlsplit(path).path)[1]
        self._copy = download(path, remote, suffix=suffix) if is_remote(path) else None  # decord needs a file
        try:
            self._index = PyAVReader(path, size=size, threads=threads, recover=recover, local_copy=self._copy)
        except BaseException:
            self._drop_copy()
            raise

    @property
    def timestamps(self) -> np.ndarray:
        return self._index.timestamps  # the PyAV reader's, also after it rebuilt its table

    @property
    def duration(self) -> float:
        return self._index.duration

    @property
    def meta(self) -> VideoMeta:
        return self._index.meta

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decode the frames at these (unique, ascending) indices: (uint8 [U, H, W, 3], decoded bool [U])."""
        meta = self.meta
        containers = meta.container.split(",")
        if "gif" in containers:
            raise self._refusal("decord 0.6 cannot read GIF files", indices)
        if meta.rotation and not any(c in containers for c in _ROTATING_CONTAINERS):
            raise self._refusal(f"decord ignores rotation in {meta.container} files", indices)
        tail = self._last_gop_pictures(indices)
        width, height = resized_shape(meta.width, meta.height, self.size) if self.size else (-1, -1)
        todo = [int(i) for i in indices]
        try:
            batch = self._get_batch(todo, width, height, meta.num_frames)
        except DecodeError as e:
            if self.recover:
                return self._index.read(indices)
            raise self._refusal(e.cause, indices) from None
        want = (meta.height, meta.width) if self.size is None else (height, width)
        if batch.shape[1:3] != want:
            raise DecodeError(self.path, f"decord returned {batch.shape[1:3]} frames, expected {want}")
        wrong = _misread(todo, batch, tail)
        if wrong:
            raise self._refusal(f"decord returned another picture than frame {wrong[0]}", indices)
        return batch, np.ones(len(todo), dtype=bool)

    def _get_batch(self, todo: list[int], width: int, height: int, num_frames: int) -> np.ndarray:
        try:
            reader = decord.VideoReader(self._copy or self.path, width=width, height=height,
                                        num_threads=self.threads)
        except (decord.DECORDError, RuntimeError) as e:
            raise DecodeError(self.path, f"decord cannot open it ({_first_line(e)})") from None
        try:
            if len(reader) != num_frames:
                raise DecodeError(self.path, f"decord counts {len(reader)} frames, the video {num_frames}")
            return reader.get_batch(todo).asnumpy()
        except decord.DECORDError as e:
            raise DecodeError(self.path, f"decord failed to decode ({_first_line(e)})") from None
        finally:
            try:
                reader.seek(0)  # stops the background decoding thread before the reader is dropped
            except (decord.DECORDError, RuntimeError):
                pass  # a reader whose worker already failed has nothing left running
            del reader

    def _last_gop_pictures(self, indices: np.ndarray) -> dict[int, np.ndarray]:
        """The wanted frames from the last keyframe on, decoded by the PyAV reader: decord counts packets,
        and for a packet that is no picture it returns some other picture. Such packets mostly trail the
        file, where decord can also repeat a picture (module docstring). The reader's FrameTableChanged
        (the frames are not there as listed) propagates; damage is left for decord to report (no
        pictures to check against)."""
        table = self._index.table
        if len(table.key_pts) == 0:
            return {}
        tail = indices[indices >= np.searchsorted(table.pts, table.key_pts[-1])]
        if not len(tail):
            return {}
        try:
            pictures, decoded = self._index.read(tail)
        except DecodeError:
            return {}
        return {int(i): picture for i, picture, ok in zip(tail, pictures, decoded, strict=True) if ok}

    def _refusal(self, why: str, indices: np.ndarray) -> DecodeError:
        """decord cannot read this file: the error says why, and whether the PyAV backend reads the same
        frames (it tries; a FrameTableChanged from that try propagates, and the caller samples again)."""
        try:
            self._index.read(indices)
        except DecodeError as e:
            return DecodeError(self.path, f"{why}; decode.backend=pyav cannot read it either ({e.cause})")
        return DecodeError(self.path, f"{why}; decode.backend=pyav reads it")

    def close(self) -> None:
        self._index.close()
        self._drop_copy()

    def _drop_copy(self) -> None:
        if self._copy is not None:
            os.unlink(self._copy)
            self._copy = None

    def __enter__(self) -> DecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _misread(todo: list[int], batch: np.ndarray, pyav: dict[int, np.ndarray]) -> list[int]:
    """The wanted frames whose decord picture is not PyAV's: a mean difference of 2 levels or more
    (where the two convert differently, at native size, they differ by about 1 level for 10-bit sources
    and 0.3 for odd sizes: stages/decode.py), or the previous wanted picture repeated where PyAV's two
    differ (a near-static video's stale picture)."""
    wrong = []
    for k, index in enumerate(todo):
        if index not in pyav:
            continue
        difference = np.abs(batch[k].astype(np.int16) - pyav[index]).mean()
        before = todo[k - 1] if k else None
        repeated = (before in pyav and np.array_equal(batch[k], batch[k - 1])
                    and not np.array_equal(pyav[index], pyav[before]))
        if difference >= 2.0 or repeated:
            wrong.append(index)
    return wrong


def _first_line(error: Exception) -> str:
    """decord errors carry C++ log prefixes and a stack trace; keep the message itself."""
    lines = [
        line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith("Stack")
    ]
    message = _LOG_PREFIX.sub("", lines[0]) if lines else type(error).__name__
    return message[:300]
