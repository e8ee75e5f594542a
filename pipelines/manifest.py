"""Reading the job's manifest: one row per question, grouped into one work item per video clip.

A manifest is JSONL or CSV with columns `id`, `video`, `question` (optional when captioning), and
optionally `answer`, `start`, `end` (seconds) and `category` (the question's type, for scores per
category). A JSONL manifest may give a multiple-choice question its `options` (a list of texts, shown
lettered A, B, ...); its `answer` is then the correct letter (or the correct option's text). Rows that
share a `conversation` id are the turns of one multi-turn conversation about one clip, numbered by `turn`
(1, 2, ... without gaps): each turn is asked after the earlier ones, with the model's own answers to them
in its prompt. Any other column (the user's own metadata) passes through to the output rows untouched.
Every problem in the file is reported at once, with its line number, before any work starts. Published
benchmarks are read as they ship by `pipelines.datasets`, into the same `Question`s.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.sink import OUTPUT_COLUMNS
from stages.prompts import LETTERS
from stages.remote import RemoteError, is_remote, is_url, join, local_path, parent, read_bytes

KNOWN_COLUMNS = {"id", "video", "question", "answer", "start", "end", "category", "options", "conversation",
                 "turn"}


class ManifestError(ValueError):
    """The manifest cannot be used; the message lists every problem with its line number."""


@dataclass(frozen=True)
class Question:
    id: str
    video: str  # resolved path
    question: str | None
    answer: str | None = None  # for multiple choice: the correct option's letter
    start: float | None = None
    end: float | None = None
    category: str | None = None  # the set's question type, task or duration group
    options: tuple[str, ...] | None = None  # multiple choice: the option texts, lettered A, B, ... in order
    error: str | None = None  # why this question cannot be asked (e.g. its video is missing): an error row
    extra: dict = field(default_factory=dict, compare=False)  # the manifest's other columns, passed on
    conversation: str | None = None  # a multi-turn conversation's id: its rows are the turns ...
    turn: int | None = None  # ... numbered 1..n, asked in that order


@dataclass
class VideoItem:
    """One clip to decode and encode once, with every question asked about it."""

    video: str
    start: float | None
    end: float | None
    questions: list[Question] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, float | None, float | None]:
        return (self.video, self.start, self.end)


def read_manifest(path: str | Path, video_root: str | Path | None = None, require_question: bool = True
                  ) -> list[Question]:
    """Parse and check a manifest. Relative video paths resolve against `video_root` (default: the
    manifest's folder) into absolute paths or URLs, so workers running elsewhere find them. The manifest,
    the root and each video may be URLs (`stages.remote`); a video's existence is not checked here, not
    even a URL's (a missing video is its row's error when it is decoded: no request per video on the
    driver)."""
    text, path = _manifest_text(path)
    default_root = parent(path) if isinstance(path, str) else path.parent
    try:
        root = _root(os.fspath(video_root if video_root is not None else default_root))
    except ValueError as err:
        raise ManifestError(f"data.video_root: {err}") from None
    records = _read_records(text, is_csv=str(path).lower().endswith(".csv"))
    problems: list[str] = []
    questions: list[Question] = []
    first_line: dict[str, int] = {}
    turns: dict[str, list[tuple[int, int, tuple]]] = {}  # conversation -> (turn, line, clip)
    for line, record in records:
        where = f"{path}:{line}"
        if isinstance(record, str):
            problems.append(f"{where}: {record}")
            continue
        reserved = sorted((set(record) - KNOWN_COLUMNS) & set(OUTPUT_COLUMNS))
        if reserved:
            problems.append(f"{where}: column(s) {', '.join(reserved)} are the job's own output columns")
        qid = _text(record.get("id"))
        video = _text(record.get("video"))
        question = _text(record.get("question"))
        if qid is None:
            problems.append(f"{where}: missing id")
        elif qid in first_line:
            problems.append(f"{where}: duplicate id {qid!r} (first on line {first_line[qid]})")
        else:
            first_line[qid] = line
        if video is None:
            problems.append(f"{where}: missing video")
        if question is None and require_question:
            problems.append(f"{where}: missing question")
        try:
            start = _seconds(record.get("start"), "start")
            end = _seconds(record.get("end"), "end")
        except ValueError as err:
            problems.append(f"{where}: {err}")
            continue
        if start is not None and end is not None and end <= start:
            problems.append(f"{where}: end={end} is not after start={start}")
        try:
            options, answer = choice_options(record.get("options"), _text(record.get("answer")))
        except ValueError as err:
            problems.append(f"{where}: {err}")
            continue
        try:
            conversation, turn = _conversation(record.get("conversation"), record.get("turn"))
        except ValueError as err:
            problems.append(f"{where}: {err}")
            continue
        if qid is None or video is None:
            continue
        try:
            video_path = resolve_video(video, root)
        except ValueError as err:
            problems.append(f"{where}: {err}")
            continue
        if conversation is not None:
            turns.setdefault(conversation, []).append((turn, line, (video_path, start, end)))
        extra = {k: v for k, v in record.items() if k not in KNOWN_COLUMNS}
        questions.append(Question(qid, video_path, question, answer, start, end,
                                  _text(record.get("category")), options, extra=extra,
                                  conversation=conversation, turn=turn))
    problems += [f"{path}: {problem}" for problem in conversation_problems(turns)]
    if not records:
        problems.append(f"{path}: no rows")
    if problems:
        raise ManifestError(f"manifest {path} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return questions


def choice_options(options: object, answer: str | None) -> tuple[tuple[str, ...] | None, str | None]:
    """Check a multiple-choice question's options (a list of 2 to 10 non-empty texts) and turn its answer
    into their letter: `answer` may be the letter or the correct option's text. No options: unchanged."""
    if options is None:
        return None, answer
    if not isinstance(options, list | tuple) or not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"options must be a list of 2 to {len(LETTERS)} texts, got {options!r}")
    texts = tuple(str(o).strip() for o in options)
    if not all(texts):
        raise ValueError(f"options must not be empty, got {list(options)!r}")
    if answer is None:
        return texts, None
    letters = LETTERS[: len(texts)]
    if answer.upper() in letters and len(answer) == 1:
        return texts, answer.upper()
    if answer in texts:
        return texts, letters[texts.index(answer)]
    raise ValueError(f"answer {answer!r} is neither one of the letters {', '.join(letters)} nor an option's "
                     "text")


