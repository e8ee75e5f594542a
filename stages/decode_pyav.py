"""PyAV backend of the decode stage, and the frame table both backends sample from.

Frame table (frame index -> pts), from the cheapest source that is right for the file:
1. Container index: mp4/mov list every sample in their header (`stream.index_entries`, no I/O past the
   header). When the index has exactly `stream.frames` entries (discarded edit-list samples left out)
   and their decode timestamps step by a constant (constant frame rate), frame i has
   pts = start_time + i * step. The pts of the first packets (a few GOPs, read from the start of the
   file) are checked against this table; any mismatch falls back to 2.
2. Otherwise (variable frame rate; mkv/webm/ts/avi, whose index lists only keyframes or nothing;
   `stream.frames` 0 or wrong): demux every packet - no decoding - and sort their pts. This reads the
   file once; memory is O(frames) integers.
3. Decoding: decode every frame without converting it, and list the frames that come out, in the
   decoder's output order. Used up front for GIF (`_DECODED_TABLE_CODECS`: cheap to decode, and real
   GIFs often end with a comment or control block that the demuxer turns into a packet with no
   picture, a phantom frame), and as the fallback of 1 and 2 below.
The header's `stream.frames` is only used to tell whether the index is complete.

Fallback: tables 1 and 2 count packets, and a packet is not always a frame. When a read finds that the
table does not describe what decodes - a listed frame the decoder never outputs (a phantom packet in
the middle, or past the real end: "the file ends before it"), a decoded pts the table does not list,
or output pts that go backwards (AVI with packed B-frames, whose pts are attached to the wrong
pictures) - and no decode error or corrupt frame explains it, the reader replaces its table by a
decoded one (3) and `read` raises `FrameTableChanged`, so the caller samples again from the frames
that really decode. This costs one full decode, only for such files: long H.264 keeps the cheap
index. A decoded table is never replaced again; a mismatch on it is a DecodeError. The limit of a
counted table: a packet with no picture that no read meets stays counted (a uniform request always
meets one at the end; one in the middle of a long file leaves the frames after it one index late,
each still the frame its pts names). When the decoder's
output pts are not ascending, frame i is the i-th frame the decoder outputs (the order players show;
the pts are reattached in ascending order as timestamps) and reading decodes from the start.

Seeking (tables whose pts identify frames): for each wanted frame (ascending), the decoder keeps going
forward when no keyframe lies between its position and the target, and otherwise seeks to the pts of
the last keyframe at or before the target (a seek that lands past the target - possible when a
keyframe's pts is only estimated - retries from the keyframe before; one that lands early only costs
time). Decoded frames are matched to indices by their pts, so B-frames and variable frame rate need no
special case, and only the wanted frames are converted to RGB. Memory: the decoder's reference frames,
the output frames and the table (8 bytes per frame), whatever the length.

Conversion: the same FFmpeg filter chain decord builds (rotation transposes, `scale=W:H` bilinear,
rgb24), so both backends give bit-identical frames (see stages/decode.py for the one exception).
A reader is opened per call and used by one thread; `close()` (or the `with` block) releases it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from stages.decode import DecodeError, FrameTableChanged, VideoMeta, resized_shape
from stages.remote import RemoteConfig, RemoteFile, is_remote

_CHECK_PACKETS = 64  # packets from the start compared with a table derived from the index
_SEEK_RETRIES = 3
_DECODED_TABLE_CODECS = ("gif",)  # cheap to decode in full, and their packets are not always frames


@dataclass(frozen=True)
class FrameTable:
    pts: np.ndarray  # int64 [N] presentation timestamps in the stream time base, ascending
    key_pts: np.ndarray  # int64 [K] pts of keyframes, ascending
    last_duration: int  # how long the last frame is shown, stream time base
    source: str  # "index", "packets" (demux scan) or "decoded" (every frame decoded)
    by_pts: bool = True  # decoded frames are identified by their pts; False: by their output position


def _rotation_ccw(frame: av.VideoFrame) -> int:
    """Display rotation of a decoded frame, counter-clockwise degrees in {0, 90, 180, 270}."""
    return int(round(frame.rotation / 90.0)) % 4 * 90


def _transposes(rotation: int) -> list[str]:
    """FFmpeg transpose filters that turn a stored picture upright, as decord 0.6 builds them."""
    return {0: [], 90: ["cclock"], 180: ["clock", "clock"], 270: ["clock"]}[rotation]


class PyAVReader:
    """One open video: its frame table, metadata, and `read(indices) -> {index: RGB frame}`."""

    def __init__(self, path: str, *, size: int | None = None, threads: int = 0, recover: bool = False,
                 remote: RemoteConfig | None = None, local_copy: str | None = None):
        """`path` may be a URL (`stages.remote`): read by ranged requests, or from `local_copy`, a file
        already downloaded from it; messages name `path` either way."""
        self.path, self.size, self.threads, self.recover = path, size, threads, recover
        self._source = local_copy or path
        self._remote = RemoteFile(path, remote) if local_copy is None and is_remote(path) else None
        self._byte_size = self._remote.size if self._remote else os.path.getsize(self._source)
        if self._byte_size == 0:
            raise DecodeError(path, "empty file (0 bytes)")
        try:
            self._container = self._open()
        except av.error.FFmpegError as e:
            hint = (
                "; an mp4 cut short before its index was written fails like this too"
                if path.endswith((".mp4", ".mov"))
                else ""
            )
            raise DecodeError(path, f"not a readable video file ({_reason(e)}{hint})") from None
        self._graph: av.filter.Graph | None = None
        self._graph_key: tuple | None = None
        self._first: tuple[int, int, str, int] | None = None  # width, height, pix_fmt, rotation of a frame
        self._damaged = False  # a decode error was skipped (recover) or a frame came out corrupt
        self._reads = 0
        self.table: FrameTable | None = None
        try:
            self._init_stream()
        except BaseException:
            self._container.close()
            raise

    def _init_stream(self) -> None:
        videos = self._container.streams.video
        if not videos:
            kinds = sorted({s.type for s in self._container.streams}) or ["none"]
            raise DecodeError(self.path, f"no video stream (streams: {', '.join(kinds)})")
        self._stream = videos[0]
        self._configure_decoder()
        self.time_base: Fraction = self._stream.time_base
        if self._stream.codec_context.name in _DECODED_TABLE_CODECS:
            self._use_table(self._decoded_table())
        else:
            self._use_table(self._index_table() or self._scan_table())

    def _configure_decoder(self) -> None:
        ctx = self._stream.codec_context
        ctx.thread_type = "AUTO"
        ctx.thread_count = self.threads

    def _use_table(self, table: FrameTable) -> None:
        if len(table.pts) == 0:
            raise DecodeError(self.path, "the video stream has no frames")
        self.table = table
        pts = table.pts
        end = int(pts[-1]) + table.last_duration
        self.timestamps = ((pts - pts[0]) * float(self.time_base)).astype(np.float64)
        self.duration = float((end - int(pts[0])) * self.time_base)

    def _open(self) -> av.container.InputContainer:
        if self._remote is None:
            return av.open(self._source, metadata_errors="ignore")
        self._remote.seek(0)
        return av.open(self._remote, metadata_errors="ignore")

    def _reopen(self) -> None:
        """Start over at the beginning of the file (after packets were read for the frame table)."""
        self._container.close()
        self._container = self._open()
        self._stream = self._container.streams.video[0]
        self._configure_decoder()

    # ------------------------------------------------------------ frame table

    def _index_table(self) -> FrameTable | None:
        """Table from the container index, or None when it is incomplete, VFR, or disagrees with packets."""
        stream = self._stream
        entries = list(stream.index_entries)
        if stream.frames <= 0 or not entries:
            return None
        kept = [e for e in entries if not e.is_discard]
        if kept and max(e.pos + e.size for e in kept) > self._byte_size:
            if self.recover:
                return None  # the scan finds the frames that are still there
            raise DecodeError(
                self.path, "truncated: the index lists frames whose data lies past the end of the file"
            )
        if len(kept) != stream.frames or len(kept) < 2:
            return None
        dts = np.array([e.timestamp for e in kept], dtype=np.int64)
        steps = np.diff(dts)
        step = int(steps[0])
        if step <= 0 or not (steps == step).all():
            return None
        start = stream.start_time if stream.start_time is not None else int(dts[0])
        delay = start - int(dts[0])
        is_key = np.array([e.is_keyframe for e in kept], dtype=bool)
        table = FrameTable(
            pts=start + step * np.arange(len(kept), dtype=np.int64),
            key_pts=dts[is_key] + delay,
            last_duration=step,
            source="index",
        )
        for k, packet in enumerate(self._container.demux(stream)):
            if k >= _CHECK_PACKETS:
                break
            if packet.size and not packet.is_discard and not _listed(table.pts, packet.pts):
                return None
        return table

    def _scan_table(self) -> FrameTable:
        """Table from the pts of every packet (demux only)."""
        self._reopen()  # from the first packet, whatever was read before
        pts, key, durations = [], [], []
        try:
            for packet in self._container.demux(self._stream):
                if not packet.size or packet.is_discard:
                    continue
                p = packet.pts if packet.pts is not None else packet.dts
                if p is None:
                    raise DecodeError(self.path, "video packets carry no timestamps")
                pts.append(p)
                key.append(packet.is_keyframe)
                durations.append(packet.duration or 0)
        except av.error.FFmpegError as e:
            if not self.recover:
                raise DecodeError(
                    self.path, f"damaged or truncated container after {len(pts)} frames ({_reason(e)})"
                ) from None
        return _table(pts, key, durations, source="packets")

    def _decoded_table(self) -> FrameTable:
        """Table from decoding every frame (not converted): the frames that really decode (module doc, 3)."""
        pts, key, durations = [], [], []
        for frame in self._frames_from(None):
            if _pts(frame) is None:
                raise DecodeError(self.path, "decoded frames carry no timestamps")
            if self._first is None:
                self._first = _geometry(frame)
            pts.append(_pts(frame))
            key.append(frame.key_frame)
            durations.append(frame.duration or 0)
        return _table(pts, key, durations, source="decoded")

    def _can_replace_table(self) -> bool:
        """Whether a mismatch between table and decoder means the table is wrong: it was counted from the
        container (a decoded table is what decodes), and no damage explains the mismatch."""
        return self.table.source != "decoded" and not self._damaged

    def _replace_table(self, why: str) -> None:
        """List what really decodes, then make the caller sample again (module docstring: Fallback)."""
        self._use_table(self._decoded_table())
        raise FrameTableChanged(self.path, why)

    # ------------------------------------------------------------ decoding

    def _frames_from(self, seek_to: int | None):
        """Decoded frames from the keyframe at or before pts `seek_to` (None: the start) to the end."""
        if seek_to is None:
            self._reopen()
        else:
            self._container.seek(int(seek_to), backward=True, any_frame=False, stream=self._stream)
        self._stream.codec_context.flush_buffers()
        packets = self._container.demux(self._stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError as e:
                if self.recover:
                    self._damaged = True
                    return  # the container cannot be read past this point
                raise DecodeError(self.path, f"damaged container data ({_reason(e)})") from None
            try:
                for frame in packet.decode():
                    self._damaged |= frame.is_corrupt
                    yield frame
            except av.error.FFmpegError as e:
                if not self.recover:
                    raise DecodeError(
                        self.path, f"corrupt video data{self._near(packet)} ({_reason(e)})"
                    ) from None
                self._damaged = True

    def _near(self, packet: av.Packet) -> str:
        """Where a packet lies, as ' near N s' from the first frame (empty when it has no pts)."""
        if packet.pts is None:
            return ""
        origin = int(self.table.pts[0]) if self.table is not None else self._stream.start_time or 0
        return f" near {float((packet.pts - origin) * self.time_base):.3f} s"

    def _keyframe_before(self, target_pts: int) -> int:
        return max(0, int(np.searchsorted(self.table.key_pts, target_pts, side="right")) - 1)

    def _must_seek(self, position: int | None, target_pts: int) -> bool:
        """Seek unless the decoder is before the target with no keyframe in between."""
        if position is None or position >= target_pts or len(self.table.key_pts) == 0:
            return True
        return int(self.table.key_pts[self._keyframe_before(target_pts)]) > position

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decode the frames at these (unique, ascending) indices: (uint8 [U, H, W, 3], decoded bool [U]).

        A frame that cannot be decoded raises DecodeError, or with recover=True stays unfilled
        (decoded False). Frames go straight into one preallocated array: no second copy. Raises
        FrameTableChanged when the table turned out not to describe what decodes (module docstring).
        """
        if self._reads:
            # a later read (decord's fallbacks) starts from a fresh decoder: after a read, a seek and
            # `flush_buffers` have decoded wrong pictures (frame threads, a truncated H.264 mp4)
            self._reopen()
        self._reads += 1
        todo = [int(i) for i in indices]
        out = _Slots(self.path, len(todo))
        if not self.table.by_pts:
            self._read_in_output_order(todo, out)
            return out.frames, out.ok
        pts = self.table.pts
        k = 0
        while k < len(todo):
            target = int(pts[todo[k]])
            key = self._keyframe_before(target)
            for attempt in range(_SEEK_RETRIES):
                frames = self._frames_from(self._seek_point(key - attempt))
                first = next(frames, None)
                if first is None or _pts(first) <= target or key - attempt <= 0:
                    break
            k = self._consume(first, frames, todo, k, out)
        return out.frames, out.ok

    def _seek_point(self, key: int) -> int:
        """Where to seek for keyframe number `key`: its pts (what mov, mkv and FFmpeg's seek compare)."""
        return int(self.table.key_pts[max(0, key)]) if len(self.table.key_pts) else int(self.table.pts[0])

    def _consume(self, frame, frames, todo: list[int], k: int, out: _Slots) -> int:
        """Walk decoded frames from `frame` on, collecting wanted ones, until a seek pays off or EOF.

        Never returns before todo[k] is settled, so a seek that lands early cannot loop forever.
        """
        pts = self.table.pts
        k0 = k
        previous = None
        while frame is not None:
            position = _pts(frame)
            if not _listed(pts, position):
                why = f"decoded a frame with pts {position}, which the frame table does not list"
                if self._can_replace_table():
                    self._replace_table(why)
                raise DecodeError(self.path, why)
            if previous is not None and position <= previous and self._can_replace_table():
                self._replace_table(f"the decoder output pts {position} after {previous}")
            previous = position
            if self._first is None:
                self._first = _geometry(frame)
            while k < len(todo) and int(pts[todo[k]]) < position:
                self._missing(todo[k], "the decoder skipped it")
                k += 1
            if k < len(todo) and int(pts[todo[k]]) == position:
                self._take(frame, k, todo[k], out)
                k += 1
            if k == len(todo) or (k > k0 and self._must_seek(position, int(pts[todo[k]]))):
                return k
            frame = next(frames, None)
        for index in todo[k:]:
            self._missing(index, "the file ends before it (truncated?)")
        return len(todo)

    def _read_in_output_order(self, todo: list[int], out: _Slots) -> None:
        """Frame i = the i-th frame the decoder outputs: decode from the start (table with by_pts False)."""
        k = 0
        for position, frame in enumerate(self._frames_from(None)):
            if self._first is None:
                self._first = _geometry(frame)
            if position == todo[k]:
                self._take(frame, k, todo[k], out)
                k += 1
                if k == len(todo):
                    return
        for index in todo[k:]:
            self._missing(index, "the file ends before it (truncated?)")

    def _take(self, frame: av.VideoFrame, slot: int, index: int, out: _Slots) -> None:
        if frame.is_corrupt:
            self._missing(index, "the decoder flagged it corrupt")
        else:
            out.put(slot, self._to_rgb(frame))

    def _missing(self, index: int, why: str) -> None:
        """A wanted frame did not come out of the decoder: damage (an error, or dropped with recover),
        or, where nothing was damaged, a table that lists a frame that does not exist."""
        where = f"frame {index} (t={self.timestamps[index]:.3f} s) could not be decoded: {why}"
        if self._can_replace_table():
            self._replace_table(where)
        if not self.recover:
            raise DecodeError(self.path, where)

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        """Rotate, resize and convert one frame with the filter chain decord uses."""
        key = _geometry(frame)
        if key != self._graph_key:
            width, height, fmt, rotation = key
            upright = (height, width) if rotation in (90, 270) else (width, height)
            out_w, out_h = resized_shape(*upright, self.size)
            graph = av.filter.Graph()
            graph.threads = 1
            chain = [
                graph.add_buffer(
                    width=width, height=height, format=fmt, time_base=frame.time_base or self.time_base
                )
            ]
            chain += [graph.add("transpose", t) for t in _transposes(rotation)]
            chain += [graph.add("scale", f"{out_w}:{out_h}:flags=bilinear"), graph.add("format", "rgb24")]
            chain.append(graph.add("buffersink"))
            for a, b in zip(chain[:-1], chain[1:], strict=True):
                a.link_to(b)
            graph.configure()
            self._graph, self._graph_key = graph, key
        self._graph.push(frame)
        return self._graph.pull().to_ndarray()

    # ------------------------------------------------------------ metadata

    def geometry(self) -> tuple[int, int, str, int]:
        """(stored width, height, pixel format, rotation) of the first frame; decodes one if needed."""
        if self._first is None:
            frame = next(self._frames_from(self._seek_point(0)), None)
            if frame is None:
                raise DecodeError(self.path, "no frame could be decoded")
            self._first = _geometry(frame)
        return self._first

    @property
    def meta(self) -> VideoMeta:
        width, height, pix_fmt, rotation = self.geometry()
        if rotation in (90, 270):
            width, height = height, width
        steps = np.diff(self.table.pts)
        return VideoMeta(
            path=self.path,
            duration=self.duration,
            fps=len(self.table.pts) / self.duration if self.duration > 0 else 0.0,
            num_frames=len(self.table.pts),
            width=width,
            height=height,
            codec=self._stream.codec_context.name,
            pix_fmt=pix_fmt,
            rotation=rotation,
            variable_frame_rate=bool(
                steps.size and steps.max() - steps.min() > max(1, 0.01 * np.median(steps))
            ),
            container=self._container.format.name,
        )

    def close(self) -> None:
        self._graph = None
        self._container.close()

    def __enter__(self) -> PyAVReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Slots:
    """The output array, allocated when the first frame gives its shape, and which slots are filled."""

    def __init__(self, path: str, count: int):
        self.path, self.count = path, count
        self.ok = np.zeros(count, dtype=bool)
        self._frames: np.ndarray | None = None

    def put(self, slot: int, rgb: np.ndarray) -> None:
        if self._frames is None:
            self._frames = np.empty((self.count, *rgb.shape), dtype=np.uint8)
        elif rgb.shape != self._frames.shape[1:]:
            raise DecodeError(
                self.path, f"frame size changes mid-stream ({self._frames.shape[1:3]} then {rgb.shape[:2]})"
            )
        self._frames[slot] = rgb
        self.ok[slot] = True

    @property
    def frames(self) -> np.ndarray:
        return self._frames if self._frames is not None else np.zeros((self.count, 0, 0, 3), np.uint8)


