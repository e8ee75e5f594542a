"""What a published set is to a job: how it is read, asked, answered and scored, and what was published."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.manifest import Question

if TYPE_CHECKING:
    from pipelines.datasets import DataConfig


@dataclass(frozen=True)
class Published:
    """A number published for Video-LLaVA-7B on a set, and where."""

    value: float
    metric: str  # what it measures, e.g. "accuracy %" or "judge score 0-5"
    setting: str  # the split or condition, e.g. "test, w/o subtitles"
    source: str  # the paper's table or the leaderboard


@dataclass(frozen=True)
class Task:
    """One set (`data.format`): its reader, the prompt its reference asks with, the extraction rule of its
    reference evaluation (`tasks.choice.RULES`; None: open-ended), its metric and published numbers."""

    name: str
    read: Callable[[DataConfig], list[Question]] | None  # None: the manifest (pipelines.manifest)
    prompt: str  # the answer stage's template: `<video>` and `{question}` (AnswerConfig.prompt)
    choice_prompt: str  # a multiple-choice question with its lettered options (AnswerConfig.choice_prompt)
    rule: str | None
    metric: str | None  # exact | choice | judge; None: from the rows (the manifest)
    published: tuple[Published, ...] = ()
    unpublished: str = ""  # why there is no number, when there is none
    # the set's official results file from the job's rows (each with `choice`, the letter its rule
    # extracted, or None): what its leaderboard or evaluation server reads (`python -m tasks.results`)
    results: Callable[[list[dict]], object] | None = None
