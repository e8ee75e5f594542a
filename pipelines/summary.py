"""The job's closing numbers: printed on the driver and written as JSON next to the output.

Counts and token means are over the whole output (the rows of earlier runs included); times and rates are
this run's alone. Stage times are sums: a clip's decode and encode counted once however many questions
it has, each answer's share of its batched `generate` call.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.files import write_json
from pipelines.sink import unique_rows

STAGES = ("decode", "encode", "answer")


def summarize(rows: list[dict], this_run: list[dict], stage_seconds: dict[str, float],
              wall_seconds: float) -> dict:
    """`rows`: the whole output (each id counted once, `unique_rows`); `this_run`: the rows this run wrote;
    `stage_seconds`: this run's seconds per stage (see the module doc)."""
    rows = unique_rows(rows)
    ok = [r for r in rows if r.get("error") is None]

    def mean(key: str) -> float | None:
        values = [r[key] for r in ok if r.get(key) is not None]
        return round(sum(values) / len(values), 4) if values else None

    full, kept = mean("visual_tokens_full"), mean("visual_tokens_kept")
    answered = sum(r.get("error") is None for r in this_run)
    return {
        "rows": len(rows),
        "rows_from_earlier_runs": len(rows) - len(unique_rows(this_run)),  # ids this run did not write
        "ok": len(ok),
        "error": len(rows) - len(ok),
        "visual_tokens_full_mean": full,
        "visual_tokens_kept_mean": kept,
        "visual_tokens_kept_fraction": round(kept / full, 4) if full and kept is not None else None,
        "this_run": {
            "rows": len(this_run),
            "ok": answered,
            "error": len(this_run) - answered,
            "stage_seconds": {stage: round(stage_seconds.get(stage, 0.0), 4) for stage in STAGES},
            "wall_seconds": round(wall_seconds, 3),
            "rows_per_second": round(len(this_run) / wall_seconds, 4) if this_run and wall_seconds > 0
            else None,
        },
    }


def format_summary(summary: dict) -> str:
    """The summary as a few aligned lines for the console."""
    run = summary["this_run"]
    seconds = ", ".join(f"{stage} {run['stage_seconds'][stage]:.1f} s" for stage in STAGES)
    kept, full = summary["visual_tokens_kept_mean"], summary["visual_tokens_full_mean"]
    tokens = "-" if kept is None else f"{kept:g} of {full:g} kept per clip (mean over answered questions)"
    lines = [
        ("output", f"{summary['output']}: {summary['rows']} rows, {summary['ok']} answered, "
                   f"{summary['error']} errors"),
        ("this run", f"{run['rows']} rows{_earlier(summary)} in {run['wall_seconds']:.1f} s"
                     + (f" ({run['rows_per_second']:.2f} rows/s); {seconds}" if run["rows"] else "")),
        ("visual tokens", tokens),
    ]
    scores = summary.get("scores")
    if scores:
        overall = scores["overall"]
        lines.append(("scores", f"{scores['metric']}: accuracy {overall['accuracy']:.1%} of {overall['n']} "
                                f"({overall['errors']} errors) -> {scores['path']}"))
    for stage, span in summary.get("timeline", {}).items():
        lines.append((f"{stage} ran", f"{span['first_start']:.1f}-{span['last_end']:.1f} s from the start, "
                                      f"busy {span['busy']:.1f} s in {span['batches']} batches"))
    if summary.get("failed"):
        lines.append(("FAILED", summary["failed"]))
    return "\n".join(f"{name:>13}  {text}" for name, text in lines)


def _earlier(summary: dict) -> str:
    """Why this run's row count is not the output's: the rows already there from earlier runs."""
    earlier = summary.get("rows_from_earlier_runs")
    if not earlier:
        return ""
    return f" ({earlier} already in the file from {'an earlier run' if earlier == 1 else 'earlier runs'})"


def write_summary(summary: dict, output_path: str | Path) -> Path:
    """`<name>.summary.json` beside the output file."""
    output_path = Path(output_path)
    return write_json(output_path.with_name(output_path.stem + ".summary.json"), summary)
