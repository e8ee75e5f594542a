"""The published video-QA sets as tasks: one module per set (reader, prompt, extraction rule, metric, the
numbers published for Video-LLaVA-7B, and where it has one, its official results file), plus `manifest`,
the generic case. `TASKS[data.format]` is what a job of that format is asked, extracted and scored with
unless the config overrides it (`pipeline.prompt`, `pipeline.choice_prompt`, `score.rule`)."""

from __future__ import annotations

from stages.prompts import CHOICE_PROMPT, PROMPT
from tasks import egoschema, mvbench, nextqa, videollava, videomme
from tasks.choice import DEFAULT_RULE
from tasks.task import Published, Task

# our manifest: Video-LLaVA's prompt, the options lettered under the question, lmms-eval's current rule
MANIFEST = Task(name="manifest", read=None, prompt=PROMPT, choice_prompt=CHOICE_PROMPT, rule=DEFAULT_RULE,
                metric=None, unpublished="a manifest is any set")
TASKS: dict[str, Task] = {task.name: task for task in (
    MANIFEST, videollava.TASK, videomme.TASK, mvbench.TASK, nextqa.TASK, egoschema.TASK)}  # fmt: skip
FORMATS = tuple(TASKS)

__all__ = ["FORMATS", "TASKS", "Published", "Task"]
