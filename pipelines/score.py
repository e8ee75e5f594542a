"""Score a job's predictions the way the field scores them: exact match, multiple choice, or an LLM judge.

Works on any output file the job writes (JSONL or Parquet), one row per question with `answer`,
`prediction`, `error` and, where the set has them, `category` (the question type or task) and `options`
(the option texts shown to the model, lettered A, B, C... in order; `answer` is then the correct letter).
Rows without an answer are not scored (`unscored`); an id with several rows counts once (its newest
answer, else its newest error: `pipelines.sink.unique_rows`). A row with an `error` (or no prediction)
counts as wrong and in `errors`, and is never sent to a judge: a setting that breaks videos must not look
better for it. The category is the row's `category` column, else `all`.

Metrics (`--metric`; default `choice` when any row has `options`, else `exact`):

- `exact`: the prediction equals the answer after `normalize` (lowercase, punctuation removed, the
  articles a/an/the dropped, whitespace collapsed), so "The Red." matches "red".
- `choice`: the option the reply chose, read by an extraction rule (`--rule`, `score.rule`; by default
  the set's own reference rule, `tasks.TASKS[format].rule`, and for a manifest lmms-eval's current
  `extract_mcq_answer`: see `tasks.choice`), equals the answer's letter; a reply naming no option is wrong
  and counted in `unparseable`. `reference_accuracy` divides as the rule's reference does (Video-MME's
  script: over the replies it could read). Rows without options are scored `exact`; a file where no row
  has options is refused (`choice` does not fit it).
- `judge`: Video-LLaVA's GPT judge as its reference script runs it (`pipelines.judge`: an OpenAI-compatible
  chat model reads the question, the correct and the predicted answer and replies
  `{'pred': 'yes'|'no', 'score': 0..5}`). `yes` is right; `score` is averaged (error and unparseable rows
  count 0). A reply that still does not parse after its re-asks counts as `no` with score 0 and in
  `unparseable`. Every HTTP request, re-asks and retries included, is counted in `requests`. Verdicts live
  in a SQLite store beside the output (`<stem>.verdicts.sqlite`): a rerun asks only for what it lacks. The
  raw reply is stored and parsed when scoring, so a better parser needs no new requests.

Deviation from Video-LLaVA's script, which reports yes / (yes + no) over the replies that parsed: here
accuracy is over every scored question (error and unparseable rows are wrong), like the other metrics.

`ci95` is a bootstrap 95% interval of the accuracy that resamples videos (the questions of one video
move together; a row without `video` is its own cluster), `RESAMPLES` times with `SEED`: deterministic.

    python -m pipelines.score OUTPUT [--metric exact|choice|judge] [--judge-url URL --judge-model M ...]
    python -m pipelines.score multirun/DATE/TIME      # a `-m` sweep: one row per job, see sweep_table

A file gets `<stem>.scores.json` beside it; a sweep folder `scores_table.md` and `scores_table.json` (and
each job its own scores file). The table is printed as Markdown. A job records how its output is scored
in `<stem>.scoring.json` beside it (`write_scoring_record`: the set, its metric and the judge's settings,
never the key), so `python -m pipelines.score OUTPUT` scores it the same way with no other flag; a flag
given overrides the record. Error rows are counted apart from wrong answers (`errors`, `wrong`); a job of
a sweep without answers is listed as not scorable, with its rows and error rows counted. Exit status 2
(`EXIT_REFUSED`): nothing was scored or written (a missing file, no answers, a metric that does not fit
the rows, a judge that fails), and one line on stderr says why.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np

from pipelines.files import markdown_table, read_jsonl, write_json, write_text
from pipelines.judge import JudgeConfig, JudgeError, judge_triples
from pipelines.sink import unique_rows
from tasks import TASKS
from tasks.choice import RULES, answer_letter, extract, normalize, rule_named

METRICS = ("exact", "choice", "judge")
EXIT_REFUSED = 2  # the CLI scored nothing (the file, its rows, a flag, the judge): one line says why
RESAMPLES = 1000
SEED = 0

# -------------------------------------------------------------------------------------------- config

# how the field scores each set: Video-LLaVA's open-ended sets by an LLM judge, the others by option letter
FORMAT_METRICS = {name: task.metric for name, task in TASKS.items() if task.metric}


@dataclass
class ScoreConfig:
    """Scoring at the end of a batch job (the `score` config section); `python -m pipelines.score` scores
    any output later with the same metrics."""

    metric: str | None = None  # null: the set's own (FORMAT_METRICS; a manifest: choice with options, else
    #                            exact); exact | choice | judge | none (no scoring at the end of the job)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    rule: str | None = None  # multiple choice: how a reply's letter is read (tasks.choice.RULES); null: the
    #                          set's own (tasks.TASKS[format].rule)

    def problems(self) -> list[str]:
        found = []
        if self.metric is not None and self.metric not in (*METRICS, "none"):
            found.append(f"metric={self.metric!r} is not one of {', '.join(METRICS)}, none or null")
        if self.rule is not None and self.rule not in RULES:
            found.append(f"rule={self.rule!r} is not one of {', '.join(RULES)} or null")
        return found or (self.judge.problems() if self.metric == "judge" else [])

    def rule_for(self, data_format: str) -> str | None:
        """The extraction rule a job of this data format is scored with (None: an open-ended set's)."""
        return self.rule or TASKS[data_format].rule

    def metric_for(self, data_format: str) -> str | None:
        """The metric a job of this data format is scored with (None: from its rows)."""
        return self.metric or FORMAT_METRICS.get(data_format)


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
               store_path: str | os.PathLike | None = None, rule: str | None = None) -> dict:
    """Score rows (see the module's doc); `metric` None picks `default_metric`; `judge` is needed for
    `judge`, whose verdicts live in `store_path`, else `judge.store`, else in memory; `rule` reads the
    multiple-choice replies (`tasks.choice.RULES`; None: the generic one). Returns
    {"metric", "overall", "by_category", "unscored", "requests", ...}, each group with `n` (scored rows),
    `correct`, `wrong` (answered, not right), `errors` (error rows), `accuracy` (correct / n),
    `unparseable`, `ci95`, for the judge `score`, and for multiple choice `reference_accuracy`: correct over
    the replies the rule's reference counts (Video-MME's script leaves out replies it cannot read)."""
    rows = list(rows)
    scored = [r for r in rows if _scored(r)]
    metric = metric or default_metric(scored)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "judge" and judge is None:
        raise ValueError("metric judge needs a judge (url and model)")
    if metric == "choice" and scored and not any(r.get("options") for r in scored):
        raise ValueError(f"metric choice needs multiple-choice rows, and none of the {len(scored)} rows "
                         "with an answer has options: score them with exact or judge")
    failed = [bool(r.get("error")) or r.get("prediction") is None for r in scored]
    right = [False] * len(scored)
    points: list[int | None] = [None] * len(scored)
    unparseable = [False] * len(scored)
    counted = [True] * len(scored)  # in the reference's denominator (error rows: as an empty reply)
    requests = 0
    if metric == "judge":
        answered = [i for i, f in enumerate(failed) if not f]
        verdicts, requests = judge_triples([judge_messages(scored[i]) for i in answered], judge, store_path)
        for i, verdict in zip(answered, verdicts, strict=True):
            unparseable[i] = verdict is None
            right[i], points[i] = verdict or (False, 0)
        points = [0 if p is None else p for p in points]
    else:
        for i, row in enumerate(scored):
            if metric == "choice" and row.get("options"):
                extraction = extract(None if failed[i] else row["prediction"], row["options"], rule)
                counted[i] = extraction.counted
                if not failed[i]:
                    unparseable[i] = not extraction.letters
                    right[i] = answer_letter(row) in extraction.letters
            elif failed[i]:
                continue
            else:
                right[i] = normalize(row["prediction"]) == normalize(row["answer"])
    categories = [str(r["category"]) if r.get("category") is not None else "all" for r in scored]
    videos = [r.get("video") if r.get("video") is not None else f"\0{r.get('id', i)}"
              for i, r in enumerate(scored)]  # fmt: skip

    def group(members: list[int]) -> dict:
        n = len(members)
        correct, errors = sum(right[i] for i in members), sum(failed[i] for i in members)
        out = {"n": n, "correct": correct, "wrong": n - correct - errors, "errors": errors,
               "accuracy": correct / n if n else None, "unparseable": sum(unparseable[i] for i in members),
               "ci95": bootstrap_ci([right[i] for i in members], [videos[i] for i in members])}  # fmt: skip
        if metric == "judge":
            out["score"] = sum(points[i] for i in members) / n if n else None
        if metric == "choice":
            denominator = sum(counted[i] for i in members)
            out["reference_accuracy"] = (sum(right[i] and counted[i] for i in members) / denominator
                                         if denominator else None)
        return out

    result = {
        "metric": metric,
        **({"rule": rule_named(rule).name, "rule_reference": rule_named(rule).reference}
           if metric == "choice" else {}),
        "overall": group(list(range(len(scored)))),
        "by_category": {c: group([i for i, k in enumerate(categories) if k == c])
                        for c in sorted(set(categories))},
        "unscored": len(rows) - len(scored),
        "requests": requests,
        "visual_tokens_kept_mean": _mean(scored, "visual_tokens_kept"),
        "answer_seconds_mean": _mean(scored, "answer_seconds"),
        "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "cluster": "video"},
    }
    if metric == "judge":
        result.update(judge=judge.record(), judge_store=str(store_path or judge.store or ":memory:"))
    return result


