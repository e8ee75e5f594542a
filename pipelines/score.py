"""Score a job's predictions the way the field scores them: exact match, multiple choice, or an LLM judge.

Works on any output file the job writes (JSONL or Parquet), one row per question with `answer`,
`prediction`, `error` and, where the set has them, `category` (the question type or task) and `options`
(the option texts shown to the model, lettered A, B, C... in order; `answer` is then the correct letter).
Rows without an answer are not scored (`unscored`). A row with an `error` (or no prediction) counts as
wrong and in `errors`, and is never sent to a judge: a setting that breaks videos must not look better
for it. The category is the row's `category` column, else `all`.

Metrics (`--metric`; default `choice` when any row has `options`, else `exact`):

- `exact`: the prediction equals the answer after `normalize` (lowercase, punctuation removed, the
  articles a/an/the dropped, whitespace collapsed), so "The Red." matches "red".
- `choice`: the option the reply chose (`extract_choice`, after lmms-eval's multiple-choice scoring:
  answer prefixes dropped, then a letter, then the option texts) equals the answer's letter; a reply
  naming no option is wrong and counted in `unparseable`. Rows without options are scored `exact`.
- `judge`: Video-LLaVA's GPT judge (`videollava/eval/video/eval_video_qa.py`, from Video-ChatGPT): an
  OpenAI-compatible chat model, temperature 0, reads the question, the correct and the predicted answer
  and replies `{'pred': 'yes'|'no', 'score': 0..5}`. `yes` is right; `score` is averaged (error and
  unparseable rows count 0). A reply that does not parse (`parse_verdict`) counts as `no` with score 0 and
  in `unparseable`. Requests run `concurrency` at a time, each with a timeout, retried with exponential
  backoff on connection errors, timeouts, HTTP 429 and 5xx (`retries` times; every attempt is counted in
  `requests`); any other HTTP error stops the run. Every reply is committed, as it arrives, to a SQLite
  verdict store beside the output (`<stem>.verdicts.sqlite`) keyed by (judge model, PROMPT_VERSION,
  question, answer, prediction): a rerun asks only for what the store lacks, and a run killed midway
  resumes. Identical (question, answer, prediction) triples are judged once. The raw reply is stored and
  parsed when scoring, so a better parser needs no new requests.

Deviation from Video-LLaVA's script, which reports yes / (yes + no) over the replies that parsed: here
accuracy is over every scored question (error and unparseable rows are wrong), like the other metrics.

`ci95` is a bootstrap 95% interval of the accuracy that resamples videos (the questions of one video
move together; a row without `video` is its own cluster), `RESAMPLES` times with `SEED`: deterministic.

    python -m pipelines.score OUTPUT [--metric exact|choice|judge] [--judge-url URL --judge-model M ...]
    python -m pipelines.score multirun/DATE/TIME      # a `-m` sweep: one row per job, see sweep_table

A file gets `<stem>.scores.json` beside it; a sweep folder `scores_table.md` and `scores_table.json` (and
each job its own scores file). The table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sqlite3
import string
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.files import markdown_table, read_jsonl, write_json, write_text

METRICS = ("exact", "choice", "judge")
PROMPT_VERSION = 1  # bump when the judge's prompt text changes: stored verdicts of other versions go unused
RESAMPLES = 1000
SEED = 0

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = {"a", "an", "the"}


def normalize(text: object) -> str:
    """Lowercase, punctuation removed, articles dropped, whitespace collapsed; None -> ''."""
    if text is None:
        return ""
    words = _PUNCTUATION.sub(" ", str(text).lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


# ---------------------------------------------------------------------------------------------- choice

# lmms-eval's answer prefixes (tasks/videomme/utils.py `extract_characters_regex`, its later versions).
ANSWER_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option is", "The correct option is", "Final Answer:", "Best answer:",
                   "Best option:", "Answer:", "Option:")  # fmt: skip
_PREFIX_RE = re.compile("|".join(re.escape(p) for p in sorted(ANSWER_PREFIXES, key=len, reverse=True)), re.I)
_OWN_LETTER = re.compile(r"^\s*[(\[]?([A-Za-z])[.):\]]\s+")  # "A. text", "(A) text" as an option's own text


def _option_texts(options: list) -> list[str]:
    """Each option's text normalised, without a leading copy of its own letter ("A. red" -> "red")."""
    texts = []
    for letter, option in zip(string.ascii_uppercase, options, strict=False):
        text = str(option)
        own = _OWN_LETTER.match(text)
        if own and own.group(1).upper() == letter:
            text = text[own.end() :]
        texts.append(normalize(text))
    return texts


