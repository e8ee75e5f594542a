"""Videos and manifests by URL (stages/remote.py), against loopback servers the tests start: moto's S3
server (an S3-compatible store, reached through AWS_ENDPOINT_URL like any other) and a small HTTP server
written here that honours Range requests, counts what it serves, and can cut replies mid-body, hang, or
ignore Range. Frames read by URL must equal the frames read from the same local file."""

from __future__ import annotations

import http.server
import json
import logging
import math
import re
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from pipelines.config import compose_job
from pipelines.datasets import DataConfig, read_questions
from pipelines.job import run_job
from pipelines.manifest import ManifestError, read_manifest
from stages.decode import DecodeConfig, DecodeError, DecodeStage, read_frames
from stages.remote import RemoteConfig, RemoteFile

# retries without waiting; the timeout only a hang guard (a try timed out by a busy machine would change the
# counts of tries the tests assert)
FAST = RemoteConfig(tries=3, timeout=60.0, backoff=0.01)


def write_noise_video(path: Path, num_frames: int, width: int = 96, height: int = 64, gop: int = 25) -> Path:
    """Random pixels with a keyframe every `gop` frames: about 5 kB a frame, so a long video with large
    GOPs is written in a fraction of a second; every frame differs, so a wrong frame cannot pass."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for _ in range(num_frames):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote_videos")
    return {"short": write_noise_video(root / "short.mp4", 60, gop=10),
            "long": write_noise_video(root / "long.mp4", 1000)}


# ---------------------------------------------------------------- a loopback HTTP server


class RangeServer:
    """Serves `files` (name -> bytes) on 127.0.0.1 with Range support; `/denied/...` answers 403.
    `requests` lists (method, path, Range header); `served` counts body bytes sent. After `whole` GET
    replies, `drops` replies (math.inf: all) are cut off halfway through their body; `hang` holds replies
    until the server stops; `ranges=False` answers a Range request with the whole file (200)."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.served = files, [], 0
        self.whole, self.drops, self.dropped, self.gets, self.hang, self.ranges = 0, 0, 0, 0, False, True
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{name}"

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
                self._answer(head=True)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                name = self.path.lstrip("/")
                ranged = self.headers.get("Range")
                with server._lock:
                    server.requests.append(("HEAD" if head else "GET", name, ranged))
                if server.hang:
                    server._release.wait(30)
                    self.close_connection = True
                    return
                if name.startswith("denied/") or name not in server.files:
                    self.send_response(403 if name.startswith("denied/") else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files[name]
                body, status = data, 200
                if ranged and server.ranges and not head:
                    first, last = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", ranged).groups())
                    body, status = data[first : last + 1], 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                with server._lock:
                    drop = server.gets >= server.whole and server.dropped < server.drops
                    server.dropped += drop
                    server.gets += 1
                if drop:
                    body = body[: len(body) // 2]
                    self.close_connection = True
                self.wfile.write(body)
                with server._lock:
                    server.served += len(body)

        return Handler


@pytest.fixture
def http_server(videos):
    with RangeServer({name: path.read_bytes() for name, path in videos.items()}) as server:
        yield server


# ---------------------------------------------------------------- a loopback S3 (moto)


@pytest.fixture(scope="module")
def s3_endpoint(videos):
    """moto's S3 server on 127.0.0.1 with bucket `clips` holding the videos under `v/`."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        _s3_env(env, endpoint)
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="clips")
        for name, path in videos.items():
            client.put_object(Bucket="clips", Key=f"v/{name}.mp4", Body=path.read_bytes())
    yield endpoint
    server.stop()


def _s3_env(env: pytest.MonkeyPatch, endpoint: str) -> None:
    """The standard AWS environment pointing at the loopback store: what a user sets for MinIO & co."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        env.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        env.delenv(key, raising=False)


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    _s3_env(monkeypatch, s3_endpoint)
    return s3_endpoint


# ---------------------------------------------------------------- frames by URL equal frames from the file


def assert_same_frames(got, expected) -> None:
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_array_equal(got.timestamps, expected.timestamps)
    assert got.frames.shape == expected.frames.shape and (got.frames == expected.frames).all()


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_frames_from_s3_and_http_equal_the_local_file(videos, s3, http_server, backend):
    expected = read_frames(videos["long"], num_frames=8, backend=backend, size=None)
    for url in ("s3://clips/v/long.mp4", http_server.url("long")):
        got = read_frames(url, num_frames=8, backend=backend, size=None, remote=FAST)
        assert_same_frames(got, expected)
        assert got.meta.path == url
    window = read_frames(http_server.url("short"), start=0.5, end=1.5, num_frames=4, backend=backend,
                         remote=FAST)
    local = read_frames(videos["short"], start=0.5, end=1.5, num_frames=4, backend=backend)
    assert_same_frames(window, local)


def test_pyav_reads_byte_ranges_never_the_whole_file(videos, http_server):
    size = videos["long"].stat().st_size
    got = read_frames(http_server.url("long"), num_frames=4, remote=FAST)  # 4 frames of 40 GOPs
    assert_same_frames(got, read_frames(videos["long"], num_frames=4))
    gets = [r for r in http_server.requests if r[0] == "GET"]
    assert gets and all(ranged is not None for _, _, ranged in gets)
    assert http_server.served < 0.5 * size, (http_server.served, size)
    # decord reads only files: the URL is downloaded whole first (documented), pyav's way is the default
    http_server.served = 0
    read_frames(http_server.url("long"), num_frames=4, backend="decord", remote=FAST)
    assert http_server.served == size


def test_remote_file_fetches_growing_ranges_and_keeps_recent_ones(videos, http_server):
    data = videos["long"].read_bytes()
    config = RemoteConfig(block_size=1000, max_block=4000, tries=1)
    remote = RemoteFile(http_server.url("long"), config)
    assert remote.size == len(data)
    sizes = []
    while sum(sizes) < 8400:  # a read ends where its fetched range ends
        sizes.append(len(remote.read(8400 - sum(sizes))))
    assert sizes == [1000, 2000, 4000, 1400] and remote.requests == 4  # sequential reads: ranges double
    remote.seek(0)
    assert remote.read(8400) == data[:1000]  # bytes as in the file
    remote.seek(500)  # still cached: no request
    assert remote.read(100) == data[500:600] and remote.requests == 4
    remote.seek(-10, 2)  # a seek elsewhere starts again at block_size
    assert remote.read(100) == data[-10:] and remote.requests == 5
    assert remote.bytes_fetched == 1000 + 2000 + 4000 + 4000 + 10


# ---------------------------------------------------------------- failures: retried, then error rows


def test_connection_dropped_mid_read_is_retried_and_the_frames_are_right(videos, http_server):
    http_server.drops = 2  # the first two replies with a body are cut halfway
    got = read_frames(http_server.url("long"), num_frames=8, remote=FAST)
    assert http_server.dropped == 2
    assert_same_frames(got, read_frames(videos["long"], num_frames=8))


@pytest.mark.parametrize("whole", [1, 6], ids=["at-open", "mid-decode"])
def test_a_connection_that_always_drops_is_an_error_row(videos, http_server, capfd, whole):
    stage = DecodeStage(DecodeConfig(remote=FAST))
    http_server.whole, http_server.drops = whole, math.inf  # replies after the first `whole` are cut
    out = stage({"video": [http_server.url("long"), str(videos["short"])]})
    failed = re.escape(http_server.url("long")) + r": failed after 3 tries \(ClientPayloadError: .*\)"
    assert re.fullmatch(failed, out["error"][0])
    assert http_server.dropped == 3  # one range, tried three times, then nothing more is asked
    assert out["error"][1] is None and out["frames"][1].shape[0] == 8
    assert out["frames"][0].shape[0] == 0
    assert "exception being dropped" not in capfd.readouterr().err  # PyAV's noise when reads go on failing


def test_a_server_that_does_not_answer_times_out_after_the_tries(http_server):
    http_server.hang = True
    config = RemoteConfig(tries=2, timeout=0.3, backoff=0.0)
    t0 = time.perf_counter()
    with pytest.raises(DecodeError, match=re.escape(http_server.url("long")) + ": timed out after 2 tries$"):
        read_frames(http_server.url("long"), remote=config)
    assert time.perf_counter() - t0 < 20  # 2 x 0.3 s; the server would hold each reply 30 s


def test_missing_denied_and_unranged_objects_are_named_and_not_retried(http_server, s3):
    cases = {
        http_server.url("nope.mp4"): "no such object",
        http_server.url("denied/long"): "access denied (check credentials: the server refused the request",
        "s3://clips/v/nope.mp4": "no such object",
        "s3://no-bucket/v/long.mp4": "no such object",
    }
    for url, cause in cases.items():
        with pytest.raises(DecodeError) as caught:
            read_frames(url, remote=FAST)
        assert str(caught.value).startswith(f"{url}: {cause}")
    assert len([r for r in http_server.requests if r[1] == "nope.mp4"]) == 2  # fsspec's HEAD, then GET: once
    http_server.ranges = False  # a server that ignores Range would send the whole file for every read
    with pytest.raises(DecodeError, match="the server ignores Range requests"):
        read_frames(http_server.url("long"), remote=FAST)


def test_remote_settings_are_checked_with_the_decode_settings():
    problems = DecodeConfig(remote=RemoteConfig(tries=0, timeout=0, block_size=10, max_block=5)).problems()
    assert problems == ["remote.tries=0 must be >= 1", "remote.timeout=0 must be > 0 seconds",
                        "remote.needs 1 <= block_size <= max_block (got 10, 5)"]
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        read_frames("ftp://host/a.mp4")


# ---------------------------------------------------------------- manifests and a whole job


def test_manifest_videos_resolve_against_a_url_root_without_a_request(tmp_path, http_server):
    manifest = tmp_path / "q.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "video": "v/a.mp4", "question": "q"},
        {"id": "b", "video": "gs://other/b.mp4", "question": "q"},
        {"id": "c", "video": "file:///data/c%20d.mp4", "question": "q"},
        {"id": "d", "video": "/abs/d.mp4", "question": "q"},
    ]))
    questions = read_manifest(manifest, video_root="s3://bucket/root/")
    assert [q.video for q in questions] == ["s3://bucket/root/v/a.mp4", "gs://other/b.mp4", "/data/c d.mp4",
                                            "/abs/d.mp4"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "x", "video": "ftp://h/x.mp4", "question": "q"}))
    with pytest.raises(ManifestError, match=r"bad.jsonl:1: ftp://h/x.mp4: unsupported URL scheme 'ftp'"):
        read_manifest(tmp_path / "bad.jsonl")
    # a manifest by URL: its videos resolve against its own folder; nothing asks for the videos
    http_server.files["sets/q.jsonl"] = manifest.read_bytes()
    questions = read_manifest(http_server.url("sets/q.jsonl"))
    assert questions[0].video == http_server.url("sets/v/a.mp4")
    assert {name for _, name, _ in http_server.requests} == {"sets/q.jsonl"}
    missing = http_server.url("sets/none.jsonl")
    with pytest.raises(ManifestError, match=re.escape(missing) + ": no such object"):
        read_manifest(missing)