def _mean(rows: list[dict], key: str) -> float | None:
    """The mean of `key` over the rows that have a value for it, or None."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


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
               rows: list[dict] | None = None, rule: str | None = None) -> dict:
    """Score an output file (`rows`: its rows when already read; each id counted once, `unique_rows`;
    `rule`: how multiple-choice replies are read, `tasks.choice.RULES`) and
    write the result, with `source`, to `scores` (default `<stem>.scores.json` beside it, atomically);
    returns it. The judge's verdict store is `store_path`, else `judge.store`, else `<stem>.verdicts.sqlite`
    beside the output."""
    rows = unique_rows(read_rows(path) if rows is None else rows)
    store = store_path or store_path_for(path, judge)
    try:
        result = {"source": str(path),
                  **score_rows(rows, metric=metric, judge=judge, store_path=store, rule=rule)}
    except ValueError as err:  # the rows do not fit the metric: name the file
        raise ValueError(f"{path}: {err}") from None
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
    """A file's scores as Markdown: one row per category, then `overall`; error rows (`errors`) apart from
    the answers that were wrong (`wrong`)."""
    columns = ["category", "n", "correct", "wrong", "errors", "accuracy", "ci95"]
    columns += ["score", "unparseable"] if result["metric"] == "judge" else ["unparseable"]
    groups = [*result["by_category"].items(), ("overall", result["overall"])]
    table = markdown_table([{"category": name, **g} for name, g in groups], columns, _cell)
    notes = [f"metric: {result['metric']}"]
    if result["metric"] == "judge":
        judge = result["judge"]
        temperature = "the API's default" if judge["temperature"] is None else judge["temperature"]
        notes.append(f"judge: {judge['model']} at {judge['url']} (prompt v{judge['prompt_version']}, "
                     f"temperature {temperature}, up to {judge['reask']} re-asks), "
                     f"{result['requests']} requests this run")
    if result["unscored"]:
        notes.append(f"{result['unscored']} rows without an answer not scored")
    return table + "\n" + "\n".join(notes)


# ----------------------------------------------------------------------------------- the scoring record


def scoring_record_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".scoring.json")


def write_scoring_record(output: str | os.PathLike, data_format: str, metric: str | None,
                         judge: JudgeConfig | None, served_model: str | None = None,
                         rule: str | None = None) -> Path:
    """Record beside a job's output how it is scored, so that `python -m pipelines.score OUTPUT` needs no
    other flag: the set (`data_format`), its `metric` (None: from the rows), its multiple-choice `rule`
    and, when it has one, the judge's settings (the key's env var name, never the key) and the model its
    endpoint said it served."""
    return write_json(scoring_record_path(output), {
        "data_format": data_format, "metric": metric, "rule": rule,
        "judge": judge.record() if judge is not None and judge.url else None, "served_model": served_model,
    })  # fmt: skip


def read_scoring_record(output: str | os.PathLike) -> dict:
    """The job's scoring record beside `output` (`write_scoring_record`), {} when there is none."""
    path = scoring_record_path(output)
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"scoring record {path}: not valid JSON ({err}); pass --metric, --rule (and "
                         "--judge-*) or delete it") from None


