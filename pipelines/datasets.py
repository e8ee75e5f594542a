"""Where a job's questions come from: our manifest, or a published video-QA benchmark's files as they ship.

`read_questions(data)` turns any of them into the same `Question`s (`pipelines.manifest`): the set's own
question id, the video's path (a video that cannot be found is that question's `error`, not a crash), the
question, its answer (for multiple choice the correct option's letter), its `category` and, for
multiple choice, its `options`. Every problem of an annotation file (a missing file or field, a question
without an answer, a duplicate id) is reported at once, naming the file and the field, before any video
is decoded.

Each set (`data.format`) is a task in `tasks/` (`tasks.TASKS[format]`): its reader, with the files it reads
and their quirks in its module's doc (`tasks.videollava`, `tasks.videomme`, `tasks.mvbench`,
`tasks.nextqa`, `tasks.egoschema`); the shared reading of annotation files (`.json` a list of records,
`.jsonl`, `.parquet`, `.csv`) and the video lookup under `data.video_root` (default: the folder of the
file read; for an MVBench folder of task files, the folder above it) are `tasks.tables`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.manifest import Question, read_manifest
from tasks import FORMATS, TASKS
from tasks.tables import VIDEO_EXTENSIONS, VideoIndex

__all__ = ["FORMATS", "VIDEO_EXTENSIONS", "DataConfig", "VideoIndex", "read_questions"]


@dataclass
class DataConfig:
    """What a job reads (the `data` config section)."""

    format: str = "manifest"  # manifest | videollava | videomme | mvbench | nextqa | egoschema
    manifest: str | None = None  # format=manifest: our JSONL or CSV
    questions: str | None = None  # format=videollava: the set's questions file (test_q.json)
    answers: str | None = None  # videollava: its answers file (test_a.json); egoschema: subset_answers.json
    annotations: str | None = None  # videomme, mvbench, nextqa, egoschema: the set's annotation file
    video_root: str | None = None  # where the videos are (default: the folder of the file read)

    def files(self) -> dict[str, str | None]:
        """The files this format reads, by key (EgoSchema's separate answers file when given)."""
        if self.format == "manifest":
            return {"manifest": self.manifest}
        if self.format == "videollava":
            return {"questions": self.questions, "answers": self.answers}
        if self.format == "egoschema" and self.answers:
            return {"annotations": self.annotations, "answers": self.answers}
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
    read = TASKS[data.format].read
    if read is None:  # our manifest
        return read_manifest(data.manifest, data.video_root, require_question=require_question)
    return read(data)