def _unique(found: Iterable[str]) -> str | None:
    found = set(found)
    return found.pop() if len(found) == 1 else None


def extract_choice(reply: object, options: list) -> str | None:
    """The letter of the option a reply chose, or None when it names none. Letters are A, B, C... for
    `options` in order; a letter beyond them is not an option. The steps, first hit wins:

    1. Drop lmms-eval's answer prefixes ("The best answer is", "Answer:", ... `ANSWER_PREFIXES`, any
       case, wherever they occur), then whitespace, ':', '*', quotes and backticks at either end.
    2. A letter marked as one at the start: "(B)", "[B]", "B", "b", "B.", "B)", "B:", "B," ("B. red").
    3. The whole reply is one option's text (normalised: "The red circle." chooses "red circle").
    4. A capital letter then a space at the start, "B red": not "A" or "I", which open English sentences.
    5. One letter in brackets anywhere: "I pick (C) because" (more than one distinct letter: none).
    6. One capital letter standing alone anywhere, again not "A" or "I": "It is C." (distinct letters:
       exactly one).
    7. The option texts contained in the normalised reply, whole words; when several are, those inside a
       longer one drop out ("red" in "dark red"); exactly one left chooses it.
    """
    letters = string.ascii_uppercase[: len(options)]
    text = _PREFIX_RE.sub(" ", "" if reply is None else str(reply)).strip(":*\"'` \t\n")
    if not text or not letters:
        return None
    marked = re.match(r"[(\[]\s*([A-Za-z])\s*[)\]]|([A-Z])(?=$|[.):,])|([a-z])[.)]?$", text)
    if marked:
        letter = next(g for g in marked.groups() if g).upper()
        if letter in letters:
            return letter
    texts = _option_texts(options)
    whole = normalize(text)
    if whole and whole in texts:
        return letters[texts.index(whole)]
    spaced = re.match(r"([A-Z])\s+\S", text)
    if spaced and spaced.group(1) in letters and spaced.group(1) not in "AI":
        return spaced.group(1)
    bracketed = _unique(m.upper() for m in re.findall(r"[(\[]\s*([A-Za-z])\s*[)\]]", text)
                        if m.upper() in letters)  # fmt: skip
    if bracketed:
        return bracketed
    standalone = re.findall(r"(?<![\w'])([A-Z])(?![\w'])", text)
    alone = _unique(m for m in standalone if m in letters and m not in "AI")
    if alone:
        return alone
    padded = f" {whole} "
    inside = [i for i, t in enumerate(texts) if t and f" {t} " in padded]
    inside = [i for i in inside if not any(j != i and f" {texts[i]} " in f" {texts[j]} " for j in inside)]
    return letters[inside[0]] if len({texts[i] for i in inside}) == 1 else None


def answer_letter(row: dict) -> str:
    """The correct letter of a multiple-choice row: its `answer` as a letter, or as one option's text."""
    letter = extract_choice(row["answer"], row["options"])
    if letter is None:
        raise ValueError(f"row {row.get('id')!r}: answer {row['answer']!r} is not the letter of one of its "
                         f"{len(row['options'])} options")
    return letter


# ----------------------------------------------------------------------------------------------- judge

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


@dataclass
class JudgeConfig:
    """An OpenAI-compatible chat-completions endpoint to judge with (`url` e.g. http://host:8000/v1)."""

    url: str | None = None
    model: str | None = None
    key_env: str = "OPENAI_API_KEY"  # the env var holding the key; unset: a placeholder (local endpoints)
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
        return out


METRICS = ("exact", "choice", "judge")
# how the field scores each set: Video-LLaVA's open-ended sets by an LLM judge, the others by option letter
FORMAT_METRICS = {"videollava": "judge", "videomme": "choice", "mvbench": "choice", "nextqa": "choice",
                  "egoschema": "choice"}


