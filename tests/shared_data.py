"""Where tests find data fetched from public repositories: it lives in the project's shared/ folder (the
steering repository's, not this one's git), because such files are not committed here. Each kind has a
sources file in tests/data/<kind>/ saying where every file comes from; a test that needs the files is
skipped, naming where it looked, when no shared/ folder holds them."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def candidates(kind: str) -> list[Path]:
    """`$VZPIPE_SHARED/<kind>` when set, else `shared/<kind>` inside the checkout, then beside it."""
    if os.environ.get("VZPIPE_SHARED"):
        return [Path(os.environ["VZPIPE_SHARED"]) / kind]
    return [ROOT / "shared" / kind, ROOT.parent / "shared" / kind]


def shared_folder(kind: str) -> Path | None:
    """The first candidate folder that exists, or None."""
    return next((folder for folder in candidates(kind) if folder.is_dir()), None)


def missing_reason(kind: str, sources: str) -> str:
    return f"shared {kind} not found in {', '.join(map(str, candidates(kind)))} (sources: {sources})"
