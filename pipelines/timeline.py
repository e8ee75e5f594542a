"""Where a job's time went: each stage's batches on one clock, as numbers for the summary and as a
Gantt-style chart beside it (text always, PNG when matplotlib is installed: the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

from pipelines.files import write_text
from pipelines.summary import STAGES


def stage_timeline(intervals: dict[str, set[tuple[float, float]]], t0: float) -> dict[str, dict]:
    """{stage: {first_start, first_end, last_start, last_end, busy, batches}} in seconds from `t0` (the
    job's start), from each stage's batch intervals (wall-clock [start, end])."""
    out = {}
    for stage in STAGES:
        spans = sorted(intervals.get(stage, ()))
        if not spans:
            continue
        last_end = max(e for _, e in spans)
        out[stage] = {"first_start": round(spans[0][0] - t0, 3), "first_end": round(spans[0][1] - t0, 3),
                      "last_start": round(spans[-1][0] - t0, 3), "last_end": round(last_end - t0, 3),
                      "busy": round(sum(e - s for s, e in spans), 3), "batches": len(spans)}
    return out


def gantt_text(intervals: dict[str, set[tuple[float, float]]], t0: float, width: int = 60) -> str:
    """One line per stage, `#` where one of its batches ran, over the job's wall time."""
    spans = {stage: sorted(intervals.get(stage, ())) for stage in STAGES}
    end = max((e for stage in spans.values() for _, e in stage), default=t0)
    scale = width / max(end - t0, 1e-9)
    lines = []
    for stage, stage_spans in spans.items():
        cells = [" "] * width
        for start, stop in stage_spans:
            first = int((start - t0) * scale)
            for cell in range(first, max(int((stop - t0) * scale), first + 1)):
                cells[min(cell, width - 1)] = "#"
        lines.append(f"{stage:>7} |{''.join(cells)}|")
    lines.append(f"{'':>7}  0 s{'':{width - 10}}{end - t0:6.1f} s")
    return "\n".join(lines)


def write_gantt(intervals: dict[str, set[tuple[float, float]]], t0: float, output: Path) -> list[Path]:
    """`<stem>.timeline.txt` (and `.png` with matplotlib) beside the output; the files written."""
    written = [write_text(output.with_name(output.stem + ".timeline.txt"), gantt_text(intervals, t0) + "\n")]
    try:
        import matplotlib
    except ImportError:
        return written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 1.8))
    for row, stage in enumerate(STAGES):
        spans = sorted(intervals.get(stage, ()))
        axes.broken_barh([(s - t0, e - s) for s, e in spans], (row - 0.4, 0.8))
    axes.set_yticks(range(len(STAGES)), STAGES)
    axes.invert_yaxis()
    axes.set_xlabel("seconds from the job's start")
    figure.tight_layout()
    png = output.with_name(output.stem + ".timeline.png")
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return [*written, png]
