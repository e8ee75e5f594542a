"""The command line as a user meets it: config mistakes refused with exit status 2 and one line, Ctrl-C
stopping a job cleanly (exit status 130, one line, a rerun resumes), captions with the clip's id, and a
console that says what it is doing."""

import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from held_url import HeldUrl
from omegaconf import OmegaConf

from pipelines.cli import (
    EXIT_INTERRUPTED,
    EXIT_SETUP,
    check_command_line,
    files_written,
    resume_hint,
    stop_on_interrupt,
)
from pipelines.config import ConfigError, JobConfig, compose_job
from pipelines.job import clip_ids, interrupts_held, one_per_clip, run_job
from pipelines.manifest import Question, VideoItem
from pipelines.runner import Node, actors_loading, first_clip, placement
from pipelines.sink import OutputSink
from synthqa.sample_videos import write_video

ROOT = Path(__file__).resolve().parent.parent
SYNTH = ROOT / "models" / "synth"


def refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """What `check_command_line` prints when it refuses `argv` (it must: exit status 2, one line)."""
    with pytest.raises(SystemExit) as exited:
        check_command_line("config", JobConfig, argv)
    assert exited.value.code == EXIT_SETUP
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize(("override", "line"), [
    ("compression.dominat=30",
     "error: compression.dominat=30: no such key in compression (did you mean compression.dominant?)"),
    ("compression=visionzip_temporl",
     "error: compression=visionzip_temporl: compression has no option 'visionzip_temporl' (did you mean "
     "compression=visionzip_temporal?); the options: dominant_only, none, pool, random, visionzip, "
     "visionzip_temporal"),
    ("decode.num_frames=eight",
     "error: decode.num_frames=eight: Value 'eight' of type 'str' could not be converted to Integer"),
    ("+compresion.dominant=30",
     "error: +compresion.dominant=30: no such key in the config (did you mean compression?)"),
    ("+pipeline.generation.max_new_tokns=3",
     "error: +pipeline.generation.max_new_tokns=3: no such key in pipeline.generation (did you mean "
     "pipeline.generation.max_new_tokens?)"),
    ("compression.dominant=10,12",
     "error: Ambiguous value for argument 'compression.dominant=10,12': 1. To use it as a list, use "
     "key=[value1,value2]; 2. To use it as string, quote the value: key='value1,value2'; 3. To sweep over "
     "it, add --multirun to your command line"),
    ("compression.dominant=[1",
     "error: compression.dominant=[1: no viable alternative at input '[1' (the override grammar: "
     "https://hydra.cc/docs/advanced/override_grammar/basic)"),
])  # fmt: skip
def test_a_config_mistake_exits_2_with_one_line_naming_it(override, line, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert refused(["data.manifest=q.jsonl", override], capsys) == line


def test_run_py_refuses_a_typo_before_hydra_runs_anything(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["run.py", "data.manifest=q.jsonl", f"hydra.run.dir={tmp_path}",
                                      "decode.num_frames=eight"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
    assert exited.value.code == EXIT_SETUP
    assert capsys.readouterr().err.splitlines() == [
        "vzpipe: loading the pipeline (torch, transformers: a few seconds) ...",
        "error: decode.num_frames=eight: Value 'eight' of type 'str' could not be converted to Integer"]
    assert list(tmp_path.iterdir()) == []  # Hydra made no run folder


@pytest.mark.parametrize(("script", "override", "line"), [
    ("tune.py", "tune.stpes=3", "error: tune.stpes=3: no such key in tune (did you mean tune.steps?)"),
    ("synthqa/demo.py", "compression.dominat=3",
     "error: compression.dominat=3: no such key in compression (did you mean compression.dominant?)"),
])  # fmt: skip
def test_tune_and_the_demo_refuse_a_typo_like_run_py(script, override, line, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", [script, "+experiment=demo", f"hydra.run.dir={tmp_path}", override]
                        if script.startswith("synthqa") else [script, f"hydra.run.dir={tmp_path}", override])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exited.value.code == EXIT_SETUP
    assert capsys.readouterr().err.splitlines() == [line]
    assert list(tmp_path.iterdir()) == []  # Hydra made no run folder


def test_a_sweep_is_checked_value_by_value_before_its_first_job(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    good = ["-m", "data.manifest=q.jsonl", "compression=none,visionzip", "compression.dominant=14,30",
            "+experiment=demo", "hydra.sweep.dir=/tmp/unused"]
    check_command_line("config", JobConfig, good)  # passes: nothing printed, no exit
    assert capsys.readouterr().err == ""
    # the typo is the sweep's last value: refused before any job, naming the sweep
    assert refused([*good[:2], "compression=none,visionzip,visionzip_temporl", *good[3:]], capsys) == (
        "error: compression=none,visionzip,visionzip_temporl: compression has no option "
        "'visionzip_temporl' (did you mean compression=visionzip_temporal?); the options: dominant_only, "
        "none, pool, random, visionzip, visionzip_temporal")
    assert refused([*good, "compression.temporal.threshhold=0.5,0.9"], capsys) == (
        "error: compression.temporal.threshhold=0.5,0.9: no such key in compression.temporal (did you mean "
        "compression.temporal.threshold?)")


def test_an_added_key_the_schema_lacks_is_refused_by_compose_too():
    with pytest.raises(ConfigError, match=r"^invalid configuration:\n  compresion: no such key in the config "
                                          r"\(did you mean compression\?\)$"):
        compose_job("data.manifest=q.jsonl", "output.path=o.jsonl", "+compresion.dominant=30")


@pytest.fixture(scope="module")
def windows(tmp_path_factory) -> Path:
    """A manifest of 16 short windows of one small clip, one question each (the synth model's size)."""
    root = tmp_path_factory.mktemp("windows")
    write_video(root / "v.mp4", num_frames=30, width=112, height=112)
    rows = [{"id": f"w{i}", "video": "v.mp4", "start": i * 0.03, "end": i * 0.03 + 0.5, "question": "What?"}
            for i in range(16)]
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "q.jsonl"


def test_ctrl_c_stops_the_job_with_one_line_and_a_rerun_resumes(windows, tmp_path):
    out, manifest = tmp_path / "out.jsonl", tmp_path / "q.jsonl"
    with HeldUrl() as held:  # the last clip: the job waits there, every window's row written
        manifest.write_text(windows.read_text() + json.dumps({"id": "held", "video": held.url,
                                                                "question": "What?"}) + "\n")
        overrides = ["model=synth", f"data.manifest={manifest}", f"data.video_root={windows.parent}",
                     f"output.path={out}", "runner=local", "decode.size=null", "decode.num_frames=4",
                     "pipeline.generation.max_new_tokens=2", "resources.decode.batch_size=1",
                     "decode.remote.tries=1", "decode.remote.timeout=600"]
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        command = [sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={tmp_path}"]
        job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # its own group, as a terminal's Ctrl-C
        held.wait_for_reader(lambda: job.poll() is None)
        os.killpg(job.pid, signal.SIGINT)
        stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert out.read_text().count("\n") == 16  # every window's row, none for the clip it stopped in
    last = stderr.strip().splitlines()[-1]
    assert last == f"interrupted: 16 rows saved in {out}; rerun the same command to resume"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert not (tmp_path / "out.summary.json").exists()  # stopped: no summary claims a finished job
    # the lock is free and the same settings resume: the rows saved are not asked again (the held URL is
    # closed now: its clip is an error row)
    summary = run_job(compose_job(*overrides))
    assert (summary["this_run"]["rows"], summary["rows"], summary["ok"]) == (1, 17, 16)
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == sorted(
        [f"w{i}" for i in range(16)] + ["held"])


def test_a_second_ctrl_c_while_the_job_stops_exits_at_once(monkeypatch, capfd):
    class Forced(Exception):  # noqa: N818 - stands for os._exit here
        pass

    def exit_now(code: int) -> None:
        raise Forced(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    cfg = OmegaConf.create({"output": {"path": "out.jsonl"}})
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Forced) as forced, stop_on_interrupt(cfg):
        try:
            signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: the job starts stopping ...
        except KeyboardInterrupt:
            signal.raise_signal(signal.SIGINT)  # ... and a second one during its cleanup forces
    assert forced.value.args == (EXIT_INTERRUPTED,)
    assert capfd.readouterr().err == "\ninterrupted again: exiting now\n"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_the_resume_hint_names_the_output_when_the_command_does_not():
    out = Path("outputs/2026-01-01/12-00-00/predictions.jsonl")  # the run's own Hydra folder: new each run
    default = OmegaConf.create({"output": {"path": "${hydra:runtime.output_dir}/predictions.jsonl"}})
    assert resume_hint(default, out) == f"rerun the same command with output.path={out} to resume"
    named = OmegaConf.create({"output": {"path": "out/preds.jsonl"}})
    assert resume_hint(named, Path("out/preds.jsonl")) == "rerun the same command to resume"


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler (KeyboardInterrupt), whatever this process inherited: a shell starts a
    background job with SIGINT ignored, and Python then installs no handler."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_during_a_rows_write_waits_for_it(tmp_path, python_ctrl_c):
    with OutputSink(tmp_path / "out.parquet") as sink:
        with pytest.raises(KeyboardInterrupt), interrupts_held():
            signal.raise_signal(signal.SIGINT)  # Ctrl-C as the row is being written ...
            sink.write({"id": "a", "prediction": "p", "error": None})
        assert [row["id"] for row in sink.rows] == ["a"]  # ... lands after it: recorded, counted, kept
        sink.close()
    assert pq.read_table(tmp_path / "out.parquet").column("id").to_pylist() == ["a"]


def question(qid: str, video: str, text: str | None, category: str | None = None, start: float | None = None,
             end: float | None = None) -> Question:
    return Question(qid, video, text, answer="x" if text else None, start=start, end=end, category=category,
                    extra={"shot": qid})


def test_captions_are_one_row_per_clip_with_the_clips_id(caplog):
    questions = [
        question("a-what", "/v/a.mp4", "What?", "what"), question("a-where", "/v/a.mp4", "Where?", "where"),
        question("a-win", "/v/a.mp4", "What?", "what", start=2.0, end=10.5),
        question("b-what", "/v/b.mp4", "What?", "what"),  # one question: still a question, not the clip
        question("cat", "/v/c.mp4", None, "animals"),  # a captioning manifest's row: kept as it is
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="pipelines.job"):
        rows = one_per_clip(questions, "Describe it.")
    assert [(r.id, r.question, r.category, r.answer, r.start, r.end, r.extra) for r in rows] == [
        ("a", "Describe it.", None, None, None, None, {}),
        ("a@2-10.5s", "Describe it.", None, None, 2.0, 10.5, {}),
        ("b", "Describe it.", None, None, None, None, {}),
        ("cat", "Describe it.", "animals", None, None, None, {"shot": "cat"}),
    ]
    assert "captioning: the manifest's 5 rows name 4 clips, one caption each" in caplog.messages


def test_clip_ids_name_the_video_and_window_and_stay_unique():
    assert clip_ids([VideoItem("/v/talk.mp4", 30.0, None), VideoItem("/v/talk.mp4", None, 8.0)]) == [
        "talk@30s-end", "talk@0-8s"]
    # one name in two folders, or a name a kept row already has: the whole path tells them apart
    assert clip_ids([VideoItem("/v/1/a.mp4", None, None), VideoItem("/v/2/a.mp4", None, None)]) == [
        "/v/1/a.mp4", "/v/2/a.mp4"]
    assert clip_ids([VideoItem("s3://b/a.mp4", None, None)], taken={"a"}) == ["s3://b/a.mp4"]


def test_the_console_says_what_runs_and_where_the_files_are(windows, tmp_path, caplog):
    out, two = tmp_path / "out.jsonl", tmp_path / "two.jsonl"
    two.write_text("".join(windows.read_text().splitlines(keepends=True)[:2]))
    job = compose_job("model=synth", f"data.manifest={two}", f"data.video_root={windows.parent}",
                      f"output.path={out}", "runner=local", "decode.size=null", "decode.num_frames=4",
                      "pipeline.generation.max_new_tokens=2")
    with caplog.at_level(logging.INFO):
        summary = run_job(job)
    messages = caplog.messages
    assert messages[messages.index(f"loading {SYNTH} (both halves: encode and answer share it in this "
                                   "process) ...") + 1].startswith(f"loaded {SYNTH} in ")
    assert files_written(summary) == (f"        files  in {tmp_path}/: out.jsonl, out.summary.json, "
                                      "out.timeline.txt" + (", out.timeline.png" if
                                                            (tmp_path / "out.timeline.png").exists() else ""))
    # with Ray the actors load the halves: the driver says so, then when the first clip's actors were ready
    nodes = [Node("n1", 4.0, 0)]
    assert actors_loading(job, placement(job, nodes)) == (
        f"starting the actors (1 encode, 1 answer): each starts a worker and loads its half of {SYNTH}; the "
        "first answers follow ...")
    vllm = compose_job("model=synth", "data.manifest=q.jsonl", "output.path=o.jsonl", "pipeline.engine=vllm",
                       "compression.positions=compact")
    assert actors_loading(vllm, placement(vllm, nodes)).endswith(
        f"loads its half of {vllm.model.path}; each answer actor then starts a vLLM engine (the first start "
        "compiles, about a minute); the first answers follow ...")
    started = time.time() - 30.0
    line = first_clip({"encode_ready_at": started + 12.0, "answer_ready_at": started + 20.5}, started)
    assert line.startswith("first clip answered 30.") and line.endswith(
        " s after the stages started (its actors were ready after: encode 12.0 s, answer 20.5 s)")
