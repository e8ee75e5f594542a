"""Real-world files: each reader's frames, frame count and timestamps equal an independent full decode.

The corpus is listed in tests/data/videos/SOURCES.json (source repository, commit, licence, sha256 and
what each file covers). The files themselves are data fetched from public repositories, so they live in
the project's shared/ folder, not in git (`tests/shared_data.py`: `shared/videos/` inside or beside the
checkout, or `$VZPIPE_SHARED/videos`). Without it this module is skipped, saying where it looked.

The reference decode is deliberately naive: PyAV's decode loop over the whole file, frames in the order
the decoder outputs them (presentation order), pts sorted for timestamps, and each wanted picture
converted at native size with `to_ndarray` and turned upright from the frame's display rotation.
"""

import hashlib
import json
from functools import cache
from pathlib import Path

import av
import numpy as np
import pytest
from shared_data import missing_reason, shared_folder

from stages.decode import DecodeError, read_frames

ROOT = Path(__file__).resolve().parent.parent
SOURCES = json.loads((ROOT / "tests" / "data" / "videos" / "SOURCES.json").read_text())
TRUNCATED = "h264_truncated_index.mp4"  # the one file that is damaged: tested on its own
CORPUS = shared_folder("videos")
pytestmark = pytest.mark.skipif(CORPUS is None,
                                reason=missing_reason("videos", "tests/data/videos/SOURCES.json"))
READABLE = [entry["file"] for entry in SOURCES if entry["file"] != TRUNCATED]
NUM_FRAMES = 8


def video(name: str) -> Path:
    return CORPUS / name


@cache
def reference(name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """(timestamps of every frame that decodes, in seconds from the first, ascending; output-order pts)."""
    with av.open(str(video(name))) as container:
        stream = container.streams.video[0]
        pts = [frame.pts for frame in container.decode(stream)]
        seconds = float(stream.time_base)
    ascending = np.sort(np.array(pts, dtype=np.int64))
    return (ascending - ascending[0]) * seconds, tuple(pts)


@cache
def reference_pictures(name: str, wanted: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Upright RGB pictures of the wanted output positions, at native size."""
    pictures = {}
    with av.open(str(video(name))) as container:
        for position, frame in enumerate(container.decode(video=0)):
            if position in wanted:
                quarter_turns = int(round(frame.rotation / 90.0)) % 4  # counter-clockwise, for display
                pictures[position] = np.rot90(frame.to_ndarray(format="rgb24"), quarter_turns)
    return pictures


def even_spread(count: int, n: int) -> list[int]:
    """Video-LLaVA's reference sampling of n of count frames (what decode's `uniform` does)."""
    return np.linspace(0, count - 1, n, dtype=int).tolist()


def test_the_corpus_is_the_one_the_sources_describe():
    for entry in SOURCES:
        data = video(entry["file"]).read_bytes()
        assert len(data) == entry["bytes"], entry["file"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
        assert not data.startswith(b"version https://git-lfs"), entry["file"]
    assert sum(entry["bytes"] for entry in SOURCES) < 3 * 2**20


@pytest.mark.parametrize("name", READABLE)
def test_pyav_matches_a_full_decode(name):
    timestamps, _ = reference(name)
    got = read_frames(video(name), num_frames=NUM_FRAMES, backend="pyav")
    wanted = even_spread(len(timestamps), NUM_FRAMES)
    assert got.meta.num_frames == len(timestamps)
    assert got.indices.tolist() == wanted
    np.testing.assert_allclose(got.timestamps, timestamps[wanted], rtol=0, atol=1e-9)
    pictures = reference_pictures(name, tuple(wanted))
    for index, frame in zip(wanted, got.frames, strict=True):
        np.testing.assert_array_equal(frame, pictures[index], err_msg=f"{name} frame {index}")


@pytest.mark.parametrize("name", READABLE)
def test_decord_matches_a_full_decode_or_names_pyav(name):
    timestamps, _ = reference(name)
    if name.endswith(".gif"):  # decord 0.6 fails on every GIF ("broken metadata")
        with pytest.raises(DecodeError) as refused:
            read_frames(video(name), num_frames=NUM_FRAMES, backend="decord")
        assert "decord 0.6 cannot read GIF files; decode.backend=pyav reads it" in str(refused.value)
        return
    got = read_frames(video(name), num_frames=NUM_FRAMES, backend="decord")
    wanted = even_spread(len(timestamps), NUM_FRAMES)
    assert got.meta.num_frames == len(timestamps) and got.indices.tolist() == wanted
    np.testing.assert_allclose(got.timestamps, timestamps[wanted], rtol=0, atol=1e-9)
    pictures = reference_pictures(name, tuple(wanted))
    odd = got.meta.width % 2 or got.meta.height % 2
    for index, frame in zip(wanted, got.frames, strict=True):
        if odd:  # documented exception (stages/decode.py): unscaled odd 4:2:0 sizes convert differently
            difference = np.abs(frame.astype(np.int16) - pictures[index])
            assert difference.mean() < 1.0 and difference.max() <= 16, f"{name} frame {index}"
        else:
            np.testing.assert_array_equal(frame, pictures[index], err_msg=f"{name} frame {index}")
    if odd:  # ... and resized, the backends match again
        pyav, decord = (read_frames(video(name), num_frames=NUM_FRAMES, backend=b, size=120).frames
                        for b in ("pyav", "decord"))
        np.testing.assert_array_equal(pyav, decord)


def test_a_phantom_frame_is_not_counted_and_the_last_frame_is_the_last_picture():
    name = "gif_phantom_frame.gif"
    with av.open(str(video(name))) as container:
        packets = sum(1 for packet in container.demux(video=0) if packet.size)
    timestamps, _ = reference(name)
    assert (packets, len(timestamps)) == (6, 5)  # the demuxer lists one packet that is no picture
    got = read_frames(video(name), strategy="indices", indices=[4, 0], backend="pyav")
    assert got.meta.num_frames == 5 and got.meta.duration == pytest.approx(4.1)
    pictures = reference_pictures(name, (0, 4))
    np.testing.assert_array_equal(got.frames, np.stack([pictures[4], pictures[0]]))


def test_packed_b_frames_come_in_output_order_not_in_pts_order():
    name = "mpeg4_packed_b_frames.avi"
    _, output_pts = reference(name)
    assert list(output_pts) != sorted(output_pts)  # FFmpeg attaches these pts to the wrong pictures
    got = read_frames(video(name), strategy="indices", indices=[2, 3], backend="pyav")
    pictures = reference_pictures(name, (2, 3))
    np.testing.assert_array_equal(got.frames, np.stack([pictures[2], pictures[3]]))


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_a_truncated_file_is_an_error_and_recover_keeps_the_frames_that_decode(backend):
    path = video(TRUNCATED)
    with pytest.raises(DecodeError, match="truncated: the index lists frames whose data lies past the end"):
        read_frames(path, num_frames=NUM_FRAMES, backend=backend)
    got = read_frames(path, num_frames=NUM_FRAMES, backend=backend, recover=True)
    timestamps, _ = reference(TRUNCATED)
    assert got.meta.num_frames == len(timestamps) == 6
    assert got.dropped.tolist() == [5]  # the last packet is cut short: its picture is corrupt
    pictures = reference_pictures(TRUNCATED, tuple(got.indices.tolist()))
    for index, frame in zip(got.indices, got.frames, strict=True):
        np.testing.assert_array_equal(frame, pictures[int(index)])
