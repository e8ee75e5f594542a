"""Decode stage: exact frames for every strategy and backend, identical backends, bounded memory, errors.

Every sample frame carries its frame number in its pixels (synthqa.sample_videos), so each test reads
back WHICH frame a backend returned instead of trusting the index it reports.
"""

import gc
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import psutil
import pytest

from stages.decode import (
    DecodeConfig,
    DecodeError,
    DecodeStage,
    even_spread,
    read_frames,
    sample_indices,
)
from stages.decode_pyav import PyAVReader
from synthqa.formats import write_gif
from synthqa.sample_videos import (
    VFR_DURATIONS_MS,
    frame_image,
    read_frame_number,
    write_sample_set,
    write_video,
)

BACKENDS = ["pyav", "decord"]
GOOD = ["plain", "bt709", "vfr", "rot90", "rot180", "rot270", "10bit", "gray", "rgba", "mkv", "short"]
FPS = 25  # sample_videos default


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    return write_sample_set(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def long_gop_video(tmp_path_factory) -> Path:
    """300 frames with a keyframe every 25: shows whether a sparse request seeks or decodes everything."""
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", 300, gop=25)


def numbers(frames) -> list[int]:
    return [read_frame_number(f) for f in frames.frames]


def vfr_timestamps(count: int) -> np.ndarray:
    durations = [VFR_DURATIONS_MS[i % len(VFR_DURATIONS_MS)] for i in range(count)]
    return np.concatenate([[0], np.cumsum(durations)[:-1]]) / 1000.0


# ---------------------------------------------------------------- strategies, exact frames


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_whole_video_reads_back_exact_frames(videos, backend):
    got = read_frames(videos["plain"], num_frames=8, backend=backend)
    expected = [0, 14, 28, 42, 56, 70, 84, 99]  # linspace(0, 99, 8) truncated, as Video-LLaVA samples
    assert got.indices.tolist() == expected
    assert numbers(got) == expected
    assert got.frames.dtype == np.uint8 and got.frames.shape == (8, 96, 128, 3)
    np.testing.assert_allclose(got.timestamps, np.array(expected) / FPS)
    assert got.indices.dtype == np.int64 and got.timestamps.dtype == np.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_over_a_start_end_window(videos, backend):
    got = read_frames(videos["plain"], num_frames=5, backend=backend, start=1.0, end=2.0)
    expected = even_spread(25, 49, 5).tolist()  # frames shown during [1.0, 2.0)
    assert expected == [25, 31, 37, 43, 49]
    assert got.indices.tolist() == expected and numbers(got) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_between_frames_still_gives_the_frame_on_screen(videos, backend):
    got = read_frames(videos["plain"], num_frames=1, backend=backend, start=1.01, end=1.02)
    assert numbers(got) == [25]  # frame 25 is shown from 1.00 s to 1.04 s


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_strategy_takes_the_frame_on_screen_at_each_tick(videos, backend):
    got = read_frames(videos["plain"], strategy="fps", fps=2, backend=backend)
    expected = [math.floor(t * FPS + 1e-9) for t in np.arange(0, 4.0, 0.5)]
    assert expected == [0, 12, 25, 37, 50, 62, 75, 87]
    assert got.indices.tolist() == expected and numbers(got) == expected

    windowed = read_frames(videos["plain"], strategy="fps", fps=4, start=1.0, end=2.0, backend=backend)
    assert numbers(windowed) == [25, 31, 37, 43]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_strategy_thins_evenly_past_max_frames(videos, backend):
    got = read_frames(videos["plain"], strategy="fps", fps=25, max_frames=10, backend=backend)
    expected = even_spread(0, 99, 10).tolist()  # 100 ticks, one per frame, thinned to 10
    assert numbers(got) == expected == got.indices.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_strategy_keeps_order_and_repeats(videos, backend):
    got = read_frames(videos["plain"], strategy="indices", indices=[57, 3, 3, 99, 0], backend=backend)
    assert got.indices.tolist() == [57, 3, 3, 99, 0]
    assert numbers(got) == [57, 3, 3, 99, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_video_repeats_frames_to_keep_n(videos, backend):
    got = read_frames(videos["short"], num_frames=8, backend=backend)
    assert got.meta.num_frames == 5
    assert got.indices.tolist() == [0, 0, 1, 1, 2, 2, 3, 4]  # linspace(0, 4, 8) truncated
    assert numbers(got) == [0, 0, 1, 1, 2, 2, 3, 4]
    np.testing.assert_array_equal(got.frames[0], got.frames[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate_indices_count_frames_and_timestamps_come_from_pts(videos, backend):
    got = read_frames(videos["vfr"], num_frames=8, backend=backend)
    expected = even_spread(0, 99, 8).tolist()
    assert numbers(got) == expected == got.indices.tolist()
    np.testing.assert_allclose(got.timestamps, vfr_timestamps(100)[expected], atol=1e-9)
    assert got.meta.variable_frame_rate and got.meta.num_frames == 100

    ticks = read_frames(videos["vfr"], strategy="fps", fps=10, start=0.0, end=1.0, backend=backend)
    ts = vfr_timestamps(100)
    expected_ticks = [int(np.searchsorted(ts, t + 1e-9, side="right")) - 1 for t in np.arange(0, 1.0, 0.1)]
    assert numbers(ticks) == expected_ticks


def test_sample_indices_is_pure_and_shared():
    ts = np.arange(10) / 10.0
    assert sample_indices(ts, 1.0, strategy="uniform", num_frames=4).tolist() == [0, 3, 6, 9]
    assert sample_indices(ts, 1.0, strategy="uniform", num_frames=3, start=0.55).tolist() == [5, 7, 9]
    assert sample_indices(ts, 1.0, strategy="fps", fps=4).tolist() == [0, 2, 5, 7]
    assert sample_indices(ts, 1.0, strategy="indices", indices=[9, 0]).tolist() == [9, 0]
    with pytest.raises(ValueError, match=r"outside 0\.\.9"):
        sample_indices(ts, 1.0, strategy="indices", indices=[10])


def video_llava_reference(duration: int, num_frames: int) -> list[int]:
    """Video-LLaVA's frame sampling, its line as it stands (PKU-YuanGroup/Video-LLaVA at 984e65b,
    videollava/model/multimodal_encoder/languagebind/video/processing_video.py, load_and_transform_video,
    decord backend, where `duration = len(decord_vr)` is the frame count)."""
    frame_id_list = np.linspace(0, duration-1, num_frames, dtype=int)
    return frame_id_list.tolist()


def test_uniform_is_video_llavas_reference_frame_for_frame():
    # short videos (fewer frames than asked) included: the reference repeats frames, and so do we
    counts = [1, 2, 3, 5, 7, 8, 9, 10, 16, 17, 25, 30, 31, 64, 99, 100, 101, 241, 300, 1000, 4799, 86400]
    for count in counts:
        timestamps, duration = np.arange(count) / FPS, count / FPS
        # a window is sampled as the reference samples the video cut to it: frames a..b, as a + its indices
        last = count - 1
        windows = {(0, last), (count // 3, last), (count // 4, 3 * count // 4), (last, last)}
        for num_frames in [1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 100]:
            whole = sample_indices(timestamps, duration, num_frames=num_frames)
            assert whole.tolist() == video_llava_reference(count, num_frames), (count, num_frames)
            for a, b in windows:
                got = sample_indices(timestamps, duration, num_frames=num_frames, start=a / FPS,
                                     end=(b + 1) / FPS)
                wanted = [a + i for i in video_llava_reference(b - a + 1, num_frames)]
                assert got.tolist() == wanted, (count, num_frames, a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounding_round_spreads_half_up_on_request(videos, backend):
    ts = np.arange(100) / FPS
    half_up = [0, 14, 28, 42, 57, 71, 85, 99]  # round(linspace(0, 99, 8)); truncated: 56, 70, 84
    assert sample_indices(ts, 4.0, num_frames=8, rounding="round").tolist() == half_up
    assert sample_indices(ts[:5], 0.2, num_frames=8, rounding="round").tolist() == [0, 1, 1, 2, 2, 3, 3, 4]
    # fps thinning spreads by the same rule: 100 ticks (one per frame) thinned to 8
    assert sample_indices(ts, 4.0, strategy="fps", fps=25, max_frames=8, rounding="round").tolist() == half_up
    truncated = sample_indices(ts, 4.0, strategy="fps", fps=25, max_frames=8)
    assert truncated.tolist() == [0, 14, 28, 42, 56, 70, 84, 99]
    stage = DecodeStage(DecodeConfig(backend=backend, rounding="round", size=None))
    out = stage({"video": [str(videos["plain"])]})
    assert [read_frame_number(f) for f in out["frames"][0]] == out["frame_indices"][0].tolist() == half_up
    with pytest.raises(ValueError, match="rounding='nearest': choose one of truncate, round"):
        DecodeStage(DecodeConfig(rounding="nearest"))


# ---------------------------------------------------------------- backends agree, formats, rotation, resize


@pytest.mark.parametrize("size", [None, 48])
@pytest.mark.parametrize("name", GOOD)
def test_both_backends_give_identical_frames(videos, name, size):
    a = read_frames(videos[name], num_frames=6, backend="pyav", size=size)
    b = read_frames(videos[name], num_frames=6, backend="decord", size=size)
    assert a.indices.tolist() == b.indices.tolist() == numbers(a) == numbers(b)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    assert a.meta == b.meta
    if name == "10bit" and size is None:
        # documented exception: decord's FFmpeg 4.1 and PyAV's FFmpeg convert 10-bit unscaled differently
        diff = np.abs(a.frames.astype(np.int16) - b.frames)
        assert 0 < diff.mean() < 2.0
    else:
        np.testing.assert_array_equal(a.frames, b.frames)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,rotation", [("rot90", 90), ("rot180", 180), ("rot270", 270)])
def test_rotated_videos_come_out_upright(videos, backend, name, rotation):
    with av.open(str(videos[name])) as container:
        stored = container.streams.video[0].codec_context
        assert (stored.width, stored.height) == ((96, 128) if rotation != 180 else (128, 96))
    got = read_frames(videos[name], num_frames=4, backend=backend)
    assert got.meta.rotation == rotation and (got.meta.width, got.meta.height) == (128, 96)
    assert got.frames.shape[1:] == (96, 128, 3)
    assert numbers(got) == got.indices.tolist()
    small = read_frames(videos[name], num_frames=4, backend=backend, size=48)
    assert small.frames.shape[1:] == (48, 64, 3) and numbers(small) == small.indices.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,pix_fmt", [("10bit", "yuv420p10le"), ("gray", "gray"), ("rgba", "rgba")])
def test_odd_pixel_formats_give_rgb_uint8(videos, backend, name, pix_fmt):
    got = read_frames(videos[name], num_frames=4, backend=backend)
    assert got.meta.pix_fmt == pix_fmt
    assert got.frames.dtype == np.uint8 and got.frames.shape[-1] == 3
    assert numbers(got) == got.indices.tolist()
    if name == "rgba":  # lossless: exactly the RGB that was drawn, alpha dropped, channels in RGB order
        expected = np.stack([frame_image(int(i), 128, 96) for i in got.indices])
        np.testing.assert_array_equal(got.frames, expected)
    if name == "gray":
        assert (got.frames[..., 0] == got.frames[..., 1]).all() and (
            got.frames[..., 1] == got.frames[..., 2]
        ).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_scales_the_shortest_side_and_keeps_aspect(videos, backend):
    for name, size, shape in [("plain", 48, (2, 48, 64, 3)), ("plain", 150, (2, 150, 200, 3)),
                              ("rot90", 50, (2, 50, 67, 3))]:
        assert read_frames(videos[name], num_frames=2, backend=backend, size=size).frames.shape == shape


def test_frame_table_from_the_index_equals_a_packet_scan(videos):
    with PyAVReader(str(videos["plain"])) as reader:  # H.264 with B-frames: pts != dts
        assert reader.table.source == "index"
        np.testing.assert_array_equal(reader.table.pts, reader._scan_table().pts)
    for name in ("vfr", "mkv"):
        with PyAVReader(str(videos[name])) as reader:
            assert reader.table.source == "packets" and len(reader.table.pts) == 100
    with av.open(str(videos["mkv"])) as container:
        assert container.streams.video[0].frames == 0  # the header does not know the frame count


def test_sparse_request_seeks_instead_of_decoding_everything(long_gop_video, monkeypatch):
    decoded = []
    original = PyAVReader._frames_from

    def counting(self, seek_to):
        for frame in original(self, seek_to):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(PyAVReader, "_frames_from", counting)
    got = read_frames(long_gop_video, strategy="indices", indices=[10, 290], backend="pyav")
    assert numbers(got) == [10, 290]
    assert len(decoded) <= 2 + 11 + 16  # first frame for metadata, 0..10, 275..290 (keyframes every 25)


# ---------------------------------------------------------------- packets that are not frames

GIF_COMMENT = b"\x21\xfe\x05hello\x00"  # a GIF comment extension block
END_OF_STREAM_NAL = b"\x00\x00\x00\x01\x0a"  # H.264 end-of-stream NAL (length-prefixed): no picture


def remux(src: Path, dst: Path, edit) -> Path:
    """Copy the video packets of `src` into `dst` (its container from the suffix), `edit`ed on the way."""
    with av.open(str(src)) as source, av.open(str(dst), "w") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        packets = [packet for packet in source.demux(video=0) if packet.size]
        for packet in edit(packets, source.streams.video[0].time_base):
            packet.stream = stream
            out.mux(packet)
    return dst


def no_picture_packet(pts: int, dts: int, time_base) -> av.Packet:
    packet = av.Packet(END_OF_STREAM_NAL)
    packet.pts, packet.dts, packet.time_base = pts, dts, time_base
    return packet


@pytest.fixture(scope="module")
def gop10_video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("gop10") / "gop10.mp4", 30, gop=10)


def test_gif_ending_in_a_comment_counts_only_its_pictures(tmp_path):
    gif = write_gif(tmp_path / "a.gif", np.stack([frame_image(n, 128, 96) for n in range(6)]))
    data = gif.read_bytes()
    phantom = tmp_path / "phantom.gif"
    phantom.write_bytes(data[:-1] + GIF_COMMENT + data[-1:])  # the demuxer makes the comment a 7th packet
    with av.open(str(phantom)) as container:
        assert sum(1 for packet in container.demux(video=0) if packet.size) == 7
    got = read_frames(phantom, num_frames=8)
    assert got.meta.num_frames == 6 and got.indices.tolist() == [0, 0, 1, 2, 2, 3, 4, 5]
    assert numbers(got) == got.indices.tolist()
    assert got.meta.duration == pytest.approx(read_frames(gif, num_frames=1).meta.duration)
    with pytest.raises(DecodeError, match="decord 0.6 cannot read GIF files; decode.backend=pyav reads it"):
        read_frames(phantom, num_frames=8, backend="decord")


def test_packet_without_a_picture_at_the_end_of_an_mp4(gop10_video, tmp_path):
    def append(packets, time_base):
        step = packets[1].dts - packets[0].dts
        last_pts, last_dts = max(p.pts for p in packets), max(p.dts for p in packets)
        return [*packets, no_picture_packet(last_pts + step, last_dts + step, time_base)]

    path = remux(gop10_video, tmp_path / "trailing.mp4", append)
    with PyAVReader(str(path)) as reader:  # the index counts 31 frames
        assert reader.table.source == "index" and len(reader.table.pts) == 31
    got = read_frames(path, num_frames=8)  # the last sampled frame is not there: the table is rebuilt
    assert got.meta.num_frames == 30 and got.indices.tolist() == [0, 4, 8, 12, 16, 20, 24, 29]
    assert numbers(got) == got.indices.tolist()
    refused = "decord counts 31 frames, the video 30; decode.backend=pyav reads it"
    with pytest.raises(DecodeError, match=refused):  # rather than the other picture decord returns
        read_frames(path, num_frames=8, backend="decord")


def test_packet_without_a_picture_in_the_middle_is_found_by_a_read_that_meets_it(gop10_video, tmp_path):
    def insert_before_second_gop(packets, time_base):
        step = packets[1].dts - packets[0].dts
        slot = sorted(p.pts for p in packets)[10]  # display slot of frame 10, the second GOP's keyframe
        for packet in packets:
            packet.pts += step if packet.pts >= slot else 0
        at = next(i for i, p in enumerate(packets) if p.pts == slot + step)
        edited = [*packets[:at], no_picture_packet(slot, 0, time_base), *packets[at:]]
        for i, packet in enumerate(edited):
            packet.dts = packets[0].dts + i * step
        return edited

    path = remux(gop10_video, tmp_path / "middle.mp4", insert_before_second_gop)
    got = read_frames(path, strategy="indices", indices=[10, 29])  # index 10 is the phantom's slot
    assert got.meta.num_frames == 30 and numbers(got) == [10, 29]


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_come_in_output_order_when_pts_name_the_wrong_pictures(videos, tmp_path, backend):
    def pts_from_decode_order(packets, time_base):  # what AVI with packed B-frames gives FFmpeg
        step = packets[1].dts - packets[0].dts
        for packet in packets:
            packet.pts = packet.dts + 2 * step
        return packets

    path = remux(videos["plain"], tmp_path / "relabelled.mkv", pts_from_decode_order)
    with av.open(str(path)) as container:
        output_pts = [frame.pts for frame in container.decode(video=0)]
    assert output_pts != sorted(output_pts)
    for threads in (0, 1):
        try:
            got = read_frames(path, num_frames=8, backend=backend, threads=threads)
        except DecodeError as e:  # decord repeats frame 84's picture for 99: nearly always with one thread
            assert backend == "decord"
            assert "decord returned another picture than frame 99; decode.backend=pyav reads it" in str(e)
            continue
        assert got.meta.num_frames == 100
        assert numbers(got) == got.indices.tolist() == [0, 14, 28, 42, 56, 70, 84, 99]
        np.testing.assert_allclose(got.timestamps, got.indices / FPS)


def test_decord_repeating_a_picture_in_the_last_gop_is_refused(videos, monkeypatch):
    from stages.decode_decord import DecordReader

    get_batch = DecordReader._get_batch

    def repeating_the_last_but_one(self, todo, *args):
        batch = get_batch(self, todo, *args)
        batch[-1] = batch[-2]
        return batch

    monkeypatch.setattr(DecordReader, "_get_batch", repeating_the_last_but_one)
    with pytest.raises(DecodeError, match="another picture than frame 99; decode.backend=pyav reads it"):
        read_frames(videos["plain"], num_frames=8, backend="decord")


# ---------------------------------------------------------------- bad requests and bad files


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(strategy="random"), "unknown sampling strategy"),
        (dict(backend="opencv"), "unknown decode backend"),
        (dict(num_frames=0), "num_frames"),
        (dict(strategy="fps"), "needs fps"),
        (dict(strategy="indices"), "needs a non-empty"),
        (dict(indices=[1]), "use strategy='indices'"),
        (dict(start=-1.0), "start must be"),
        (dict(start=2.0, end=1.0), "must be after start"),
        (dict(size=0), "size must be"),
    ],
)
def test_bad_requests_raise_value_errors_before_opening(videos, kwargs, match):
    with pytest.raises(ValueError, match=match):
        read_frames(videos["plain"], **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_outside_the_video_is_a_clear_error(videos, backend):
    path = str(videos["plain"])
    with pytest.raises(
        DecodeError, match=r"start=4 s is at or past the end of the video \(duration 4\.000 s\)"
    ) as e:
        read_frames(path, backend=backend, start=4.0)
    assert e.value.path == path and str(e.value).startswith(path)
    with pytest.raises(DecodeError, match=r"end=5 s is past the end"):
        read_frames(path, backend=backend, start=1.0, end=5.0)
    with pytest.raises(DecodeError, match=r"frame indices \[100\] outside 0\.\.99"):
        read_frames(path, strategy="indices", indices=[0, 100], backend=backend)


BAD = {
    "missing": "no such file",
    "empty": "empty file",
    "not_a_video": "not a readable video file",
    "audio_only": "no video stream",
    "truncated": "not a readable video file",
    "truncated_faststart": "truncated",
    "corrupted": {"pyav": "corrupt video data near", "decord": "decord failed to decode"},
}

_BAD_SCRIPT = """
import json, sys, time
from stages.decode import read_frames
from synthqa.sample_videos import read_frame_number
for path, backend, recover in json.loads(sys.argv[1]):
    t0 = time.perf_counter()
    row = {"path": path, "backend": backend, "recover": recover}
    try:
        got = read_frames(path, num_frames=16, backend=backend, recover=recover)
        row.update(indices=got.indices.tolist(), numbers=[read_frame_number(f) for f in got.frames],
                   dropped=got.dropped.tolist(), num_frames=got.meta.num_frames)
    except Exception as e:
        row.update(error=type(e).__name__, message=str(e))
    row["seconds"] = time.perf_counter() - t0
    print(json.dumps(row), flush=True)
"""


@pytest.fixture(scope="module")
def bad_results(videos) -> dict:
    """Every bad file with both backends, in a child process with a deadline: no hang, no crash."""
    paths = {name: str(videos.get(name, Path(videos["plain"]).parent / "missing.mp4")) for name in BAD}
    cases = [[paths[n], b, False] for n in BAD for b in BACKENDS]
    cases += [[paths[n], b, True] for n in ("corrupted", "truncated_faststart") for b in BACKENDS]
    proc = subprocess.run(
        [sys.executable, "-c", _BAD_SCRIPT, json.dumps(cases)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == len(cases)
    by_path = {v: k for k, v in paths.items()}
    return {(by_path[r["path"]], r["backend"], r["recover"]): r for r in rows}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_file_gives_decode_error_naming_file_and_cause_quickly(bad_results, videos, name, backend):
    row = bad_results[(name, backend, False)]
    assert row.get("error") == "DecodeError", row
    assert row["message"].startswith(row["path"] + ": ")
    cause = BAD[name] if isinstance(BAD[name], str) else BAD[name][backend]
    assert cause in row["message"]
    assert row["seconds"] < 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_recover_returns_the_frames_around_the_damage(bad_results, backend):
    row = bad_results[("corrupted", backend, True)]
    assert "error" not in row, row
    assert row["numbers"] == row["indices"]  # what comes back is exactly what it claims
    assert len(row["dropped"]) >= 1 and len(row["indices"]) >= 8
    assert not set(row["dropped"]) & set(row["indices"])
    assert row["num_frames"] == 100  # damage in the middle leaves the frame count as it was


@pytest.mark.parametrize("backend", BACKENDS)
def test_recover_on_a_truncated_file_samples_the_frames_that_decode(bad_results, backend):
    # the last packets left in the file decode to nothing: the table is rebuilt from decoding, so the
    # request spreads over the frames that exist instead of dropping the ones past the real end
    row = bad_results[("truncated_faststart", backend, True)]
    assert "error" not in row, row
    assert row["dropped"] == [] and len(row["indices"]) == 16
    assert row["numbers"] == row["indices"] and row["indices"][-1] == row["num_frames"] - 1
    assert 16 <= row["num_frames"] < 100


# ---------------------------------------------------------------- memory, threads, stage


@pytest.fixture(scope="module")
def trap_video(tmp_path_factory) -> Path:
    """250 frames of 320x240: about 58 MB once decord has decoded all of it in the background."""
    return write_video(tmp_path_factory.mktemp("trap") / "trap.mp4", 250, 320, 240, preset="ultrafast")


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


# a decord reader kept alive after get_batch, in a fresh process: its growth is not hidden by memory that
# earlier reads freed but the process kept (which, after the 33 reads of the test below, it was once)
_TRAP_SCRIPT = """
import gc, sys, time
import decord, psutil
def rss_mb():
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20
path, bound_mb = sys.argv[1], float(sys.argv[2])
warm = decord.VideoReader(path)  # codec tables loaded first, and the reader stopped and dropped as ours are
warm.get_batch([0])
warm.seek(0)
del warm
before = rss_mb()
reader = decord.VideoReader(path)
reader.get_batch([0, 100])
grown, deadline = 0.0, time.monotonic() + 300  # a hang guard only: it decodes on in the background
while grown <= bound_mb and time.monotonic() < deadline:
    time.sleep(0.1)
    grown = rss_mb() - before
reader.seek(0)
print(grown)
"""


def test_decord_memory_stays_flat_over_many_videos_and_the_trap_would_not(trap_video):
    bound_mb = 20  # measured: about 4 MB over 30 reads; a reader kept alive grows about 40 MB
    for _ in range(3):  # warm up allocator pools and codec tables
        read_frames(trap_video, num_frames=8, backend="decord")
    before = _rss_mb()
    for _ in range(30):
        assert len(read_frames(trap_video, num_frames=8, backend="decord").frames) == 8
    time.sleep(0.3)  # a reader left running would keep growing meanwhile
    assert _rss_mb() - before < bound_mb

    trap = subprocess.run([sys.executable, "-c", _TRAP_SCRIPT, str(trap_video), str(bound_mb)],
                          capture_output=True, text=True, timeout=600)
    assert trap.returncode == 0, trap.stderr[-2000:]
    assert float(trap.stdout) > bound_mb  # the same bound catches a reader kept alive after get_batch


def test_concurrent_reads_in_threads_each_get_their_own_reader(videos):
    errors, results = [], []

    def work(backend: str) -> None:
        try:
            for _ in range(5):
                results.append(numbers(read_frames(videos["plain"], num_frames=4, backend=backend)))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(b,)) for b in BACKENDS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 20
    assert all(r == [0, 33, 66, 99] for r in results)


def test_stage_adds_frame_columns_and_turns_bad_videos_into_error_rows(videos):
    stage = DecodeStage(DecodeConfig(num_frames=4, size=48))
    missing = str(Path(videos["plain"]).parent / "nope.mp4")
    batch = {
        "id": np.array(["a", "b", "c", "d"]),
        "video": np.array(
            [str(videos["plain"]), missing, str(videos["vfr"]), str(videos["corrupted"])], dtype=object
        ),
        "start": np.array([1.0, np.nan, np.nan, np.nan]),
        "end": np.array([2.0, np.nan, np.nan, np.nan]),
    }
    began = time.perf_counter()
    out = stage(batch)
    wall = time.perf_counter() - began
    assert out["id"].tolist() == ["a", "b", "c", "d"]
    assert out["error"][0] is None and out["error"][2] is None
    assert out["error"][1] == f"{missing}: no such file"
    assert out["error"][3].startswith(str(videos["corrupted"]) + ": corrupt video data")
    assert out["frames"][1].shape == (0, 0, 0, 3) and out["frames"][1].dtype == np.uint8
    assert out["frame_indices"][3].shape == (0,) and out["timestamps"][1].shape == (0,)
    assert (
        [read_frame_number(f) for f in out["frames"][0]]
        == out["frame_indices"][0].tolist()
        == [25, 33, 41, 49]
    )
    assert out["frames"][0].shape == (4, 48, 64, 3)
    np.testing.assert_allclose(out["timestamps"][2], vfr_timestamps(100)[[0, 33, 66, 99]])
    # each row's own decode time: all measured, and together no more than the call took
    assert out["decode_seconds"].dtype == np.float64 and (out["decode_seconds"] > 0).all()
    assert out["decode_seconds"].sum() <= wall


def test_stage_without_window_columns_and_bad_config(videos):
    stage = DecodeStage(DecodeConfig(num_frames=2, backend="decord", size=None))
    out = stage({"video": [str(videos["short"])]})
    assert out["frame_indices"][0].tolist() == [0, 4]
    with pytest.raises(ValueError, match="unknown decode backend"):
        DecodeStage(DecodeConfig(backend="nope"))
    with pytest.raises(ValueError, match="read_frames only"):
        DecodeStage(DecodeConfig(strategy="indices"))