def recorded_rule(output: str | os.PathLike, rule: str | None = None) -> str | None:
    """The multiple-choice rule to score `output` with: `rule` when given, else the job's record beside the
    output (`write_scoring_record`), else None (the generic rule)."""
    return rule_named(rule).name if rule is not None else read_scoring_record(output).get("rule")


def scoring_settings(output: str | os.PathLike, metric: str | None = None,
                     judge_overrides: dict | None = None) -> tuple[str | None, JudgeConfig | None]:
    """The metric (None: from the rows) and judge to score `output` with: what is given (`metric`;
    `judge_overrides`, JudgeConfig fields, a `url` among them meaning the judge), over the job's record
    beside the output (`write_scoring_record`). The judge may still lack its url or model: check
    `problems()`."""
    record = read_scoring_record(output)
    overrides = judge_overrides or {}
    recorded = record.get("metric") if record.get("metric") != "none" else None
    metric = metric or ("judge" if overrides.get("url") else None) or recorded
    if metric != "judge":
        return metric, None
    fields = {f.name for f in dataclass_fields(JudgeConfig)}
    settings = {k: v for k, v in (record.get("judge") or {}).items() if k in fields}
    return metric, JudgeConfig(**{**settings, **overrides})


def _judge_problems(output: str | os.PathLike, judge: JudgeConfig) -> str | None:
    """Why `judge` cannot score `output`, in the command line's terms, or None."""
    problems = judge.problems()
    if not problems:
        return None
    return (f"{output}: {'; '.join(p.replace('judge.', '--judge-') for p in problems)} (scored by an LLM "
            f"judge; nothing usable recorded in {scoring_record_path(output).name})")


