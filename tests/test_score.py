"""Scoring predictions: exact match, multiple choice (lmms-eval's letter extraction), an LLM judge against
a loopback OpenAI-compatible server (quirky replies, retries, timeouts, the verdict store, a SIGKILL and
resume), bootstrap intervals over videos, and a -m sweep's table."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.score import (
    JUDGE_SYSTEM,
    PROMPT_VERSION,
    JudgeConfig,
    JudgeError,
    bootstrap_ci,
    extract_choice,
    format_table,
    judge_messages,
    main,
    normalize,
    parse_verdict,
    read_rows,
    score_file,
    score_rows,
    sweep_table,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "expected"),
    [("The Red.", "red"), ("  a   circle!", "circle"), ("LEFT", "left"), (None, ""),
     ("an apple, the end", "apple end"), ("three", "three"), ("theatre", "theatre")],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


# ----------------------------------------------------------------------------------------------- exact


def _row(qid, prediction, answer, category, video, error=None, kept=136):
    return {"id": qid, "video": video, "prediction": prediction, "answer": answer, "category": category,
            "options": None, "error": error, "visual_tokens_kept": kept, "answer_seconds": 0.5}  # fmt: skip


ROWS = [
    _row("00000-color", "Red.", "red", "color", "v0.mp4"),
    _row("00000-count", "two", "three", "count", "v0.mp4"),
    _row("00001-color", "blue", "green", "color", "v1.mp4"),
    _row("00001-count", None, "one", "count", "v1.mp4", error="decode: broken"),
    _row("00002-color", "The green", "green", "color", "v2.mp4", kept=100),
    _row("00002-half", "top", None, "half", "v2.mp4"),  # no ground truth: not scored
]


def _plain(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "ci95"}


def test_exact_per_category_and_overall():
    result = score_rows(ROWS)
    assert result["metric"] == "exact" and result["requests"] == 0
    assert {c: _plain(g) for c, g in result["by_category"].items()} == {
        "color": {"n": 3, "correct": 2, "accuracy": 2 / 3, "unparseable": 0, "errors": 0},
        "count": {"n": 2, "correct": 0, "accuracy": 0.0, "unparseable": 0, "errors": 1},
    }
    assert _plain(result["overall"]) == {"n": 5, "correct": 2, "accuracy": 0.4, "unparseable": 0, "errors": 1}
    assert result["unscored"] == 1
    assert result["visual_tokens_kept_mean"] == pytest.approx((136 * 4 + 100) / 5)
    assert result["answer_seconds_mean"] == 0.5
    assert "score" not in result["overall"] and "judge_model" not in result


def test_category_only_from_the_column_and_old_files_without_it():
    rows = [{"id": "q1-color", "prediction": "x", "answer": "x"},  # an id suffix is no category any more
            {"id": "q-2", "category": "what", "prediction": "y", "answer": "x"},
            {"id": "q-3", "category": None, "prediction": "x", "answer": "x"}]  # fmt: skip
    result = score_rows(rows)
    assert {c: g["accuracy"] for c, g in result["by_category"].items()} == {"all": 1.0, "what": 0.0}
    assert result["by_category"]["all"]["n"] == 2


def test_ci95_resamples_videos_deterministically():
    # 9 videos of 1 to 4 questions, 13 of 20 right
    right = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1]
    videos = list("aaabbbccddeeeefgghhi")
    low, high = bootstrap_ci(right, videos)
    assert (low, high) == pytest.approx((0.42082043343653247, 0.8695652173913043), abs=1e-12)  # SEED 0
    assert bootstrap_ci(right, videos) == [low, high]  # seeded
    assert bootstrap_ci(right, videos, seed=1) != [low, high]
    assert bootstrap_ci([1, 0, 1, 1], ["one"] * 4) == [0.75, 0.75]  # one video: nothing to resample
    assert bootstrap_ci([], []) is None
    # questions of one video move together: wider than if every question were its own video
    independent = bootstrap_ci(right, list(range(20)))
    assert high - low > independent[1] - independent[0]
    # in a result: overall and per category, over the same videos
    result = score_rows(ROWS)
    assert result["overall"]["ci95"] == bootstrap_ci([1, 0, 0, 0, 1], ["v0.mp4", "v0.mp4", "v1.mp4",
                                                                        "v1.mp4", "v2.mp4"])  # fmt: skip
    assert result["by_category"]["count"]["ci95"] == [0.0, 0.0]


def test_cli_on_jsonl_and_parquet(tmp_path, capsys):
    jsonl = tmp_path / "out.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    result = main([str(jsonl)])
    printed = capsys.readouterr().out
    assert "| overall | 5 | 2 | 1 | 0.400 |" in printed and "| color | 3 | 2 | 0 | 0.667 |" in printed
    written = json.loads((tmp_path / "out.scores.json").read_text())
    assert written == result and written["source"] == str(jsonl) and written["overall"]["correct"] == 2
    old = [{k: v for k, v in r.items() if k not in ("category", "options")} for r in ROWS]  # an old file
    parquet = tmp_path / "out.parquet"
    pq.write_table(pa.Table.from_pylist(old), parquet)
    assert read_rows(parquet) == old
    from_parquet = main([str(parquet), "--scores", str(tmp_path / "p.json")])
    assert _plain(from_parquet["overall"]) == _plain(result["overall"])
    assert list(from_parquet["by_category"]) == ["all"]
    assert json.loads((tmp_path / "p.json").read_text())["source"] == str(parquet)
    header = format_table(result).splitlines()[0]
    assert header == "| category | n | correct | errors | accuracy | ci95 | unparseable |"


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_rows(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        read_rows(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "1", "prediction": "a"}) + "\n")
    with pytest.raises(SystemExit, match="no row has an answer"):
        main([str(empty)])
    assert not (tmp_path / "empty.scores.json").exists()
    with pytest.raises(ValueError, match="metric must be one of"):
        score_rows(ROWS, metric="bleu")
    with pytest.raises(ValueError, match="needs a judge"):
        score_rows(ROWS, metric="judge")
    with pytest.raises(SystemExit):  # argparse: --metric judge without --judge-url / --judge-model
        main([str(empty), "--metric", "judge"])
    mc = {"id": "m", "prediction": "A", "answer": "F", "options": ["x", "y"]}
    with pytest.raises(ValueError, match="row 'm': answer 'F' is not the letter of one of its 2 options"):
        score_rows([mc])


# ---------------------------------------------------------------------------------------------- choice

OPTIONS = ["red circle", "blue square", "green triangle", "yellow star"]


@pytest.mark.parametrize(
    ("reply", "letter"),
    [("B", "B"), ("b", "B"), ("(B)", "B"), ("[B]", "B"), ("B.", "B"), ("B)", "B"), ("B: blue square", "B"),
     ("B. red circle", "B"),  # the letter, marked as one, wins over the text after it
     ("The best answer is C.", "C"), ("The correct answer is (D)", "D"), ("Answer: (D) yellow star", "D"),
     ("the answer is b", "B"), ("Best option: (b)", "B"), ("**C**", "C"), ("'C'", "C"),
     ("The blue square.", "B"),  # the whole reply is an option's text
     ("A red circle", "A"), ("A blue square", "B"),  # "A" as an article: the text decides
     ("C green", "C"), ("I think (C) is right", "C"), ("It is C, the one that moves.", "C"),
     ("The object is a green triangle moving left", "C"),  # one option's text inside the reply
     ("green triangle or blue square", None),  # two: no choice
     ("red", None), ("E", None), ("The answer is E.", None),  # beyond the 4 options
     ("I don't know", None), ("", None), (None, None)],
)
def test_extract_choice(reply, letter):
    assert extract_choice(reply, OPTIONS) == letter


def test_extract_choice_options_with_their_own_letters_and_nested_texts():
    lettered = ["A. dark red", "B. red", "C. blue"]
    assert extract_choice("It was dark red", lettered) == "A"  # "red" inside "dark red" drops out
    assert extract_choice("red", lettered) == "B"
    assert extract_choice("B", lettered) == "B"


def _mc(qid, prediction, answer, category="attr", video="v0", error=None):
    return {"id": qid, "video": video, "question": f"question {qid}?", "prediction": prediction,
            "answer": answer, "category": category, "options": OPTIONS, "error": error}  # fmt: skip


def test_choice_metric_is_the_default_with_options():
    rows = [_mc("1", "The best answer is B.", "B"), _mc("2", "(C)", "B"), _mc("3", "blue square", "B"),
            _mc("4", "no idea", "A", category="count"), _mc("5", None, "A", category="count", error="decode"),
            _mc("6", "a", "a", video="v1"),  # a lowercase answer letter
            {"id": "7", "prediction": "The Red.", "answer": "red", "category": "open", "options": None},
            {**_mc("8", "D", None), "answer": None}]  # fmt: skip
    result = score_rows(rows)
    assert result["metric"] == "choice" and result["unscored"] == 1
    counts = {c: (g["n"], g["correct"], g["unparseable"], g["errors"])
              for c, g in result["by_category"].items()}  # fmt: skip
    assert counts == {"attr": (4, 3, 0, 0), "count": (2, 0, 1, 1), "open": (1, 1, 0, 0)}  # open-ended: exact
    assert result["overall"]["accuracy"] == 4 / 7
    assert score_rows(rows, metric="exact")["overall"]["correct"] == 2  # "a" == "a" and "red" == "red"


# ----------------------------------------------------------------------------------------------- judge


class JudgeServer:
    """An OpenAI-compatible chat-completions endpoint on loopback. `script(question, attempt)` returns
    (status, reply text, seconds to wait first); every request is counted per question."""

    def __init__(self, script, delay: float = 0.0):
        self.script, self.delay = script, delay
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][1]["content"]
                question = user.split("Question: ", 1)[1].split("\nCorrect Answer:", 1)[0]
                with server.lock:
                    server.seen[question] += 1
                    attempt = server.seen[question]
                server.bodies.append(body)
                status, text, wait = server.script(question, attempt)
                time.sleep(wait + server.delay)
                payload = {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                if status != 200:
                    payload = {"error": {"message": text, "type": "server_error"}}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.bodies: list[dict] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


QUIRKS = {  # question: the judge's reply, in the forms real judges produce
    "q0?": "{'pred': 'yes', 'score': 4}",
    "q1?": 'Here is my evaluation: {"pred": "NO", "score": "1"} Hope this helps!',
    "q2?": "{'pred': 'Yes', 'score': 5}",  # after one HTTP 500
    "q3?": "I cannot evaluate this answer without the video.",  # unparseable
    "q4?": "{'pred': 'YES', 'score': '3'}",  # after one reply slower than the timeout
}


def quirky(question: str, attempt: int) -> tuple[int, str, float]:
    if question == "q2?" and attempt == 1:
        return 500, "overloaded", 0.0
    if question == "q4?" and attempt == 1:
        return 200, "{'pred': 'no', 'score': 0}", 2.0
    return 200, QUIRKS.get(question, "{'pred': 'no', 'score': 0}"), 0.0


def _judged_rows() -> list[dict]:
    rows = [{"id": f"q{i}", "video": f"v{i // 2}", "question": f"q{i}?", "answer": "a red ball",
             "prediction": f"reply {i}", "category": "open", "error": None} for i in range(5)]  # fmt: skip
    rows.append({**rows[0], "id": "q5", "question": "q5?", "prediction": None, "error": "decode: broken"})
    rows.append({**rows[0], "id": "q0-again", "video": "v9"})  # the same triple: judged once
    rows.append({**rows[1], "id": "q-none", "answer": None})  # not scored
    return rows


def test_parse_verdict_forms():
    assert parse_verdict("{'pred': 'yes', 'score': 4}") == (True, 4)
    assert parse_verdict('Sure! {"pred": "No", "score": "2"}.') == (False, 2)
    assert parse_verdict("{'pred': 'YES', 'score': 4.8}") == (True, 4)  # truncated like int(4.8)
    assert parse_verdict("pred: no, score: 0") == (False, 0)
    for bad in ("yes", "{'pred': 'maybe', 'score': 3}", "{'pred': 'yes'}", "{'pred': 'yes', 'score': 9}",
                None):
        assert parse_verdict(bad) is None


def test_judge_messages_shows_options_and_the_correct_one():
    row = {**_mc("1", "B", "b"), "question": "What is it?"}
    assert judge_messages(row) == ("What is it?\nA. red circle\nB. blue square\nC. green triangle\n"
                                   "D. yellow star", "B. blue square", "B")  # fmt: skip


def test_judge_quirky_replies_retries_store_and_rerun(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    output = tmp_path / "predictions.jsonl"
    output.write_text("".join(json.dumps(r) + "\n" for r in _judged_rows()))
    with JudgeServer(quirky) as server:
        judge = JudgeConfig(url=server.url, model="judge-m", key_env="MY_JUDGE_KEY", concurrency=3, retries=2,
                            timeout=0.5, backoff=0.05)  # fmt: skip
        result = score_file(output, metric="judge", judge=judge)
        # five distinct triples, one 500 and one timeout retried: 7 requests, on both sides
        assert result["requests"] == 7 and sum(server.seen.values()) == 7
        assert server.seen == {"q0?": 1, "q1?": 1, "q2?": 2, "q3?": 1, "q4?": 2}
        body = server.bodies[0]
        assert body["temperature"] == 0 and body["model"] == "judge-m"
        assert body["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM}
        # verdicts: yes 4, no 1, yes 5, unparseable, yes 3; error row wrong; q0-again yes 4
        overall = result["overall"]
        assert (overall["n"], overall["correct"], overall["errors"], overall["unparseable"]) == (7, 4, 1, 1)
        assert overall["accuracy"] == 4 / 7
        assert overall["score"] == pytest.approx((4 + 1 + 5 + 0 + 3 + 0 + 4) / 7)
        assert result["unscored"] == 1
        assert (result["judge_model"], result["judge_url"], result["prompt_version"]) == (
            "judge-m", server.url, PROMPT_VERSION)
        assert json.loads((tmp_path / "predictions.scores.json").read_text()) == result
        store = tmp_path / "predictions.verdicts.sqlite"
        with closing(sqlite3.connect(store)) as db:
            assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 5
        # a rerun: every verdict from the store, not one request
        again = main([str(output), "--judge-url", server.url, "--judge-model", "judge-m",
                      "--judge-timeout", "0.5"])  # fmt: skip
        assert again["requests"] == 0 and sum(server.seen.values()) == 7
        assert {**again, "requests": 7} == result
        # another judge model is another verdict
        other = score_rows(_judged_rows(), metric="judge", judge=JudgeConfig(url=server.url, model="judge-2",
                           timeout=0.5, backoff=0.05), store_path=store)  # fmt: skip
        assert other["requests"] == 5 and sum(server.seen.values()) == 12  # (no 500 or timeout this time)


def test_judge_failures_stop_the_run_and_keep_what_was_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    def failing(question, attempt):
        if question == "q1?":
            return 401, "invalid api key", 0.0
        if question == "q2?":
            return 503, "down", 0.0
        return 200, "{'pred': 'yes', 'score': 5}", 0.0

    rows = _judged_rows()[:3]
    store = tmp_path / "v.sqlite"
    with JudgeServer(failing) as server:
        judge = JudgeConfig(url=server.url, model="m", concurrency=1, retries=2, timeout=5, backoff=0.01)
        with pytest.raises(JudgeError, match=r"HTTP 401 \(is the key in \$OPENAI_API_KEY\?\)"):
            score_rows(rows[:2], metric="judge", judge=judge, store_path=store)
        assert server.seen["q1?"] == 1  # not retried
        with pytest.raises(JudgeError, match="InternalServerError on 3 attempts"):
            score_rows([rows[0], rows[2]], metric="judge", judge=judge, store_path=store)
        assert server.seen == {"q0?": 1, "q1?": 1, "q2?": 3}  # q0's verdict was kept from the first run


def test_sigkill_while_judging_then_rerun_scores_each_question_once(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    rows = [{"id": f"k{i}", "video": f"v{i % 3}", "question": f"k{i}?", "answer": "two",
             "prediction": f"{i} things", "category": "count" if i % 2 else "color", "error": None}
            for i in range(8)]  # fmt: skip

    def verdict(question, attempt):
        i = int(question[1:-1])
        return 200, f"{{'pred': '{'yes' if i % 3 else 'no'}', 'score': {i % 6}}}", 0.0

    killed, clean = tmp_path / "killed" / "predictions.jsonl", tmp_path / "clean" / "predictions.jsonl"
    for output in (killed, clean):
        output.parent.mkdir()
        output.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = killed.with_name("predictions.verdicts.sqlite")
    with JudgeServer(verdict, delay=0.25) as server:
        args = ["--judge-url", server.url, "--judge-model", "m", "--judge-concurrency", "1",
                "--judge-timeout", "10"]  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.score", str(killed), *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        stored, deadline = 0, time.monotonic() + 60
        while stored < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
            if store.exists():
                with closing(sqlite3.connect(store, timeout=10)) as db:
                    try:
                        stored = db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
                    except sqlite3.OperationalError:  # the table is not there yet
                        pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with closing(sqlite3.connect(store)) as db:
            stored = db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
        assert proc.returncode == -signal.SIGKILL and 3 <= stored < 8
        assert not killed.with_name("predictions.scores.json").exists()
        resumed = main([str(killed), *args])
        seen = dict(server.seen)
        # each question asked once over both runs, but the one in flight at the kill
        assert set(seen) == {r["question"] for r in rows}
        assert sorted(seen.values())[:-1] == [1] * 7 and sorted(seen.values())[-1] in (1, 2)
        assert resumed["requests"] == 8 - stored  # what the store lacked, each once
        server.seen.clear()
        reference = main([str(clean), *args])
        assert reference["requests"] == 8
    same = ("overall", "by_category", "unscored", "metric", "judge_model", "prompt_version")
    assert {k: resumed[k] for k in same} == {k: reference[k] for k in same}
    assert resumed["overall"]["n"] == 8 and resumed["overall"]["unparseable"] == 0


# ---------------------------------------------------------------------------------------------- sweeps


def test_sweep_folder_gives_one_row_per_job_with_retention(tmp_path, capsys):
    jobs = {"0": (["compression=none", "data.manifest=q.jsonl"], ["red", "two", "up", "top"], 520),
            "1": (["compression=visionzip", "compression.dominant=4"], ["red", "one", "up", "top"], 40)}
    truth = [("color", "red", "v0"), ("count", "two", "v0"), ("direction", "up", "v1"),
             ("half", "bottom", "v1")]
    for name, (overrides, predictions, tokens) in jobs.items():
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        rows = [{"id": f"{v}-{c}", "video": v, "category": c, "answer": a, "prediction": p,
                 "visual_tokens_kept": tokens, "error": None}
                for (c, a, v), p in zip(truth, predictions, strict=True)]  # fmt: skip
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / name / "predictions.summary.json").write_text("{}")
    rows = main([str(tmp_path)])
    assert [(r["setting"], r["visual_tokens"], r["overall"], r["retention"]) for r in rows] == [
        ("compression=none", 520, 0.75, 1.0),
        ("compression=visionzip compression.dominant=4", 40, 0.5, 0.5 / 0.75),
    ]
    assert rows[1]["count"] == 0.0 and rows[0]["half"] == 0.0 and rows[0]["metric"] == "exact"
    assert all(r["ci95"][0] <= r["overall"] <= r["ci95"][1] for r in rows)
    table = (tmp_path / "scores_table.md").read_text()
    header, _, _, last = table.splitlines()
    assert header.split(" | ")[1:] == ["visual_tokens", "color", "count", "direction", "half", "overall",
                                       "ci95", "errors", "retention |"]  # fmt: skip
    cells = last.split(" | ")[1:]
    assert cells[:6] + cells[7:] == ["40.000", "1.000", "0.000", "1.000", "0.000", "0.500", "0", "0.667 |"]
    assert json.loads((tmp_path / "scores_table.json").read_text()) == rows
    assert json.loads((tmp_path / "1" / "predictions.scores.json").read_text())["overall"]["accuracy"] == 0.5
    assert table in capsys.readouterr().out
    with pytest.raises(ValueError, match="no job folders"):
        sweep_table(tmp_path / "0")