@dataclass
class ScoreConfig:
    """Scoring at the end of a batch job (the `score` config section); `python -m pipelines.score` scores
    any output later with the same metrics."""

    metric: str | None = None  # null: the set's own (FORMAT_METRICS; a manifest: choice with options, else
    #                            exact); exact | choice | judge | none (no scoring at the end of the job)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def problems(self) -> list[str]:
        if self.metric is not None and self.metric not in (*METRICS, "none"):
            return [f"metric={self.metric!r} is not one of {', '.join(METRICS)}, none or null"]
        return self.judge.problems() if self.metric == "judge" else []

    def metric_for(self, data_format: str) -> str | None:
        """The metric a job of this data format is scored with (None: from its rows)."""
        return self.metric or FORMAT_METRICS.get(data_format)


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


def judge_messages(row: dict) -> tuple[str, str, str]:
    """(question, answer, prediction) as the judge sees them; a multiple-choice row shows its lettered
    options after the question and the correct option as "B. text"."""
    question, answer = str(row.get("question") or ""), str(row["answer"])
    options = row.get("options")
    if options:
        letters = string.ascii_uppercase
        question += "\n" + "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
        letter = answer_letter(row)
        answer = f"{letter}. {options[letters.index(letter)]}"
    return question, answer, str(row["prediction"])