# ---------------------------------------------------------------------------------------------- sweeps

NOT_SCORABLE = "no answers: not scorable"


def sweep_table(folder: str | os.PathLike, metric: str | None = None, judge_overrides: dict | None = None,
                rule: str | None = None) -> list[dict]:
    """One row per job of a Hydra `-m` sweep folder (each job's folder has `.hydra/overrides.yaml` and its
    output file, which gets its own scores file, scored as `scoring_settings` says): the job's overrides,
    mean visual tokens kept, accuracy per category and overall with its ci95, the output's `rows`, the
    scored answers that were `wrong`, the output's error rows (`errors`), and `retention` against the job
    of the sweep run with `compression=none` (None when there is not exactly one, or its accuracy is 0 or
    unknown). A job without answers gets no scores: its `note` says so."""
    from omegaconf import OmegaConf

    rows = []
    for overrides in sorted(Path(folder).glob("*/.hydra/overrides.yaml")):
        job = overrides.parent.parent
        outputs = sorted(p for p in job.iterdir() if p.suffix.lower() in (".jsonl", ".parquet"))
        if len(outputs) != 1:
            raise ValueError(f"sweep job {job}: expected one output file (.jsonl or .parquet), got {outputs}")
        output = outputs[0]
        job_rows = unique_rows(read_rows(output))
        settings = [str(o) for o in OmegaConf.load(overrides) if not str(o).startswith(("data.", "output."))]
        row = {"setting": " ".join(settings) or "(defaults)",
               "visual_tokens": _mean(job_rows, "visual_tokens_kept"), "rows": len(job_rows),
               "errors": sum(bool(r.get("error")) for r in job_rows),
               "overall": None, "ci95": None, "wrong": None, "metric": None}  # fmt: skip
        if any(_scored(r) for r in job_rows):
            job_metric, judge = scoring_settings(output, metric, judge_overrides)
            if judge is not None and _judge_problems(output, judge):
                raise ValueError(_judge_problems(output, judge))
            result = score_file(output, metric=job_metric, judge=judge, rows=job_rows,
                                rule=recorded_rule(output, rule))
            row.update({c: g["accuracy"] for c, g in result["by_category"].items()},
                       overall=result["overall"]["accuracy"], ci95=result["overall"]["ci95"],
                       wrong=result["overall"]["wrong"], metric=result["metric"])  # fmt: skip
        else:
            row["note"] = NOT_SCORABLE
        rows.append({**row, "output": str(output)})
    if not rows:
        raise ValueError(f"{folder}: no job folders with .hydra/overrides.yaml (is it a -m sweep's folder?)")
    full = [r for r in rows if "compression=none" in r["setting"].split()]
    reference = full[0]["overall"] if len(full) == 1 else None
    for row in rows:
        row["retention"] = row["overall"] / reference if reference and row["overall"] is not None else None
    return rows


