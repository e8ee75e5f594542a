"""The LLM judge of Video-LLaVA's open-ended QA sets, as the reference runs it, over any OpenAI-compatible
chat-completions endpoint (a hosted model, or a local `vllm serve MODEL`).

The reference is Video-LLaVA's `videollava/eval/video/eval_video_qa.py` (from Video-ChatGPT): the model
reads `JUDGE_SYSTEM` and `JUDGE_USER` (the question, the correct and the predicted answer) and replies
`{'pred': 'yes'|'no', 'score': 0..5}`. Each of its settings is a `JudgeConfig` field; the defaults are the
reference's wherever that can be reproduced:

- `model`: the reference asks `gpt-3.5-turbo`, an alias whose snapshot OpenAI moves (the 2023 one is
  retired), so there is no default: name one, pinned (`gpt-3.5-turbo-0125`) or a local model. The probe
  logs and records the model the endpoint says it served.
- `temperature`: the reference sends none, so the API's default applies (1 on OpenAI); null here does the
  same. `0` makes a fresh store's verdicts vary less between runs (a rerun takes them from the store
  anyway). It is part of a verdict's key: verdicts asked at another temperature are not reused.
- `reask`: the reference asks again, without end, every reply `ast.literal_eval` cannot read. Here an
  empty or unparseable reply (`parse_verdict`) is asked again up to `reask` times (default 5: a judge
  that never answers in form ends); the last reply is stored, counts as `no` with score 0 and in
  `unparseable`, and is asked again by the next scoring run while `reask` > 0. `reask=0` keeps the first
  reply whatever it is.
- Parsing is more lenient than `ast.literal_eval` (text around the dict, JSON quotes: `parse_verdict`),
  so fewer replies need asking again; a dict with `pred` 'yes' or 'no' (any case) and `score` 0..5 gives
  the reference's verdict. Stricter here: a score outside 0..5 or another `pred` word does not parse.

The rest is plumbing the reference does not have: requests run `concurrency` at a time, each with a
`timeout`, retried with exponential backoff (`backoff`, doubled) on connection errors, timeouts, HTTP 429
and 5xx (`retries` times; the reference retries every error without end); any other HTTP error stops the
run with a message naming the setting to check. Every reply is committed, as it arrives, to a SQLite
`VerdictStore` keyed by (model, temperature, PROMPT_VERSION, question, answer, prediction): a rerun asks
only for what the store lacks, and a run killed midway resumes. Identical triples are judged once.

`probe` sends one request before a job's work starts, so a wrong URL, key or model fails in seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROMPT_VERSION = 1  # bump when the judge's prompt text changes: stored verdicts of other versions go unused
REFERENCE_MODEL = "gpt-3.5-turbo"  # what Video-LLaVA's script asks (an alias: pin a snapshot instead)

JUDGE_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and "
    "determine if they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
JUDGE_USER = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\nCorrect Answer: {answer}\nPredicted Answer: {prediction}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, "
    "with 5 indicating the highest meaningful match. Please generate the response in the form of a Python "
    "dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string of 'yes' or 'no' and "
    "value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only "
    "provide the Python dictionary string. For example, your response should look like this: "
    "{{'pred': 'yes', 'score': 4.8}}."
)
# the probe's question, answer and prediction: one an able judge says yes to
PROBE = ("What colour is the ball?", "red", "The ball is red.")

Triple = tuple[str, str, str]  # (question, answer, prediction) as the judge reads them


@dataclass
class JudgeConfig:
    """An OpenAI-compatible chat-completions endpoint to judge with (`url` e.g. http://host:8000/v1) and how
    it is asked (the module's doc says where each default comes from)."""

    url: str | None = None
    model: str | None = None  # no default: the reference's gpt-3.5-turbo is an alias (pin a snapshot)
    key_env: str = "OPENAI_API_KEY"  # the env var holding the key; unset: a placeholder (local endpoints)
    temperature: float | None = None  # None: not sent, the API's default (1 on OpenAI), as the reference
    reask: int = 5  # an empty or unparseable reply is asked again up to this many times (reference: no end)
    concurrency: int = 8
    retries: int = 3  # after the first attempt, on connection errors, timeouts, 429 and 5xx
    timeout: float = 60.0  # seconds per request
    store: str | None = None  # the verdict store; None: <output stem>.verdicts.sqlite beside the output
    backoff: float = 1.0  # seconds before the first retry, doubled for each next one

    def problems(self) -> list[str]:
        out = [f"judge.{name} must be set" for name in ("url", "model") if not getattr(self, name)]
        out += [f"judge.{name} must be > 0, got {getattr(self, name)}" for name in ("concurrency", "timeout")
                if not getattr(self, name) > 0]  # fmt: skip
        if self.retries < 0 or self.backoff < 0:
            out.append(f"judge.retries and judge.backoff must be >= 0, got {self.retries}, {self.backoff}")
        if self.reask < 0:
            out.append(f"judge.reask must be >= 0, got {self.reask}")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            out.append(f"judge.temperature must be in [0, 2] or null, got {self.temperature}")
        return out

    def record(self) -> dict:
        """The settings as a plain dict, with the prompt version: what a scores file and a scoring record
        keep (the key itself is never in the config, only the name of its env var)."""
        return {**asdict(self), "prompt_version": PROMPT_VERSION}


class JudgeError(RuntimeError):
    """The judge failed for good: a non-retryable HTTP error, or every retry spent."""


_DICT = re.compile(r"\{[^{}]*\}", re.S)
_PRED = re.compile(r"""["']?\bpred\b["']?\s*:\s*["']?\s*(yes|no)\b""", re.I)
_SCORE = re.compile(r"""["']?\bscore\b["']?\s*:\s*["']?\s*(-?\d+(?:\.\d*)?)""", re.I)


def parse_verdict(reply: object) -> tuple[bool, int] | None:
    """(yes, score) from a judge's reply, or None when it does not parse. Accepts single or double quotes
    (a Python dict or JSON), text around the dict, any case ('YES', 'No'), the score as a number or a
    string; a fractional score is truncated like Video-LLaVA's `int(score)`. Both keys must be there
    and the score within 0..5. Inside the first {...} block when there is one, else the whole text."""
    text = "" if reply is None else str(reply)
    for part in [m.group(0) for m in _DICT.finditer(text)][:1] + [text]:
        pred, score = _PRED.search(part), _SCORE.search(part)
        if pred and score:
            value = int(float(score.group(1)))
            return (pred.group(1).lower() == "yes", value) if 0 <= value <= 5 else None
    return None


def judge_prompt(triple: Triple) -> list[dict]:
    """The chat messages that ask for one verdict (the reference's system and user turns)."""
    question, answer, prediction = triple
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER.format(question=question, answer=answer,
                                                          prediction=prediction)}]  # fmt: skip


