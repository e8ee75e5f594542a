"""A job's output as a set's official results file: what its leaderboard or evaluation server reads.

    python -m tasks.results OUTPUT --set videomme [--rule RULE] [--out PATH]

- `videomme`: Video-MME's `output_test_template.json` layout (one record per video, each question with
  its `response`), which the authors' `eval_your_results.py` scores and their leaderboard takes by mail.
- `egoschema`: the authors' server's submission {q_uid: option index, -1 for none} (`validate.py`, or
  `curl -X POST ... https://validation-server.onrender.com/api/upload/`).

The other sets' references read no file of their own. Each row's `choice` is the letter its rule extracts
(`--rule`; default the one recorded beside the output, else the set's own); each id counts once, as in
scoring (`pipelines.sink.unique_rows`). Default `--out`: `<stem>.<set>.json` beside the output.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipelines.files import write_json
from pipelines.score import read_rows, recorded_rule
from pipelines.sink import unique_rows
from tasks import TASKS
from tasks.choice import RULES, extract

WITH_RESULTS = tuple(name for name, task in TASKS.items() if task.results is not None)


def results_file(rows: list[dict], data_format: str, rule: str | None = None) -> object:
    """The official results document of `data_format` from a job's rows (`rule`: None, the set's own)."""
    task = TASKS[data_format]
    if task.results is None:
        raise ValueError(f"set {data_format!r} has no official results file (sets with one: "
                         f"{', '.join(WITH_RESULTS)})")
    rule = rule or task.rule
    chosen = [{**row, "choice": None if row.get("error") or not row.get("options")
               else extract(row.get("prediction"), row["options"], rule).letter} for row in rows]
    return task.results(chosen)


def write_results(output: str | os.PathLike, data_format: str, rule: str | None = None,
                  out: str | os.PathLike | None = None) -> Path:
    """Write `results_file` of an output file (JSONL or Parquet) and return its path."""
    output = Path(output)
    document = results_file(unique_rows(read_rows(output)), data_format, recorded_rule(output, rule))
    return write_json(out or output.with_name(f"{output.stem}.{data_format}.json"), document)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Write a set's official results file from a job's output.")
    parser.add_argument("output", help="the job's output (.jsonl or .parquet)")
    parser.add_argument("--set", required=True, choices=WITH_RESULTS, dest="data_format")
    parser.add_argument("--rule", choices=tuple(RULES), default=None,
                        help="how a reply's letter is read (default: the recorded one, else the set's own)")
    parser.add_argument("--out", default=None, help="default: <stem>.<set>.json beside the output")
    args = parser.parse_args(argv)
    try:
        path = write_results(args.output, args.data_format, args.rule, args.out)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"written {path}")
    return path


if __name__ == "__main__":
    main()