class VerdictStore:
    """Judge replies in SQLite, keyed by (model, prompt version, question, answer, prediction); each
    `put` commits (WAL journal: a killed run loses nothing it was told)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (model TEXT NOT NULL, prompt_version INTEGER NOT NULL, "
            "question TEXT NOT NULL, answer TEXT NOT NULL, prediction TEXT NOT NULL, reply TEXT NOT NULL, "
            "url TEXT, created REAL, PRIMARY KEY (model, prompt_version, question, answer, prediction))"
        )
        self.db.commit()

    def get(self, model: str, key: tuple[str, str, str]) -> str | None:
        found = self.db.execute(
            "SELECT reply FROM verdicts WHERE model=? AND prompt_version=? AND question=? AND answer=? "
            "AND prediction=?", (model, PROMPT_VERSION, *key)).fetchone()  # fmt: skip
        return None if found is None else found[0]

    def put(self, model: str, key: tuple[str, str, str], reply: str, url: str | None = None) -> None:
        self.db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (model, PROMPT_VERSION, *key, reply, url, time.time()))  # fmt: skip
        self.db.commit()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        self.db.close()


async def _ask_all(judge: JudgeConfig, todo: list[tuple[str, str, str]], store: VerdictStore) -> int:
    """Ask the judge for every key of `todo`, storing each reply as it comes; the HTTP requests made."""
    import openai

    client = openai.AsyncOpenAI(base_url=judge.url, api_key=os.environ.get(judge.key_env) or "none",
                                max_retries=0, timeout=judge.timeout)  # fmt: skip
    retryable = (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError)  # + timeouts
    gate = asyncio.Semaphore(judge.concurrency)
    requests = 0

    async def ask(key: tuple[str, str, str]) -> None:
        nonlocal requests
        question, answer, prediction = key
        messages = [{"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": JUDGE_USER.format(question=question, answer=answer,
                                                                  prediction=prediction)}]  # fmt: skip
        async with gate:
            for attempt in range(judge.retries + 1):
                requests += 1
                try:
                    response = await client.chat.completions.create(model=judge.model, messages=messages,
                                                                    temperature=0)  # fmt: skip
                except retryable as err:
                    if attempt == judge.retries:
                        raise JudgeError(f"judge {judge.url}: {type(err).__name__} on {judge.retries + 1} "
                                         f"attempts, last: {err}") from err  # fmt: skip
                    await asyncio.sleep(judge.backoff * 2**attempt)
                    continue
                except openai.APIStatusError as err:
                    hint = f" (is the key in ${judge.key_env}?)" if err.status_code in (401, 403) else ""
                    message = f"judge {judge.url}: HTTP {err.status_code}{hint}: {err.message}"
                    raise JudgeError(message) from err
                reply = response.choices[0].message.content if response.choices else None
                store.put(judge.model, key, reply or "", judge.url)
                return

    tasks = [asyncio.ensure_future(ask(key)) for key in todo]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    return requests


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


def judge_rows(rows: list[dict], judge: JudgeConfig, store_path: str | os.PathLike | None = None
               ) -> tuple[list[tuple[bool, int] | None], int]:
    """A verdict per row ((yes, score), or None unparseable) and the requests this call made; only the
    (question, answer, prediction) triples missing from the store are asked. Rows must have predictions."""
    problems = judge.problems()
    if problems:
        raise ValueError("; ".join(problems))
    store = VerdictStore(store_path or judge.store or ":memory:")
    try:
        keys = [judge_messages(row) for row in rows]
        todo = [k for k in dict.fromkeys(keys) if store.get(judge.model, k) is None]
        requests = _run(_ask_all(judge, todo, store)) if todo else 0
        return [parse_verdict(store.get(judge.model, k)) for k in keys], requests
    finally:
        store.close()


# --------------------------------------------------------------------------------------------- scoring


def bootstrap_ci(correct: list[bool] | np.ndarray, clusters: list, resamples: int = RESAMPLES,
                 seed: int = SEED) -> list[float] | None:
    """The 2.5 and 97.5 percentiles of the accuracy over `resamples` bootstrap draws of the clusters
    (videos) with replacement, each draw taking all of its cluster's questions; None without questions."""
    if len(correct) == 0:
        return None
    _, index = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    hits = np.bincount(index, weights=np.asarray(correct, dtype=float))
    counts = np.bincount(index).astype(float)
    rng = np.random.default_rng(seed)
    n = len(counts)
    chunk = max(1, 4_000_000 // n)
    accuracies = []
    for start in range(0, resamples, chunk):
        draws = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        accuracies.append(hits[draws].sum(1) / counts[draws].sum(1))
    low, high = np.percentile(np.concatenate(accuracies), [2.5, 97.5])
    return [float(low), float(high)]


def default_metric(rows: Iterable[dict]) -> str:
    """`choice` when any row has options, else `exact`."""
    return "choice" if any(row.get("options") for row in rows) else "exact"


def _scored(row: dict) -> bool:
    """Whether a row has an answer to score (a letter, for multiple choice: "A" normalises to "")."""
    answer = row.get("answer")
    if answer is None:
        return False
    return str(answer).strip() != "" if row.get("options") else normalize(answer) != ""


def score_rows(rows: Iterable[dict], metric: str | None = None, judge: JudgeConfig | None = None,
               store_path: str | os.PathLike | None = None) -> dict:
    """Score rows (see the module's doc); `metric` None picks `default_metric`; `judge` is needed for
    `judge`, whose verdicts live in `store_path`, else `judge.store`, else in memory. Returns
    {"metric", "overall", "by_category", "unscored", "requests", ...}: see `GROUP_KEYS`."""
    rows = list(rows)
    scored = [r for r in rows if _scored(r)]
    metric = metric or default_metric(scored)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "judge" and judge is None:
        raise ValueError("metric judge needs a judge (url and model)")
    failed = [bool(r.get("error")) or r.get("prediction") is None for r in scored]
    right = [False] * len(scored)
    points: list[int | None] = [None] * len(scored)
    unparseable = [False] * len(scored)
    requests = 0
    if metric == "judge":
        answered = [i for i, f in enumerate(failed) if not f]
        verdicts, requests = judge_rows([scored[i] for i in answered], judge, store_path)
        for i, verdict in zip(answered, verdicts, strict=True):
            unparseable[i] = verdict is None
            right[i], points[i] = verdict or (False, 0)
        points = [0 if p is None else p for p in points]
    else:
        for i, row in enumerate(scored):
            if failed[i]:
                continue
            if metric == "choice" and row.get("options"):
                chosen = extract_choice(row["prediction"], row["options"])
                unparseable[i] = chosen is None
                right[i] = chosen is not None and chosen == answer_letter(row)
            else:
                right[i] = normalize(row["prediction"]) == normalize(row["answer"])
    categories = [str(r["category"]) if r.get("category") is not None else "all" for r in scored]
    videos = [r.get("video") if r.get("video") is not None else f"\0{r.get('id', i)}"
              for i, r in enumerate(scored)]  # fmt: skip

    def group(members: list[int]) -> dict:
        n = len(members)
        out = {"n": n, "correct": sum(right[i] for i in members),
               "accuracy": sum(right[i] for i in members) / n if n else None,
               "unparseable": sum(unparseable[i] for i in members), "errors": sum(failed[i] for i in members),
               "ci95": bootstrap_ci([right[i] for i in members], [videos[i] for i in members])}  # fmt: skip
        if metric == "judge":
            out["score"] = sum(points[i] for i in members) / n if n else None
        return out

    def mean(key: str) -> float | None:
        values = [r[key] for r in scored if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    result = {
        "metric": metric,
        "overall": group(list(range(len(scored)))),
        "by_category": {c: group([i for i, k in enumerate(categories) if k == c])
                        for c in sorted(set(categories))},
        "unscored": len(rows) - len(scored),
        "requests": requests,
        "visual_tokens_kept_mean": mean("visual_tokens_kept"),
        "answer_seconds_mean": mean("answer_seconds"),
        "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "cluster": "video"},
    }
    if metric == "judge":
        result.update(judge_model=judge.model, judge_url=judge.url, prompt_version=PROMPT_VERSION,
                      judge_store=str(store_path or judge.store or ":memory:"))
    return result


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL or Parquet output file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"output file {path}: no such file")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return read_jsonl(path)


def scores_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".scores.json")


