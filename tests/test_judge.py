"""The LLM judge against a loopback OpenAI-compatible server: quirky replies, retries, timeouts, re-asking
unparseable replies, the temperature as the reference sends it, the verdict store (an old one migrated, a
SIGKILL and resume), and the probe that finds a wrong URL, key or model before any work."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import closing
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipelines.judge import (
    JUDGE_SYSTEM,
    PROBE,
    PROMPT_VERSION,
    JudgeConfig,
    JudgeError,
    VerdictStore,
    judge_triples,
    parse_verdict,
    probe,
)
from pipelines.score import main, score_file, score_rows

ROOT = Path(__file__).resolve().parent.parent


class JudgeServer:
    """An OpenAI-compatible chat-completions endpoint on loopback. `script(question, attempt)` returns
    (status, reply text, seconds to wait first); every request is counted per question and its body kept.
    `served`: the model name its replies report (default: the one asked for)."""

    def __init__(self, script, served: str | None = None):
        self.script, self.served = script, served
        self.seen: Counter[str] = Counter()
        self.bodies: list[dict] = []
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
                time.sleep(wait)
                payload = {"id": "cmpl-1", "object": "chat.completion", "created": 0,
                           "model": server.served or body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                     "total_tokens": 2}}  # fmt: skip
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


def always(reply: str = "{'pred': 'yes', 'score': 5}", status: int = 200):
    """A script answering every request the same way."""
    return lambda question, attempt: (status, reply, 0.0)


@pytest.fixture(autouse=True)
def loopback_without_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


QUIRKS = {  # question: the judge's reply, in the forms real judges produce
    "q0?": "{'pred': 'yes', 'score': 4}",
    "q1?": 'Here is my evaluation: {"pred": "NO", "score": "1"} Hope this helps!',
    "q2?": "{'pred': 'Yes', 'score': 5}",  # after one HTTP 500
    "q3?": "I cannot evaluate this answer without the video.",  # unparseable
    "q4?": "{'pred': 'YES', 'score': '3'}",  # after one reply far slower than the timeout
}


# the judge's timeout where one reply must time out: every other reply must come well within it, however
# busy the machine (a reply that timed out by load would be asked again and counted)
TIMEOUT = 3.0


def quirky(question: str, attempt: int) -> tuple[int, str, float]:
    if question == "q2?" and attempt == 1:
        return 500, "overloaded", 0.0
    if question == "q4?" and attempt == 1:
        return 200, "{'pred': 'no', 'score': 0}", 60.0  # the client gives up first (a daemon thread waits)
    return 200, QUIRKS.get(question, "{'pred': 'no', 'score': 0}"), 0.0


def judged_rows() -> list[dict]:
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
                "", None):  # fmt: skip
        assert parse_verdict(bad) is None


def test_judge_settings_are_checked():
    assert JudgeConfig(url="u", model="m").problems() == []
    assert JudgeConfig(url="u", model="m", reask=-1, temperature=3).problems() == [
        "judge.reask must be >= 0, got -1", "judge.temperature must be in [0, 2] or null, got 3"]
    with pytest.raises(ValueError, match="judge.model must be set"):
        judge_triples([("q", "a", "p")], JudgeConfig(url="http://127.0.0.1:9/v1"))


def test_judge_quirky_replies_retries_store_and_rerun(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    output = tmp_path / "predictions.jsonl"
    output.write_text("".join(json.dumps(r) + "\n" for r in judged_rows()))
    with JudgeServer(quirky) as server:
        judge = JudgeConfig(url=server.url, model="judge-m", key_env="MY_JUDGE_KEY", concurrency=3, retries=2,
                            timeout=TIMEOUT, backoff=0.05, reask=0)  # fmt: skip
        result = score_file(output, metric="judge", judge=judge)
        # five distinct triples, one 500 and one timeout retried: 7 requests, on both sides
        assert result["requests"] == 7 and sum(server.seen.values()) == 7
        assert server.seen == {"q0?": 1, "q1?": 1, "q2?": 2, "q3?": 1, "q4?": 2}
        body = server.bodies[0]
        assert body["model"] == "judge-m" and "temperature" not in body  # the API's default, as the reference
        assert body["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM}
        # verdicts: yes 4, no 1, yes 5, unparseable, yes 3; error row wrong; q0-again yes 4
        overall = result["overall"]
        counts = [overall[k] for k in ("n", "correct", "wrong", "errors", "unparseable")]
        assert counts == [7, 4, 2, 1, 1]
        assert overall["accuracy"] == 4 / 7
        assert overall["score"] == pytest.approx((4 + 1 + 5 + 0 + 3 + 0 + 4) / 7)
        assert result["unscored"] == 1
        assert result["judge"] == {**asdict(judge), "prompt_version": PROMPT_VERSION}
        assert json.loads((tmp_path / "predictions.scores.json").read_text()) == result
        store = tmp_path / "predictions.verdicts.sqlite"
        with closing(sqlite3.connect(store)) as db:
            assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 5
        # a rerun: every verdict from the store, not one request
        again = main([str(output), "--judge-url", server.url, "--judge-model", "judge-m",
                      "--judge-timeout", str(TIMEOUT), "--judge-reask", "0"])  # fmt: skip
        assert again["requests"] == 0 and sum(server.seen.values()) == 7
        assert {k: v for k, v in again.items() if k not in ("requests", "judge")} == \
            {k: v for k, v in result.items() if k not in ("requests", "judge")}
        # another judge model is another verdict
        other = score_rows(judged_rows(), metric="judge", judge=JudgeConfig(url=server.url, model="judge-2",
                           timeout=TIMEOUT, backoff=0.05, reask=0), store_path=store)  # fmt: skip
        assert other["requests"] == 5 and sum(server.seen.values()) == 12  # (no 500 or timeout this time)


def test_unparseable_and_empty_replies_are_asked_again(tmp_path):
    def script(question, attempt):
        if question == "empty?":  # empty, then unparseable, then a verdict
            return 200, ["", "I think it is right", "{'pred': 'yes', 'score': 4}"][min(attempt, 3) - 1], 0.0
        if question == "never?":
            return 200, "The prediction looks fine to me.", 0.0
        return 200, "{'pred': 'no', 'score': 1}", 0.0

    triples = [("empty?", "red", "red"), ("never?", "red", "red"), ("fine?", "red", "blue")]
    store = tmp_path / "v.sqlite"
    with JudgeServer(script) as server:
        judge = JudgeConfig(url=server.url, model="m", reask=3, backoff=0.01)
        verdicts, requests = judge_triples(triples, judge, store)
        assert verdicts == [(True, 4), None, (False, 1)]
        assert server.seen == {"empty?": 3, "never?": 4, "fine?": 1} and requests == 8
        # the next run asks again only what is still unparseable, reask times more
        verdicts, requests = judge_triples(triples, judge, store)
        assert verdicts == [(True, 4), None, (False, 1)] and requests == 4 and server.seen["never?"] == 8
    with JudgeServer(script) as server:  # reask=0 takes each reply as it comes, the stored ones as they are
        once = JudgeConfig(url=server.url, model="m2", reask=0, backoff=0.01)
        assert judge_triples(triples, once, store) == ([None, None, (False, 1)], 3)
        assert judge_triples(triples, once, store) == ([None, None, (False, 1)], 0)
    with closing(sqlite3.connect(store)) as db:  # the last reply of each triple, per model
        replies = dict(db.execute("SELECT model || ' ' || question, reply FROM verdicts").fetchall())
    never, no = "The prediction looks fine to me.", "{'pred': 'no', 'score': 1}"
    assert replies == {"m empty?": "{'pred': 'yes', 'score': 4}", "m never?": never, "m fine?": no,
                       "m2 empty?": "", "m2 never?": never, "m2 fine?": no}


def test_the_temperature_is_sent_only_when_set_and_keys_the_verdicts(tmp_path):
    triples = [("q?", "red", "red")]
    store = tmp_path / "v.sqlite"
    with JudgeServer(always()) as server:
        default = JudgeConfig(url=server.url, model="m")
        assert judge_triples(triples, default, store) == ([(True, 5)], 1)
        zero = JudgeConfig(url=server.url, model="m", temperature=0)
        assert judge_triples(triples, zero, store) == ([(True, 5)], 1)  # not the default's verdict
        assert judge_triples(triples, zero, store) == ([(True, 5)], 0)
        assert judge_triples(triples, JudgeConfig(url=server.url, model="m", temperature=0.7), store)[1] == 1
        assert ["temperature" in b for b in server.bodies] == [False, True, True]
        assert [b.get("temperature") for b in server.bodies] == [None, 0, 0.7]


def test_a_store_from_before_the_temperature_setting_keeps_its_verdicts_at_0(tmp_path):
    path = tmp_path / "old.sqlite"
    with closing(sqlite3.connect(path)) as db:  # the schema every store had before
        db.execute("CREATE TABLE verdicts (model TEXT NOT NULL, prompt_version INTEGER NOT NULL, question "
                   "TEXT NOT NULL, answer TEXT NOT NULL, prediction TEXT NOT NULL, reply TEXT NOT NULL, url "
                   "TEXT, created REAL, PRIMARY KEY (model, prompt_version, question, answer, prediction))")
        db.execute("INSERT INTO verdicts VALUES ('m', ?, 'q?', 'red', 'red', 'old reply', 'u', 1.0)",
                   (PROMPT_VERSION,))
        db.commit()
    store = VerdictStore(path)
    try:
        assert store.get(JudgeConfig(model="m", temperature=0), ("q?", "red", "red")) == "old reply"
        assert store.get(JudgeConfig(model="m"), ("q?", "red", "red")) is None
        assert len(store) == 1
    finally:
        store.close()
    with closing(VerdictStore(path)) as reopened:  # migrated once: opened again, the same
        assert reopened.get(JudgeConfig(model="m", temperature=0.0), ("q?", "red", "red")) == "old reply"


def test_failures_stop_the_run_name_what_to_check_and_keep_what_was_stored(tmp_path):
    def failing(question, attempt):
        if question == "q1?":
            return 401, "invalid api key", 0.0
        if question == "q2?":
            return 503, "down", 0.0
        return 200, "{'pred': 'yes', 'score': 5}", 0.0

    rows = judged_rows()[:3]
    store = tmp_path / "v.sqlite"
    with JudgeServer(failing) as server:
        judge = JudgeConfig(url=server.url, model="m", concurrency=1, retries=2, timeout=5, backoff=0.01)
        with pytest.raises(JudgeError, match=r"HTTP 401, the key was refused \(invalid api key\); check the "
                                             r"key in \$OPENAI_API_KEY \(score.judge.key_env"):
            score_rows(rows[:2], metric="judge", judge=judge, store_path=store)
        assert server.seen["q1?"] == 1  # not retried
        with pytest.raises(JudgeError, match=r"InternalServerError \(HTTP 503\) on 3 attempts, last: down"):
            score_rows([rows[0], rows[2]], metric="judge", judge=judge, store_path=store)
        assert server.seen == {"q0?": 1, "q1?": 1, "q2?": 3}  # q0's verdict was kept from the first run


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_asks_one_question_and_names_what_to_check(monkeypatch):
    with JudgeServer(always(), served="judge-m-2024-01-25") as server:
        assert probe(JudgeConfig(url=server.url, model="judge-m", temperature=0)) == "judge-m-2024-01-25"
        assert list(server.seen.elements()) == [PROBE[0]] and server.bodies[0]["temperature"] == 0
    refused = JudgeConfig(url=f"http://127.0.0.1:{_closed_port()}/v1", model="m", retries=1, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(JudgeError) as err:
        probe(refused)
    assert time.monotonic() - start < 10
    assert "cannot be reached, APIConnectionError on 2 attempts" in str(err.value)
    assert "check score.judge.url / --judge-url" in str(err.value)
    monkeypatch.setenv("MY_KEY", "sk-wrong")
    with JudgeServer(always("Incorrect API key provided: sk-wr****.\n See your account.", 401)) as server:
        with pytest.raises(JudgeError) as err:
            probe(JudgeConfig(url=server.url, model="m", key_env="MY_KEY"))
    assert str(err.value) == (f"judge {server.url} (model m): HTTP 401, the key was refused (Incorrect API "
                              "key provided: sk-wr****. See your account.); check the key in $MY_KEY "
                              "(score.judge.key_env / --judge-key-env)")  # one line
    with JudgeServer(always("The model `nope` does not exist.", 404)) as server:
        with pytest.raises(JudgeError, match=r"HTTP 404 \(The model `nope` does not exist.\); check score."
                                             r"judge.model / --judge-model \(is 'nope' served there\?\)"):
            probe(JudgeConfig(url=server.url, model="nope"))


def test_sigkill_while_judging_then_rerun_scores_each_question_once(tmp_path):
    rows = [{"id": f"k{i}", "video": f"v{i % 3}", "question": f"k{i}?", "answer": "two",
             "prediction": f"{i} things", "category": "count" if i % 2 else "color", "error": None}
            for i in range(8)]  # fmt: skip

    in_flight = threading.Event()  # set by the test once the scoring is killed

    def verdict(question, attempt):
        if len(server.bodies) == 4:  # the 4th request waits: the kill comes while it is in flight
            in_flight.wait(600)  # a hang guard only
        i = int(question[1:-1])
        return 200, f"{{'pred': '{'yes' if i % 3 else 'no'}', 'score': {i % 6}}}", 0.0

    killed, clean = tmp_path / "killed" / "predictions.jsonl", tmp_path / "clean" / "predictions.jsonl"
    for output in (killed, clean):
        output.parent.mkdir()
        output.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = killed.with_name("predictions.verdicts.sqlite")
    with JudgeServer(verdict) as server:
        args = ["--judge-url", server.url, "--judge-model", "m", "--judge-concurrency", "1",
                "--judge-timeout", "600"]  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.score", str(killed), *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        stored, deadline = 0, time.monotonic() + 600  # a hang guard only
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
        in_flight.set()
        with closing(sqlite3.connect(store)) as db:
            stored = db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
        assert proc.returncode == -signal.SIGKILL and stored == 3
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
    same = ("overall", "by_category", "unscored", "metric", "judge")
    assert {k: resumed[k] for k in same} == {k: reference[k] for k in same}
    assert resumed["overall"]["n"] == 8 and resumed["overall"]["unparseable"] == 0
