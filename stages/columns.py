"""Batch columns read the same way whether a batch is plain Python lists or came through Ray Data.

Ray Data stores a missing value as an Arrow null, which reaches a numpy-format batch as None or as NaN
(of a float column's numpy dtype: an all-null column becomes float32).
"""

from __future__ import annotations

import traceback

import numpy as np
import torch


def is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float | np.floating) and bool(np.isnan(value)))


def errors_of(batch: dict, rows: int) -> list[str | None]:
    """The batch's `error` column as messages or None (a missing column means no errors)."""
    column = batch.get("error")
    if column is None:
        return [None] * rows
    return [None if is_missing(e) or e == "" else str(e) for e in column]


class RowErrors:
    """A batch's `error` and `error_traceback` columns as a stage keeps them: rows that arrived failed keep
    their message and traceback; `fail`, called while an exception is handled, records a new failure with
    the full traceback (which the job writes to `<stem>.errors.log`)."""

    def __init__(self, batch: dict, rows: int) -> None:
        self.messages = errors_of(batch, rows)
        column = batch.get("error_traceback")
        self.tracebacks = [None if column is None or is_missing(t) else str(t)
                           for t in (column if column is not None else [None] * rows)]

    def ok(self, row: int) -> bool:
        return self.messages[row] is None

    def fail(self, row: int, message: str) -> None:
        self.messages[row] = message
        self.tracebacks[row] = traceback.format_exc()

    def columns(self) -> dict[str, list[str | None]]:
        return {"error": self.messages, "error_traceback": self.tracebacks}


def to_column(tensor: torch.Tensor) -> tuple[np.ndarray, str]:
    """A tensor as a numpy array for a batch column, in its own dtype and bits: bfloat16, which numpy
    lacks, travels as its int16 bit pattern. Returns (array, dtype name) for `from_column`."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy(), "bfloat16"
    return tensor.numpy(), str(tensor.dtype).removeprefix("torch.")


def from_column(array: np.ndarray | torch.Tensor, dtype: str | None) -> torch.Tensor:
    """The tensor `to_column` made (`dtype` None: the array's own)."""
    tensor = torch.as_tensor(np.asarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor
