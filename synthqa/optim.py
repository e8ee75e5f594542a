"""What both training phases share: batches of in-memory clips, AdamW with warm-up and cosine decay, and
one update step (gradients clipped to norm 1)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from synthqa.clips import TrainingSample


def batches(stream: Iterator[TrainingSample], size: int) -> Iterator[list[TrainingSample]]:
    """Endless lists of `size` consecutive samples of `stream`."""
    while True:
        yield [next(stream) for _ in range(size)]


def optimizer_and_schedule(params: list, lr: float, steps: int
                           ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (weight decay 0.01) at peak `lr`: linear warm-up over a tenth of the `steps` (at most 100),
    then cosine decay to 10% of `lr` at `steps`."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=min(100, steps // 10 + 1), num_training_steps=steps, min_lr_rate=0.1)
    return optimizer, scheduler


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   params: list, loss: torch.Tensor) -> float:
    """Backpropagate `loss`, clip the gradients of `params` to norm 1, update, advance the schedule;
    returns the loss."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
