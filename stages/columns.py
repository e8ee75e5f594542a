"""Batch columns read the same way whether a batch is plain Python lists or came through Ray Data.

Ray Data stores a missing value as an Arrow null, which reaches a numpy-format batch as None or as NaN
(of a float column's numpy dtype: an all-null column becomes float32).
"""

from __future__ import annotations

import numpy as np


def is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float | np.floating) and bool(np.isnan(value)))


def errors_of(batch: dict, rows: int) -> list[str | None]:
    """The batch's `error` column as messages or None (a missing column means no errors)."""
    column = batch.get("error")
    if column is None:
        return [None] * rows
    return [None if is_missing(e) or e == "" else str(e) for e in column]
