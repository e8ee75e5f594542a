"""Shared helpers for benchmarks: machine description, peak RSS, side-by-side timing, JSON output.

Format: ../shared/docs/benchmarks.md. Every bench writes bench/results/<name>.json.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from pipelines.files import write_json

RESULTS_DIR = Path(__file__).parent / "results"
CACHE_DIR = Path(__file__).parent / ".cache"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__}


def status_mb(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak) of this process in MiB (Linux). Not ru_maxrss: that survives exec,
    so a child process would start with the peak of the parent it was forked from."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset this process's peak RSS (VmHWM) to its current RSS, which is returned (MiB), so that a case
    measured next in a fresh process counts only what it adds."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


def added_memory(case: Callable[[], object]) -> dict:
    """Peak RSS while `case` runs (under inference mode) and what it adds to the RSS before it, in MiB.
    Meant for a fresh process that has just built the case's inputs (see `json_from_subprocess`)."""
    gc.collect()
    loaded = reset_peak_rss()
    with torch.inference_mode():
        case()
    peak = status_mb("VmHWM")
    return {"peak_rss_mb": round(peak, 1), "added_mb": round(peak - loaded, 1)}


def json_from_subprocess(module: str, *args: str) -> dict:
    """Run `python -m module args` in a fresh process (so its peak RSS is its own) and parse the JSON
    object it prints last."""
    cmd = [sys.executable, "-m", module, *args]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved_medians(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict:
    """Time each case `repeats` times, alternating A B C A B C, and return the median seconds per case.

    Alternating keeps slow drifts of a shared machine out of the ratios.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def goal(value: float, op: str, target: float) -> dict:
    met = {">=": value >= target, ">": value > target, "<=": value <= target, "<": value < target}[op]
    return {"op": op, "target": target, "value": round(value, 4), "met": bool(met)}


def write_result(name: str, rows: list[dict], ratios: dict, goals: dict, folder: Path = RESULTS_DIR) -> Path:
    """`<folder>/<name>.json` in the format of ../shared/docs/benchmarks.md (`folder`: bench/results)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {
        "bench": name,
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "rows": rows,
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
        "goals": goals,
    }
    return write_json(folder / f"{name}.json", out)


def print_ratios(ratios: dict, goals: dict) -> None:
    """Each ratio, then each goal with its verdict."""
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    for key, g in goals.items():
        print(f"{key}: {g['value']} (goal {g['op']} {g['target']}: {'met' if g['met'] else 'NOT met'})")


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