def store_path_for(output: str | os.PathLike, judge: JudgeConfig | None = None) -> Path:
    """`judge.store` when set, else `<output stem>.verdicts.sqlite` beside the output."""
    output = Path(output)
    return Path(judge.store) if judge and judge.store else output.with_name(output.stem + ".verdicts.sqlite")


def score_file(path: str | os.PathLike, metric: str | None = None, judge: JudgeConfig | None = None,
               store_path: str | os.PathLike | None = None, scores: str | os.PathLike | None = None,
               rows: list[dict] | None = None) -> dict:
    """Score an output file (`rows`: its rows when already read) and write the result, with `source`, to
    `scores` (default `<stem>.scores.json` beside it, atomically); returns it. The judge's verdict store
    is `store_path`, else `judge.store`, else `<stem>.verdicts.sqlite` beside the output."""
    rows = read_rows(path) if rows is None else rows
    store = store_path or store_path_for(path, judge)
    result = {"source": str(path), **score_rows(rows, metric=metric, judge=judge, store_path=store)}
    write_json(scores or scores_path(path), result)
    return result


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"{value[0]:.3f}-{value[1]:.3f}"
    return str(value)


def format_table(result: dict) -> str:
    """A file's scores as Markdown: one row per category, then `overall`."""
    columns = ["category", "n", "correct", "errors", "accuracy", "ci95"]
    columns += ["score", "unparseable"] if result["metric"] == "judge" else ["unparseable"]
    groups = [*result["by_category"].items(), ("overall", result["overall"])]
    table = markdown_table([{"category": name, **g} for name, g in groups], columns, _cell)
    notes = [f"metric: {result['metric']}"]
    if result["metric"] == "judge":
        notes.append(f"judge: {result['judge_model']} at {result['judge_url']} "
                     f"(prompt v{result['prompt_version']}), {result['requests']} requests this run")
    if result["unscored"]:
        notes.append(f"{result['unscored']} rows without an answer not scored")
    return table + "\n" + "\n".join(notes)


# ---------------------------------------------------------------------------------------------- sweeps