def test_a_published_sets_url_video_root_is_refused_naming_the_way_out(tmp_path):
    annotations = tmp_path / "test.jsonl"
    annotations.write_text(json.dumps({"question_id": "q1", "videoID": "v1", "question": "q",
                                       "options": ["A. a", "B. b"], "answer": "A"}) + "\n")
    data = DataConfig(format="videomme", annotations=str(annotations), video_root="s3://bucket/videos")
    with pytest.raises(ManifestError, match=r"data.video_root=s3://bucket/videos: .* list their URLs in a "
                                            r"manifest \(data.format=manifest\)"):
        read_questions(data)


def test_job_over_an_s3_manifest_answers_and_makes_the_missing_video_an_error_row(s3, tiny_dir, tmp_path):
    import boto3

    rows = [
        {"id": "l1", "video": "v/long.mp4", "question": "What is moving?"},
        {"id": "l2", "video": "v/long.mp4", "question": "What color is it?"},
        {"id": "s1", "video": "s3://clips/v/short.mp4", "question": "How many objects?"},
        {"id": "m1", "video": "v/missing.mp4", "question": "What is moving?"},
    ]
    boto3.client("s3").put_object(Bucket="clips", Key="q.jsonl",
                                  Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    out = tmp_path / "out.jsonl"
    summary = run_job(compose_job(
        f"model.path={tiny_dir}", "model.dtype=float32", "data.manifest=s3://clips/q.jsonl",
        f"output.path={out}", "runner=local", "pipeline.generation.max_new_tokens=2",
        "decode.remote.tries=2", "decode.remote.backoff=0",
    ))
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(got) == ["l1", "l2", "m1", "s1"]
    for qid in ("l1", "l2", "s1"):
        assert got[qid]["error"] is None and isinstance(got[qid]["prediction"], str), got[qid]
    assert got["l1"]["video"] == "s3://clips/v/long.mp4"
    assert got["m1"]["error"].startswith("s3://clips/v/missing.mp4: no such object")
    assert (summary["ok"], summary["error"]) == (3, 1)
    fingerprint = json.loads((tmp_path / "out.fingerprint.json").read_text())
    assert fingerprint["data"]["files"]["manifest"]["path"] == "s3://clips/q.jsonl"
    assert fingerprint["data"]["files"]["manifest"]["sha256"] is not None