def _geometry(frame: av.VideoFrame) -> tuple[int, int, str, int]:
    return frame.width, frame.height, frame.format.name, _rotation_ccw(frame)


def _table(pts: list[int], key: list[bool], durations: list[int], source: str) -> FrameTable:
    """A frame table from the pts, keyframe flags and durations of packets (in demux order) or of
    decoded frames (in output order). Decoded frames whose pts do not strictly ascend in output order
    are identified by output position instead (`by_pts` False)."""
    all_pts = np.array(pts, dtype=np.int64)
    order = np.argsort(all_pts, kind="stable")
    ascending = all_pts[order]
    by_pts = source != "decoded" or bool((np.diff(all_pts) > 0).all())
    key_pts = np.sort(all_pts[np.array(key, dtype=bool)])
    last = durations[order[-1]] if pts else 0
    if last <= 0 and len(pts) > 1:
        last = int(np.median(np.diff(ascending)))
    return FrameTable(ascending, key_pts, max(last, 1), source=source, by_pts=by_pts)


def _listed(sorted_pts: np.ndarray, value: int | None) -> bool:
    i = int(np.searchsorted(sorted_pts, value)) if value is not None else len(sorted_pts)
    return i < len(sorted_pts) and int(sorted_pts[i]) == value


def _pts(frame: av.VideoFrame) -> int:
    return frame.pts if frame.pts is not None else frame.dts


def _reason(error: Exception) -> str:
    """FFmpeg's message without the file name PyAV appends (DecodeError names the file once)."""
    return getattr(error, "strerror", None) or str(error)