_SWEEP_COLUMNS = ("setting", "visual_tokens", "overall", "ci95", "rows", "wrong", "errors", "retention",
                  "metric", "note", "output")  # fmt: skip


def format_sweep(rows: list[dict]) -> str:
    """The sweep table as Markdown: the setting, visual tokens, accuracy per category, overall and ci95,
    rows, wrong answers, error rows, retention, metric (and a note on a job that cannot be scored)."""
    categories = [c for c in dict.fromkeys(k for row in rows for k in row) if c not in _SWEEP_COLUMNS]
    columns = ["setting", "visual_tokens", *categories, "overall", "ci95", "rows", "wrong", "errors",
               "retention", "metric"] + (["note"] if any(r.get("note") for r in rows) else [])  # fmt: skip
    return markdown_table(rows, columns, _cell)


# ------------------------------------------------------------------------------------------------- CLI


def _temperature(text: str) -> float | None:
    """--judge-temperature: a number, or `default` (not sent: the API's default)."""
    return None if text.lower() in ("default", "none", "null") else float(text)


def main(argv: list[str] | None = None) -> dict | list[dict]:
    parser = argparse.ArgumentParser(
        description="Score a job's predictions (exact, multiple choice or an LLM judge), per category and "
                    "overall. The metric and judge settings come from the job's <stem>.scoring.json when it "
                    "has one; a flag given overrides it.")  # fmt: skip
    parser.add_argument("output", help="the job's output (.jsonl or .parquet), or a -m sweep's folder")
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="default: the recorded one, else choice when any row has options, else exact; "
                             "judge when --judge-url")  # fmt: skip
    parser.add_argument("--rule", choices=tuple(RULES), default=None,
                        help="multiple choice: how a reply's letter is read (default: the recorded one, the "
                             "set's own; a manifest: lmms_eval)")  # fmt: skip
    parser.add_argument("--scores", default=None,
                        help="the scores file (default <stem>.scores.json; a sweep: scores_table.json)")
    given = argparse.SUPPRESS  # a judge flag not given leaves the recorded setting (or the default)
    parser.add_argument("--judge-url", default=given,
                        help="OpenAI-compatible base URL, e.g. http://host:8000/v1 (implies --metric judge)")
    parser.add_argument("--judge-model", default=given)
    parser.add_argument("--judge-key-env", default=given,
                        help="env var holding the API key (unset: a placeholder key, for local endpoints)")
    parser.add_argument("--judge-temperature", type=_temperature, default=given,
                        help="a number, or 'default': not sent, the API's default, as Video-LLaVA's script")
    parser.add_argument("--judge-reask", type=int, default=given,
                        help="ask an empty or unparseable reply again up to this many times (default 5)")
    parser.add_argument("--judge-concurrency", type=int, default=given)
    parser.add_argument("--judge-retries", type=int, default=given)
    parser.add_argument("--judge-timeout", type=float, default=given, help="seconds per request")
    parser.add_argument("--judge-backoff", type=float, default=given,
                        help="seconds before the first retry, doubled each time")
    parser.add_argument("--judge-store", default=given, help="verdict store (default <stem>.verdicts.sqlite)")
    args = parser.parse_args(argv)
    overrides = {key.removeprefix("judge_"): v for key, v in vars(args).items() if key.startswith("judge_")}
    try:
        if Path(args.output).is_dir():
            rows = sweep_table(args.output, metric=args.metric, judge_overrides=overrides, rule=args.rule)
            table = format_sweep(rows)
            write_text(Path(args.output) / "scores_table.md", table + "\n")
            write_json(Path(args.scores or Path(args.output) / "scores_table.json"), rows)
            print(table)
            return rows
        rows = read_rows(args.output)
        if not any(_scored(r) for r in rows):
            raise ValueError(f"{args.output}: no row has an answer to score")
        metric, judge = scoring_settings(args.output, args.metric, overrides)
        if judge is not None and _judge_problems(args.output, judge):
            parser.error(_judge_problems(args.output, judge))
        result = score_file(args.output, metric=metric, judge=judge, scores=args.scores, rows=rows,
                            rule=recorded_rule(args.output, args.rule))
    except (JudgeError, ValueError, FileNotFoundError) as err:  # nothing written
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_REFUSED) from None
    print(format_table(result))
    print(f"written {args.scores or scores_path(args.output)}")
    return result


if __name__ == "__main__":
    main()
