"""The model's weights in the job's fingerprint: a checkpoint retrained in place, another hub commit or
another projector stops a resume; each weight file is hashed once and its digest cached."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants

from pipelines import fingerprint
from pipelines.config import compose_job
from pipelines.fingerprint import job_fingerprint, model_fingerprint
from pipelines.sink import OutputError, OutputSink, differences
from stages import digests
from stages.digests import file_digests
from stages.model import ModelConfig, read_model_config


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """The digest cache of these tests: under tmp_path, not the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "vzpipe"


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """Every file `stages.digests` reads to hash, in order."""
    calls: list[Path] = []
    real = digests._sha256

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(digests, "_sha256", counting)
    return calls


@pytest.fixture
def checkpoint(tiny_dir, tmp_path) -> Path:
    """A copy of the tiny model that a test may change."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "checkpoint"))


def flip_byte(path: Path, offset: int = -1) -> None:
    """Change one byte in place (same size) and give the file a later mtime, as retraining would."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_a_checkpoint_retrained_in_place_stops_the_resume(checkpoint, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a1", "video": "a.mp4", "question": "What?"}) + "\n")
    job = compose_job(f"model.path={checkpoint}", f"data.manifest={manifest}",
                      f"output.path={tmp_path / 'out.jsonl'}")
    before = job_fingerprint(job, read_model_config(checkpoint))
    with OutputSink(job.output.path, fingerprint=before) as sink:
        sink.write({"id": "a1", "prediction": "red"})
        sink.close()
    flip_byte(checkpoint / "model.safetensors")  # config.json, path and size as they were
    after = job_fingerprint(job, read_model_config(checkpoint))
    assert differences(before, after) == ["model.weights_sha256"]
    with pytest.raises(OutputError, match=r"model\.weights_sha256 differ"):
        OutputSink(job.output.path, fingerprint=after)
    flip_byte(checkpoint / "model.safetensors")  # the old bytes back, at yet another mtime: the same weights
    with OutputSink(job.output.path, fingerprint=job_fingerprint(job, read_model_config(checkpoint))) as sink:
        assert sink.done_ids == {"a1"}


def test_the_weights_digest_covers_every_weight_file_by_name(tmp_path):
    folder = tmp_path / "sharded"
    (folder / "checkpoint-500").mkdir(parents=True)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin", "extra.pt", "old.pth", "config.json",
                 "tokenizer.json", "checkpoint-500/model.safetensors"):
        (folder / name).write_text(name)
    assert [p.name for p in fingerprint.weight_files(folder)] == [
        "extra.pt", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "old.pth", "pytorch_model.bin"]
    first = _model(folder)["weights_sha256"]
    for other in ("config.json", "tokenizer.json", "checkpoint-500/model.safetensors"):  # not weights here
        (folder / other).write_text("changed")
    assert _model(folder)["weights_sha256"] == first
    (folder / "old.pth").write_text("retrained")  # another size: no mtime tick needed
    second = _model(folder)["weights_sha256"]
    assert second != first
    (folder / "old.pth").rename(folder / "new.pth")  # names count too
    assert _model(folder)["weights_sha256"] not in (first, second)


def test_an_unchanged_checkpoint_is_hashed_once(checkpoint, hashed, cache_home, caplog, monkeypatch):
    monkeypatch.setattr(digests, "_ANNOUNCE_BYTES", 1000)  # the tiny model's weights count as large
    with caplog.at_level(logging.INFO, logger="stages.digests"):
        first = _model(checkpoint)
    assert hashed == [checkpoint / "model.safetensors"]
    announced = [r.getMessage() for r in caplog.records if "weights once" in r.getMessage()]
    assert len(announced) == 1 and str(cache_home / "digests.json") in announced[0]
    cached = json.loads((cache_home / "digests.json").read_text())
    weights = str((checkpoint / "model.safetensors").resolve())
    assert cached[weights]["sha256"] == digests._sha256(checkpoint / "model.safetensors")
    hashed.clear()
    assert _model(checkpoint) == first and hashed == []  # read from the cache


def test_a_size_or_mtime_change_hashes_the_file_again(checkpoint, hashed):
    weights = checkpoint / "model.safetensors"
    first = _model(checkpoint)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: read again, same digest
    hashed.clear()
    assert _model(checkpoint) == first and hashed == [weights]
    stat = weights.stat()
    with weights.open("ab") as f:
        f.write(b"\0")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # grown at the same mtime
    hashed.clear()
    assert _model(checkpoint)["weights_sha256"] != first["weights_sha256"] and hashed == [weights]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"%s": "a digest without size or mtime"}'])
def test_a_corrupt_cache_is_recomputed(checkpoint, hashed, cache_home, content):
    weights = checkpoint / "model.safetensors"
    expected = _model(checkpoint)
    (cache_home / "digests.json").write_text(content.replace("%s", str(weights.resolve())))
    hashed.clear()
    assert _model(checkpoint) == expected and hashed == [weights]
    assert json.loads((cache_home / "digests.json").read_text())[str(weights.resolve())]["size"] == \
        weights.stat().st_size  # written anew, whole


def test_the_cache_forgets_files_that_are_gone(tmp_path, cache_home):
    gone, kept = tmp_path / "gone.bin", tmp_path / "kept.bin"
    gone.write_bytes(b"a")
    kept.write_bytes(b"b")
    file_digests([gone])
    gone.unlink()
    file_digests([kept])
    assert list(json.loads((cache_home / "digests.json").read_text())) == [str(kept.resolve())]


def test_the_hub_commit_is_recorded_from_the_local_cache(tmp_path, monkeypatch, hashed):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # read by huggingface_hub at import
    repo = hub / "models--org--video-llava"
    old, new = "a" * 40, "b" * 40

    def snapshot(commit: str, weights: bytes) -> None:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "snapshots" / commit / "model.safetensors").write_bytes(weights)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    snapshot(old, b"old weights")
    model = ModelConfig(path="org/video-llava")
    first = model_fingerprint(model, _Config())
    assert (first["revision"], first["weights_sha256"]) == (old, None) and hashed == []
    snapshot(new, b"new weights")  # `main` moved on
    second = model_fingerprint(model, _Config())
    assert second["revision"] == new and differences(first, second) == ["revision"]
    assert model_fingerprint(ModelConfig(path="org/not-cached"), _Config())["revision"] is None


def test_the_projector_digest_follows_its_file(checkpoint, tmp_path):
    projector = tmp_path / "projector.safetensors"
    projector.write_bytes(b"tuned projector weights")
    assert _model(checkpoint)["projector"] is None
    first = _model(checkpoint, projector_path=str(projector))
    assert first["projector"] == digests._sha256(projector)
    flip_byte(projector)
    second = _model(checkpoint, projector_path=str(projector))
    assert differences(first, second) == ["projector"]


class _Config:
    """A stand-in for a model's `PretrainedConfig`: only its `to_dict` is fingerprinted."""

    def to_dict(self) -> dict:
        return {"model_type": "video_llava"}


def _model(folder: Path, projector_path: str | None = None) -> dict:
    return model_fingerprint(ModelConfig(path=str(folder), projector_path=projector_path), _Config())
