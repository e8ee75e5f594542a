"""Where a job's questions come from: our manifest, or a published video-QA benchmark's files as they ship.

`read_questions(data)` turns any of them into the same `Question`s (`pipelines.manifest`): the set's own
question id, the video's path (a video that cannot be found is that question's `error`, not a crash), the
question, its answer (for multiple choice the correct option's letter), its `category` and, for
multiple choice, its `options`. Every problem of an annotation file (a missing file or field, a question
without an answer, a duplicate id) is reported at once, naming the file and the field, before any video
is decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipelines.manifest import Question, read_manifest

FORMATS = ("manifest", "videollava", "videomme", "mvbench", "nextqa", "egoschema")


@dataclass
class DataConfig:
    """What a job reads (the `data` config section)."""

    format: str = "manifest"  # manifest | videollava | videomme | mvbench | nextqa | egoschema
    manifest: str | None = None  # format=manifest: our JSONL or CSV
    questions: str | None = None  # format=videollava: the set's questions file (test_q.json)
    answers: str | None = None  # format=videollava: its answers file (test_a.json)
    annotations: str | None = None  # videomme, mvbench, nextqa, egoschema: the set's annotation file
    video_root: str | None = None  # where the videos are (default: the folder of the file read)

    def files(self) -> dict[str, str | None]:
        """The files this format reads, by key."""
        if self.format == "manifest":
            return {"manifest": self.manifest}
        if self.format == "videollava":
            return {"questions": self.questions, "answers": self.answers}
        return {"annotations": self.annotations}

    def problems(self) -> list[str]:
        if self.format not in FORMATS:
            return [f"format={self.format!r} is not one of {', '.join(FORMATS)}"]
        return [f"{key} must name the {self.format} file to read" for key, path in self.files().items()
                if not path]

    def describe(self) -> str:
        """The files read, for logs and error messages."""
        return ", ".join(str(path) for path in self.files().values())


def read_questions(data: DataConfig, *, require_question: bool = True) -> list[Question]:
    """Every question of the job's data, checked (see the module doc)."""
    if data.format == "manifest":
        return read_manifest(data.manifest, data.video_root, require_question=require_question)
    return READERS[data.format](data)


READERS: dict[str, Callable[[DataConfig], list[Question]]] = {}