def _conversation(conversation: object, turn: object) -> tuple[str | None, int | None]:
    """A row's (conversation id, turn): both or neither; the turn a whole number >= 1."""
    name = _text(conversation)
    if turn is None or turn == "":
        if name is not None:
            raise ValueError(f"conversation {name!r} needs a turn (1, 2, ...)")
        return None, None
    try:
        number = float(turn)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(turn, bool) or not math.isfinite(number) or number != int(number) or number < 1:
        raise ValueError(f"turn={turn!r} must be a whole number >= 1")
    if name is None:
        raise ValueError(f"turn={turn!r} needs a conversation id")
    return name, int(number)


def conversation_problems(turns: dict[str, list[tuple[int, int, tuple]]]) -> list[str]:
    """Each conversation's turns must be 1..n without gaps or repeats, all about one clip (video, start,
    end). `turns`: conversation -> [(turn, line, clip)]."""
    problems = []
    for name, rows in turns.items():
        numbers = sorted(turn for turn, _, _ in rows)
        lines = ", ".join(str(line) for _, line, _ in sorted(rows))
        repeated = sorted({n for n in numbers if numbers.count(n) > 1})
        if repeated:
            problems.append(f"conversation {name!r} has turn {repeated[0]} more than once (lines {lines})")
        elif numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"conversation {name!r} has turns {numbers}: they must be 1..{len(numbers)} "
                            f"without gaps (lines {lines})")
        clips = {clip for _, _, clip in rows}
        if len(clips) > 1:
            shown = "; ".join(f"{video} [{start}, {end}]" for video, start, end in sorted(clips, key=str))
            problems.append(f"conversation {name!r} is about more than one clip ({shown}; lines {lines}): a "
                            "conversation has one video")
    return problems


def group_by_video(questions: list[Question]) -> list[VideoItem]:
    """One item per distinct (video, start, end), in first-seen order, so each clip is decoded and
    encoded once however many questions it has."""
    items: dict[tuple, VideoItem] = {}
    for q in questions:
        key = (q.video, q.start, q.end)
        if key not in items:
            items[key] = VideoItem(q.video, q.start, q.end)
        items[key].questions.append(q)
    return list(items.values())


def resolve_video(video: str, root: str) -> str:
    """A row's video as the workers open it: a URL as it is (`file://` as its local path), an absolute path
    as it is, a relative path under `root` (an absolute folder or a URL). ValueError: unsupported scheme."""
    if is_url(video):
        return local_path(video)
    video = os.path.expanduser(video)
    return video if os.path.isabs(video) else join(root, video)


def _root(root: str) -> str:
    """The video root as an absolute folder, or a URL."""
    if is_remote(root):
        return root
    return str(Path(local_path(root)).expanduser().absolute())


def _manifest_text(path: str | Path) -> tuple[str, str | Path]:
    """The manifest's text and where it is (a Path, or the URL of a remote manifest)."""
    name = os.fspath(path)
    try:
        remote = is_remote(name)
    except ValueError as err:
        raise ManifestError(f"manifest {err}") from None
    if remote:
        try:
            return read_bytes(name).decode("utf-8"), name
        except RemoteError as err:
            raise ManifestError(f"manifest {err}") from None
    path = Path(local_path(name))
    if not path.is_file():
        raise ManifestError(f"manifest {path}: no such file")
    return path.read_text(encoding="utf-8"), path


def _read_records(text: str, is_csv: bool) -> list[tuple[int, dict | str]]:
    """(line number, record or a description of why the line is malformed). A CSV's empty cell is None, as
    JSON's null: a column of the user's own passes through to the output as null, not dropped."""
    if is_csv:
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None:
            return []
        out: list[tuple[int, dict | str]] = []
        for record in reader:
            if None in record:
                out.append((reader.line_num, f"{len(record[None])} more field(s) than the header"))
            else:
                out.append((reader.line_num, {k: None if v == "" else v for k, v in record.items()}))
        return out
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            out.append((number, f"not valid JSON ({err.msg})"))
            continue
        out.append((number, record if isinstance(record, dict) else "a JSON object is expected"))
    return out


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _seconds(value: object, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return seconds