def _temperature_key(temperature: float | None) -> str:
    """How a verdict's temperature is keyed in the store: 'default' (not sent) or the number ('0', '0.7')."""
    return "default" if temperature is None else format(float(temperature), "g")


class VerdictStore:
    """Judge replies in SQLite, keyed by (model, temperature, prompt version, question, answer,
    prediction); each `put` commits (WAL journal: a killed run loses nothing it was told). A store written
    before the temperature was a setting (every verdict then asked at 0) is keyed at '0' when opened."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(verdicts)")}
        if columns and "temperature" not in columns:
            self.db.execute("ALTER TABLE verdicts RENAME TO verdicts_at_0")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (model TEXT NOT NULL, temperature TEXT NOT NULL, "
            "prompt_version INTEGER NOT NULL, question TEXT NOT NULL, answer TEXT NOT NULL, "
            "prediction TEXT NOT NULL, reply TEXT NOT NULL, url TEXT, created REAL, "
            "PRIMARY KEY (model, temperature, prompt_version, question, answer, prediction))"
        )
        if columns and "temperature" not in columns:
            self.db.execute("INSERT INTO verdicts SELECT model, '0', prompt_version, question, answer, "
                            "prediction, reply, url, created FROM verdicts_at_0")  # fmt: skip
            self.db.execute("DROP TABLE verdicts_at_0")
        self.db.commit()

    def get(self, judge: JudgeConfig, triple: Triple) -> str | None:
        found = self.db.execute(
            "SELECT reply FROM verdicts WHERE model=? AND temperature=? AND prompt_version=? AND question=? "
            "AND answer=? AND prediction=?",
            (judge.model, _temperature_key(judge.temperature), PROMPT_VERSION, *triple),
        ).fetchone()
        return None if found is None else found[0]

    def put(self, judge: JudgeConfig, triple: Triple, reply: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (judge.model, _temperature_key(judge.temperature), PROMPT_VERSION, *triple, reply,
                         judge.url, time.time()))  # fmt: skip
        self.db.commit()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def _one_line(text: object, limit: int = 200) -> str:
    """An error text on one line, cut to `limit` characters (a wrong URL can answer with a whole page)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


_TRANSPORT_LOGGERS = ("httpx", "httpx2")  # the HTTP clients under openai's SDK (its versions differ)