def sweep_table(folder: str | os.PathLike, metric: str | None = None, judge: JudgeConfig | None = None
                ) -> list[dict]:
    """One row per job of a Hydra `-m` sweep folder (each job's folder has `.hydra/overrides.yaml` and its
    output file, which gets its own scores file): the job's overrides, mean visual tokens kept, accuracy
    per category and overall with its ci95, errors, and `retention` against the sweep's job run with
    `compression=none` (None when there is not exactly one, or its accuracy is 0)."""
    from omegaconf import OmegaConf

    rows = []
    for overrides in sorted(Path(folder).glob("*/.hydra/overrides.yaml")):
        job = overrides.parent.parent
        outputs = sorted(p for p in job.iterdir() if p.suffix.lower() in (".jsonl", ".parquet"))
        if len(outputs) != 1:
            raise ValueError(f"sweep job {job}: expected one output file (.jsonl or .parquet), got {outputs}")
        result = score_file(outputs[0], metric=metric, judge=judge)
        settings = [str(o) for o in OmegaConf.load(overrides) if not str(o).startswith(("data.", "output."))]
        row = {"setting": " ".join(settings) or "(defaults)",
               "visual_tokens": result["visual_tokens_kept_mean"],
               **{c: g["accuracy"] for c, g in result["by_category"].items()},
               "overall": result["overall"]["accuracy"], "ci95": result["overall"]["ci95"],
               "errors": result["overall"]["errors"], "metric": result["metric"],
               "output": str(outputs[0])}  # fmt: skip
        rows.append(row)
    if not rows:
        raise ValueError(f"{folder}: no job folders with .hydra/overrides.yaml (is it a -m sweep's folder?)")
    full = [r for r in rows if "compression=none" in r["setting"].split()]
    reference = full[0]["overall"] if len(full) == 1 else None
    for row in rows:
        row["retention"] = row["overall"] / reference if reference and row["overall"] is not None else None
    return rows


def format_sweep(rows: list[dict]) -> str:
    """The sweep table as Markdown."""
    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c not in ("output", "metric")]
    return markdown_table(rows, columns, _cell)


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> dict | list[dict]:
    parser = argparse.ArgumentParser(description="Score a job's predictions (exact, multiple choice or an "
                                                 "LLM judge), per category and overall.")  # fmt: skip
    parser.add_argument("output", help="the job's output (.jsonl or .parquet), or a -m sweep's folder")
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="default: choice when any row has options, else exact; judge when --judge-url")
    parser.add_argument("--scores", default=None,
                        help="the scores file (default <stem>.scores.json; a sweep: scores_table.json)")
    defaults = JudgeConfig()
    parser.add_argument("--judge-url", default=None,
                        help="OpenAI-compatible base URL, e.g. http://host:8000/v1 (implies --metric judge)")
    parser.add_argument("--judge-model", default=None)
    parser.add_argument("--judge-key-env", default=defaults.key_env,
                        help="env var holding the API key (unset: a placeholder key, for local endpoints)")
    parser.add_argument("--judge-concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--judge-retries", type=int, default=defaults.retries)
    parser.add_argument("--judge-timeout", type=float, default=defaults.timeout, help="seconds per request")
    parser.add_argument("--judge-backoff", type=float, default=defaults.backoff,
                        help="seconds before the first retry, doubled each time")
    parser.add_argument("--judge-store", default=None, help="verdict store (default <stem>.verdicts.sqlite)")
    args = parser.parse_args(argv)
    metric = args.metric or ("judge" if args.judge_url else None)
    judge = None
    if metric == "judge":
        judge = JudgeConfig(url=args.judge_url, model=args.judge_model, key_env=args.judge_key_env,
                            concurrency=args.judge_concurrency, retries=args.judge_retries,
                            timeout=args.judge_timeout, store=args.judge_store, backoff=args.judge_backoff)
        if judge.problems():
            parser.error("; ".join(p.replace("judge.", "--judge-") for p in judge.problems()))
    if Path(args.output).is_dir():
        rows = sweep_table(args.output, metric=metric, judge=judge)
        table = format_sweep(rows)
        write_text(Path(args.output) / "scores_table.md", table + "\n")
        write_json(Path(args.scores or Path(args.output) / "scores_table.json"), rows)
        print(table)
        return rows
    rows = read_rows(args.output)
    if not any(_scored(r) for r in rows):
        raise SystemExit(f"{args.output}: no row has an answer to score")
    result = score_file(args.output, metric=metric, judge=judge, scores=args.scores, rows=rows)
    print(format_table(result))
    print(f"written {args.scores or scores_path(args.output)}")
    return result


if __name__ == "__main__":
    main()
