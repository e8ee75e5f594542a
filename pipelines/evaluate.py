"""Accuracy of a job's predictions against ground truth, per question type and overall.

Works on any output file the job writes (JSONL or Parquet) whose rows have `answer`: the synthetic
benchmark of `synthqa` today, real short-answer datasets later. A prediction is right when it
equals the answer after normalisation (lowercase, punctuation and the articles a/an/the removed,
whitespace collapsed), so "The Red." matches "red". Rows without an answer are not scored; rows with an
`error` count as wrong (a compression setting that breaks videos must not look better for it).

The question type is the row's `type` column when there is one, else the part of its id after the last
`-` (synthetic ids are `"<clip>-<type>"`), else `all`.

    python -m pipelines.evaluate OUTPUT [--json PATH]     # prints the table, writes OUTPUT.eval.json
    python -m pipelines.evaluate multirun/DATE/TIME       # a `-m` sweep: one row per job, see sweep_table
"""

from __future__ import annotations

import argparse
import re
import string
from collections.abc import Iterable
from pathlib import Path

from pipelines.files import markdown_table, read_jsonl, write_json, write_text

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = {"a", "an", "the"}


def normalize(text: object) -> str:
    """Lowercase, punctuation removed, articles dropped, whitespace collapsed; None -> ''."""
    if text is None:
        return ""
    words = _PUNCTUATION.sub(" ", str(text).lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def question_type(row: dict) -> str:
    if row.get("type"):
        return str(row["type"])
    qid = str(row.get("id", ""))
    return qid.rsplit("-", 1)[1] if "-" in qid else "all"


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL or Parquet output file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"output file {path}: no such file")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return read_jsonl(path)


def evaluate(rows: Iterable[dict]) -> dict:
    """{"overall": {...}, "types": {type: {...}}, "unscored": n} with n/correct/accuracy/errors per
    group (types sorted), plus the mean visual tokens kept and answer seconds of the scored rows."""
    groups: dict[str, dict] = {}
    unscored = 0
    tokens, seconds = [], []
    for row in rows:
        if row.get("answer") is None or normalize(row["answer"]) == "":
            unscored += 1
            continue
        failed = bool(row.get("error"))
        right = not failed and normalize(row.get("prediction")) == normalize(row["answer"])
        for key in (question_type(row), "__overall__"):
            group = groups.setdefault(key, {"n": 0, "correct": 0, "errors": 0})
            group["n"] += 1
            group["correct"] += right
            group["errors"] += failed
        if row.get("visual_tokens_kept") is not None:
            tokens.append(row["visual_tokens_kept"])
        if row.get("answer_seconds") is not None:
            seconds.append(row["answer_seconds"])
    for group in groups.values():
        group["accuracy"] = group["correct"] / group["n"]
    overall = groups.pop("__overall__", {"n": 0, "correct": 0, "errors": 0, "accuracy": None})
    return {
        "overall": overall,
        "types": dict(sorted(groups.items())),
        "unscored": unscored,
        "visual_tokens_kept_mean": sum(tokens) / len(tokens) if tokens else None,
        "answer_seconds_mean": sum(seconds) / len(seconds) if seconds else None,
    }


def format_table(result: dict) -> str:
    lines = [f"{'type':<12}{'n':>7}{'correct':>9}{'errors':>8}{'accuracy':>10}"]
    for name, g in [*result["types"].items(), ("overall", result["overall"])]:
        acc = "-" if g["accuracy"] is None else f"{100 * g['accuracy']:.1f}%"
        lines.append(f"{name:<12}{g['n']:>7}{g['correct']:>9}{g['errors']:>8}{acc:>10}")
    if result["unscored"]:
        lines.append(f"({result['unscored']} rows without an answer not scored)")
    return "\n".join(lines)


def sweep_table(folder: str | Path) -> list[dict]:
    """One row per job of a Hydra `-m` sweep folder (each job's folder has `.hydra/overrides.yaml` and its
    output file): the job's overrides, mean visual tokens kept, accuracy per type and overall, and
    `retention` against the sweep's job run with `compression=none` (None when there is not exactly one).
    """
    from omegaconf import OmegaConf

    rows = []
    for overrides in sorted(Path(folder).glob("*/.hydra/overrides.yaml")):
        job = overrides.parent.parent
        outputs = sorted(p for p in job.iterdir() if p.suffix.lower() in (".jsonl", ".parquet"))
        if len(outputs) != 1:
            raise ValueError(f"sweep job {job}: expected one output file (.jsonl or .parquet), got {outputs}")
        result = evaluate(read_rows(outputs[0]))
        settings = [str(o) for o in OmegaConf.load(overrides) if not str(o).startswith(("data.", "output."))]
        row = {"setting": " ".join(settings) or "(defaults)",
               "visual_tokens": result["visual_tokens_kept_mean"],
               **{t: g["accuracy"] for t, g in result["types"].items()},
               "overall": result["overall"]["accuracy"], "errors": result["overall"]["errors"],
               "output": str(outputs[0])}  # fmt: skip
        rows.append(row)
    if not rows:
        raise ValueError(f"{folder}: no job folders with .hydra/overrides.yaml (is it a -m sweep's folder?)")
    full = [r for r in rows if "compression=none" in r["setting"].split()]
    reference = full[0]["overall"] if len(full) == 1 else None
    for row in rows:
        row["retention"] = row["overall"] / reference if reference else None
    return rows


def format_sweep(rows: list[dict]) -> str:
    """The sweep table as Markdown."""
    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c != "output"]
    return markdown_table(rows, columns, lambda v: f"{v:.3f}" if isinstance(v, float) else "" if v is None
                          else str(v))


def main(argv: list[str] | None = None) -> dict | list[dict]:
    parser = argparse.ArgumentParser(description="Accuracy per question type of a job's output file.")
    parser.add_argument("output", help="the job's output (.jsonl or .parquet) with `answer` per row, or a "
                                           "-m sweep's folder")
    parser.add_argument("--json", default=None, help="where to write the result (default OUTPUT.eval.json)")
    args = parser.parse_args(argv)
    if Path(args.output).is_dir():
        rows = sweep_table(args.output)
        table = format_sweep(rows)
        write_text(Path(args.output) / "accuracy_table.md", table + "\n")
        write_json(Path(args.json or Path(args.output) / "accuracy_table.json"), rows)
        print(table)
        return rows
    result = evaluate(read_rows(args.output))
    if result["overall"]["n"] == 0:
        raise SystemExit(f"{args.output}: no row has an answer to score")
    result["source"] = str(args.output)
    target = write_json(Path(args.json or f"{args.output}.eval.json"), result)
    print(format_table(result))
    print(f"written {target}")
    return result


if __name__ == "__main__":
    main()