class _Endpoint:
    """The judge's endpoint: one request per `ask`, retried as `JudgeConfig` says, every HTTP request
    counted in `requests`; a failure for good is a JudgeError naming the setting to check."""

    def __init__(self, judge: JudgeConfig) -> None:
        import openai

        self.judge, self.openai = judge, openai
        for name in _TRANSPORT_LOGGERS:  # one INFO line per request: thousands on a set's console
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        self.client = openai.AsyncOpenAI(base_url=judge.url, api_key=os.environ.get(judge.key_env) or "none",
                                         max_retries=0, timeout=judge.timeout)  # fmt: skip
        self.requests = 0

    async def ask(self, triple: Triple) -> tuple[str, str | None]:
        """The judge's reply to one triple ('' when empty) and the model the endpoint says answered."""
        judge, openai = self.judge, self.openai
        # connection errors (timeouts included), 5xx and 429
        retryable = (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError)
        sampling = {} if judge.temperature is None else {"temperature": judge.temperature}
        for attempt in range(judge.retries + 1):
            self.requests += 1
            try:
                response = await self.client.chat.completions.create(
                    model=judge.model, messages=judge_prompt(triple), **sampling)
            except retryable as err:
                if attempt == judge.retries:
                    raise JudgeError(self._explain(err)) from err
                await asyncio.sleep(judge.backoff * 2**attempt)
                continue
            except openai.APIStatusError as err:
                raise JudgeError(self._explain(err)) from err
            reply = response.choices[0].message.content if response.choices else None
            return reply or "", response.model
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _explain(self, err: Exception) -> str:
        """One line: what failed, and which setting to check."""
        judge, attempts = self.judge, f"{self.judge.retries + 1} attempts"
        where = f"judge {judge.url} (model {judge.model})"
        if isinstance(err, self.openai.APIConnectionError):  # timeouts included
            return (f"{where}: cannot be reached, {type(err).__name__} on {attempts} ({_one_line(err)}); "
                    "check score.judge.url / --judge-url (the API's base, e.g. http://host:8000/v1) and that "
                    "the server is up")
        status = err.status_code
        # the server's own words: the SDK's message less its "Error code: 404 - " prefix, else the body
        message = _one_line(re.sub(r"^Error code: \d+( - )?", "", err.message) or err.body or "no detail")
        if status in (401, 403):
            return (f"{where}: HTTP {status}, the key was refused ({message}); check the key in "
                    f"${judge.key_env} (score.judge.key_env / --judge-key-env)")
        if status == 404:
            return (f"{where}: HTTP 404 ({message}); check score.judge.model / --judge-model (is "
                    f"{judge.model!r} served there?) and score.judge.url / --judge-url (the API's base, "
                    "usually ending in /v1)")
        if status == 429 or status >= 500:
            return f"{where}: {type(err).__name__} (HTTP {status}) on {attempts}, last: {message}"
        return f"{where}: HTTP {status} ({message})"

    async def close(self) -> None:
        await self.client.close()


async def _judge_missing(judge: JudgeConfig, todo: list[Triple], store: VerdictStore) -> int:
    """Ask the judge for every triple of `todo` (again while the reply is empty or does not parse, up to
    `judge.reask` times), storing each final reply as it comes; the HTTP requests made."""
    endpoint = _Endpoint(judge)
    gate = asyncio.Semaphore(judge.concurrency)

    async def verdict(triple: Triple) -> None:
        async with gate:
            for _ in range(judge.reask + 1):
                reply, _served = await endpoint.ask(triple)
                if parse_verdict(reply) is not None:
                    break
            store.put(judge, triple, reply)

    tasks = [asyncio.ensure_future(verdict(triple)) for triple in todo]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await endpoint.close()
    return endpoint.requests


def _run(coroutine):
    """asyncio.run, also from a thread that already runs an event loop (a notebook, an async caller)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coroutine)
        except BaseException as err:  # noqa: B036 - re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _checked(judge: JudgeConfig) -> None:
    problems = judge.problems()
    if problems:
        raise ValueError("; ".join(problems))


def judge_triples(triples: list[Triple], judge: JudgeConfig, store_path: str | os.PathLike | None = None
                  ) -> tuple[list[tuple[bool, int] | None], int]:
    """A verdict per triple ((yes, score), or None unparseable) and the HTTP requests this call made.
    Asked: the distinct triples the store (`store_path`, else `judge.store`, else memory) lacks, and, while
    `judge.reask` > 0, those whose stored reply does not parse."""
    _checked(judge)
    store = VerdictStore(store_path or judge.store or ":memory:")
    try:
        stored = {triple: store.get(judge, triple) for triple in dict.fromkeys(triples)}
        todo = [t for t, reply in stored.items()
                if reply is None or (judge.reask and parse_verdict(reply) is None)]  # fmt: skip
        requests = _run(_judge_missing(judge, todo, store)) if todo else 0
        return [parse_verdict(store.get(judge, triple)) for triple in triples], requests
    finally:
        store.close()


def probe(judge: JudgeConfig) -> str | None:
    """Ask the judge one fixed question (`PROBE`) with the settings of the real requests, retried like
    them, and return the model the endpoint says answered. A wrong URL, a refused key or an unknown model
    raises a JudgeError naming the setting to check; a reply that does not parse is only logged (the
    real requests ask such replies again)."""
    _checked(judge)

    async def ask() -> tuple[str, str | None]:
        endpoint = _Endpoint(judge)
        try:
            return await endpoint.ask(PROBE)
        finally:
            await endpoint.close()

    reply, served = _run(ask())
    log.info("judge %s at %s answers%s", judge.model, judge.url,
             f" as {served}" if served and served != judge.model else "")
    if parse_verdict(reply) is None:
        log.warning("judge %s: its reply to a test question does not parse (%s); such replies are asked "
                    "again up to judge.reask=%d times, then count as 'no'", judge.model, _one_line(reply),
                    judge.reask)
    return served
