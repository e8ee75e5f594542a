"""The job's closing numbers: printed on the driver and written as JSON next to the output."""

from __future__ import annotations

from pathlib import Path

from pipelines.files import write_json


def summarize(rows: list[dict], wall_seconds: float, rows_this_run: int) -> dict:
    ok = [r for r in rows if r.get("error") is None]

    def mean(key: str, subset: list[dict]) -> float | None:
        values = [r[key] for r in subset if r.get(key) is not None]
        return round(sum(values) / len(values), 4) if values else None

    full, kept = mean("visual_tokens_full", ok), mean("visual_tokens_kept", ok)
    return {
        "rows": len(rows),
        "ok": len(ok),
        "error": len(rows) - len(ok),
        "rows_this_run": rows_this_run,
        "visual_tokens_full_mean": full,
        "visual_tokens_kept_mean": kept,
        "visual_tokens_kept_fraction": round(kept / full, 4) if full and kept is not None else None,
        "seconds_per_row": {stage: mean(f"{stage}_seconds", ok) for stage in ("decode", "encode", "answer")},
        "wall_seconds": round(wall_seconds, 3),
        "rows_per_second": round(rows_this_run / wall_seconds, 4) if wall_seconds > 0 else None,
    }


def write_summary(summary: dict, output_path: str | Path) -> Path:
    """`<name>.summary.json` beside the output file."""
    output_path = Path(output_path)
    return write_json(output_path.with_name(output_path.stem + ".summary.json"), summary)
