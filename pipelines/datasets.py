"""Where a job's questions come from: our manifest, or a published video-QA benchmark's files as they ship.

`read_questions(data)` turns any of them into the same `Question`s (`pipelines.manifest`): the set's own
question id, the video's path (a video that cannot be found is that question's `error`, not a crash), the
question, its answer (for multiple choice the correct option's letter), its `category` and, for
multiple choice, its `options`. Every problem of an annotation file (a missing file or field, a question
without an answer, a duplicate id) is reported at once, naming the file and the field, before any video
is decoded.

Per set (`data.format`; the readers are `READERS[format]`, each `reader(data) -> list[Question]`):

- `videollava`: Video-LLaVA's (Video-ChatGPT's) zero-shot QA files for MSVD-, MSRVTT-, TGIF- and
  ActivityNet-QA: `data.questions` (test_q.json: `video_name`, `question`, `question_id`) and
  `data.answers` (test_a.json: `question_id`, `answer`, and in ActivityNet-QA `type`, the category, kept
  as shipped: 0 motion, 1 spatial and 2 temporal relationship, then by answer 3 yes/no, 4 color, 5 object,
  6 location, 7 number, 8 other). Answers are matched by `question_id` (Video-LLaVA's own script pairs
  them by position). Open-ended: the question is asked as it is. Videos: `<video_name>` or ActivityNet's
  `v_<video_name>`, any video extension (TGIF-QA's GIFs too).
- `videomme`: Video-MME (lmms-lab/Video-MME's Parquet, or the same records as JSON/JSONL, flat or nested
  one record per video with its `questions`): `videoID`, `question_id`, `question`, `options` ("A. ..."
  texts, the prefix dropped), `answer` (a letter), `task_type` (the category); `duration`, `domain` and
  `sub_category` are passed on to the output rows. Video `{videoID}.*`.
- `mvbench`: MVBench's task files (`json/<task>.json`, or their folder: every task): `video`, `question`,
  `candidates`, `answer` (the correct candidate's text), `start`/`end` (seconds, some tasks). Category:
  the record's `task_type` if any, else the task file's name. MVBench has no ids: id `<file stem>-<index>`.
- `nextqa`: NExT-QA multiple choice (the release's val.csv/test.csv, lmms-lab/NExTQA's MC Parquet):
  `video`, `qid`, `question`, `a0`..`a4`, `answer` (the option's index), `type` (the category). Id
  `<video>_<qid>`, as NExT-QA names its questions.
- `egoschema`: lmms-lab/egoschema's Parquet (`question_idx` the id, `video_idx`, `question`, `option`:
  five "A. ..." texts, `answer`: the index, None in the full set), or the release's questions.json
  (`q_uid`: id and video, `option 0`..`option 4`) with its answers from `answer` or from `data.answers`
  (subset_answers.json: {q_uid: index}). No category.

Annotation files are read by extension: `.json` (a list of records), `.jsonl`, `.parquet`, `.csv`.
Videos are looked up under `data.video_root` (default: the folder of the file read; for an MVBench folder
of task files, the folder above it), indexed once: a set's video name matches a file of that name with or
without a video extension (`VIDEO_EXTENSIONS`, any case), in any subfolder; a name with a folder part
must match that folder. No match, or several (`a.mp4` and `a.gif`, or `a.mp4` in two subfolders), is
the question's `error`, naming the candidates: point `data.video_root` at the right folder.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from pipelines.manifest import ManifestError, Question, choice_options, read_manifest
from stages.answer import LETTERS

FORMATS = ("manifest", "videollava", "videomme", "mvbench", "nextqa", "egoschema")


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
    if data.format == "manifest":
        return read_manifest(data.manifest, data.video_root, require_question=require_question)
    return READERS[data.format](data)


VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".gif", ".mov")
VIDEOMME_EXTRA = ("duration", "domain", "sub_category")  # Video-MME's columns kept in the output rows


@dataclass
class _Table:
    """An annotation file's records, each with where it is (`item 3`, `line 4`, `row 2`)."""

    path: Path
    rows: list[tuple[str, dict]]
    columns: frozenset[str] | None  # the Parquet schema or CSV header; None for JSON (per record)


@dataclass
class _Entry:
    """One question as a set describes it, before its video is looked up."""

    where: str  # file and record, for messages
    id: str | None
    video: str | None
    question: str | None
    answer: str | None = None
    options: tuple[str, ...] | list | None = None
    category: str | None = None
    start: float | None = None
    end: float | None = None
    error: str | None = None  # a per-question problem found while reading (e.g. MVBench's bad window)
    extra: dict = field(default_factory=dict)  # columns passed on to the output rows (Video-MME's duration)


class VideoIndex:
    """Every video file under `root` (subfolders and links followed), listed once, found by name."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.by_stem: dict[str, list[str]] = {}  # stem -> relative posix paths
        self.folders: dict[str, list[str]] = {}  # folder name -> relative paths (MVBench's frame folders)
        seen: set[str] = set()
        for folder, dirnames, filenames in os.walk(self.root, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a link back up the tree
                dirnames.clear()
                continue
            seen.add(real)
            rel = Path(folder).relative_to(self.root)
            for name in dirnames:
                self.folders.setdefault(name, []).append((rel / name).as_posix())
            for name in filenames:
                stem, ext = os.path.splitext(name)
                if ext.lower() in VIDEO_EXTENSIONS:
                    self.by_stem.setdefault(stem, []).append((rel / name).as_posix())

    def find(self, name: str, prefixes: tuple[str, ...] = ("",)) -> tuple[str, str | None]:
        """(absolute path, None) for the one file `name` names, or (a best guess, why not): a file named
        `name`, or `name` + a video extension, or with one of `prefixes` (ActivityNet's `v_`) before it."""
        name = name.strip().replace("\\", "/")
        path = PurePosixPath(name)
        if path.is_absolute():
            found = os.path.isfile(name)
            return name, None if found else f"video {name}: no such file"
        ext = path.suffix if path.suffix.lower() in VIDEO_EXTENSIONS else ""
        stem = path.name[: len(path.name) - len(ext)]
        folder = "" if str(path.parent) == "." else path.parent.as_posix()
        matches = [rel for prefix in prefixes for rel in self.by_stem.get(prefix + stem, [])]
        if folder:
            matches = [rel for rel in matches if f"/{PurePosixPath(rel).parent}".endswith(f"/{folder}")]
        if ext:
            exact = [rel for rel in matches if PurePosixPath(rel).suffix.lower() == ext.lower()]
            matches = exact or matches
        if len(matches) == 1:
            return str(self.root / matches[0]), None
        guess = str(self.root / name)
        if matches:
            listed = ", ".join(sorted(matches)[:5]) + (", ..." if len(matches) > 5 else "")
            return guess, (f"video {name!r} is ambiguous: {len(matches)} files under {self.root} match "
                           f"({listed}); set data.video_root to the folder that holds the right one")
        if path.name in self.folders:
            return guess, (f"video {name!r} is a folder under {self.root} ({self.folders[path.name][0]}), "
                           "not a video file: frame folders are not read")
        tried = " or ".join(f"{prefix}{stem}" for prefix in prefixes)
        return guess, (f"video {name!r} not found under {self.root} (no file {tried} with "
                        f"{ext or 'any video extension'})")


def read_videollava(data: DataConfig) -> list[Question]:
    """Video-LLaVA's zero-shot QA files (MSVD, MSRVTT, TGIF, ActivityNet): see the module doc."""
    qpath, apath = _path(data.questions), _path(data.answers)
    label = f"videollava questions {qpath} and answers {apath}"
    problems: list[str] = []
    questions, answers = _load_table(qpath, problems), _load_table(apath, problems)
    if questions is None or answers is None:
        _raise(label, problems)
    q_absent = _absent(questions, ("question_id", "video_name", "question"), problems)
    a_absent = _absent(answers, ("question_id", "answer"), problems)
    by_id: dict[str, tuple[str, dict]] = {}
    for where, record in answers.rows:
        qid = _str(record.get("question_id"))
        if qid is None:
            _missing(problems, answers, where, "question_id", a_absent)
        elif qid in by_id:
            problems.append(f"{apath} {where}: duplicate question_id {qid!r} (first at {by_id[qid][0]})")
        else:
            by_id[qid] = (where, record)
    matching = not {"question_id"} & (q_absent | a_absent)
    entries, seen = [], set()
    for where, record in questions.rows:
        qid = _str(record.get("question_id"))
        entry = _Entry(f"{qpath} {where}", qid, _str(record.get("video_name")), _str(record.get("question")))
        _require(problems, questions, where, entry, ("video_name", "question"), q_absent, "question_id")
        if qid is not None and qid not in seen and matching:
            found = by_id.pop(qid, None)
            if found is None:
                problems.append(f"{qpath} {where}: question_id {qid!r} has no answer in {apath}")
            else:
                answer_where, answer = found
                entry.answer, entry.category = _str(answer.get("answer")), _str(answer.get("type"))
                if entry.answer is None and "answer" not in a_absent:
                    problems.append(f"{apath} {answer_where}: question_id {qid!r}: missing answer")
        seen.add(qid)
        entries.append(entry)
    if matching:
        problems += [f"{apath} {where}: question_id {qid!r} has no question in {qpath}"
                     for qid, (where, _) in by_id.items()]
    return _questions(label, entries, problems, _root(data, qpath.parent), prefixes=("", "v_"))


def read_videomme(data: DataConfig) -> list[Question]:
    """Video-MME's annotation (see the module doc).

    The category is `task_type` (12 kinds: temporal perception, counting, OCR, ...), not `duration`
    (short, medium, long): `category` is the question's type in every set here (ActivityNet-QA's type,
    NExT-QA's type, MVBench's task), and the duration is the video's, not the question's. The duration
    (with `domain` and `sub_category`) is passed on to the output rows as a column of its own, for
    scores by duration.
    """
    path = _path(data.annotations)
    label = f"videomme annotations {path}"
    problems: list[str] = []
    table = _load_table(path, problems)
    if table is None:
        _raise(label, problems)
    if table.columns is None and any(isinstance(r.get("questions"), list) for _, r in table.rows):
        # the release's nested JSON: one record per video, its questions in `questions`
        rows = [(f"{where} question {n}", {**{k: v for k, v in video.items() if k != "questions"}, **q})
                for where, video in table.rows for n, q in enumerate(video.get("questions") or [])]
        table = _Table(path, rows, None)
    absent = _absent(table, ("question_id", "videoID", "question", "options", "answer"), problems)
    entries = []
    for where, record in table.rows:
        entry = _Entry(f"{path} {where}", _str(record.get("question_id")), _str(record.get("videoID")),
                       _str(record.get("question")), _str(record.get("answer")),
                       _strip_letters(record.get("options")), _str(record.get("task_type")))
        _require(problems, table, where, entry, ("videoID", "question", "options", "answer"), absent,
                 "question_id")
        entry.extra = {key: record[key] for key in VIDEOMME_EXTRA if _str(record.get(key)) is not None}
        entries.append(entry)
    return _questions(label, entries, problems, _root(data, path.parent))


def read_mvbench(data: DataConfig) -> list[Question]:
    """MVBench's task files (see the module doc). `start`/`end` (seconds) set the clip's window; a window
    that is not a pair of numbers with end > start is that question's error. lmms-eval's copy of the
    videos has the windowed tasks already cut (folders named `*_segment`): for a video found in such a
    folder the window is not applied again."""
    path = _path(data.annotations)
    label = f"mvbench annotations {path}"
    problems: list[str] = []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl", ".parquet"))
        if not files:
            problems.append(f"{path}: no .json, .jsonl or .parquet task file in the folder")
        default_root = path.parent
    else:
        files, default_root = [path], path.parent
    entries = []
    for file in files:
        table = _load_table(file, problems)
        if table is None:
            continue
        absent = _absent(table, ("video", "question", "candidates", "answer"), problems)
        # HF's Parquet shards (action_antonym/train-00000-of-00001.parquet) are named by their folder
        stem = file.parent.name if file.stem.startswith(("train-", "test-")) else file.stem
        for index, (where, record) in enumerate(table.rows):
            entry = _Entry(f"{file} {where}", f"{stem}-{index}", _str(record.get("video")),
                           _str(record.get("question")), _str(record.get("answer")),
                           record.get("candidates"), _str(record.get("task_type")) or stem)
            _require(problems, table, where, entry, ("video", "question", "candidates", "answer"), absent)
            if record.get("start") is not None or record.get("end") is not None:
                entry.start, entry.end, entry.error = _window(record.get("start"), record.get("end"))
            entries.append(entry)
    questions = _questions(label, entries, problems, _root(data, default_root))
    return [replace(q, start=None, end=None) if q.start is not None and _precut(q.video) else q
            for q in questions]


def read_nextqa(data: DataConfig) -> list[Question]:
    """NExT-QA's multiple-choice questions (see the module doc)."""
    path = _path(data.annotations)
    label = f"nextqa annotations {path}"
    problems: list[str] = []
    table = _load_table(path, problems)
    if table is None:
        _raise(label, problems)
    options = tuple(f"a{i}" for i in range(5))
    absent = _absent(table, ("video", "qid", "question", "answer", *options), problems)
    entries = []
    for where, record in table.rows:
        video, qid = _str(record.get("video")), _str(record.get("qid"))
        entry = _Entry(f"{path} {where}", None if video is None or qid is None else f"{video}_{qid}", video,
                       _str(record.get("question")), None,
                       _option_fields(problems, table, where, record, options, absent),
                       _str(record.get("type")))
        entry.answer = _letter(record.get("answer"), 5, problems, entry.where, "answer")
        _require(problems, table, where, entry, ("video", "question"), absent)
        for key, value in (("qid", qid), ("answer", _str(record.get("answer")))):
            if value is None:
                _missing(problems, table, where, key, absent)
        entries.append(entry)
    return _questions(label, entries, problems, _root(data, path.parent))


def read_egoschema(data: DataConfig) -> list[Question]:
    """EgoSchema (see the module doc): lmms-lab's records or the release's questions.json."""
    path = _path(data.annotations)
    label = f"egoschema annotations {path}"
    problems: list[str] = []
    table = _load_table(path, problems)
    if table is None:
        _raise(label, problems)
    columns = table.columns if table.columns is not None else {k for _, r in table.rows for k in r}
    release = "q_uid" in columns  # the release's questions.json
    options = tuple(f"option {i}" for i in range(5)) if release else ("option",)
    id_field, video_field = ("q_uid", "q_uid") if release else ("question_idx", "video_idx")
    absent = _absent(table, tuple(dict.fromkeys((id_field, video_field, "question", *options))), problems)
    answers = _egoschema_answers(data.answers, problems) if data.answers else {}
    entries = []
    for where, record in table.rows:
        qid = _str(record.get(id_field))
        texts = (_option_fields(problems, table, where, record, options, absent) if release
                 else record.get("option"))
        entry = _Entry(f"{path} {where}", qid, _str(record.get(video_field)), _str(record.get("question")),
                       None, _strip_letters(texts))
        fields = ("question",) if release else (video_field, "question", "option")
        _require(problems, table, where, entry, fields, absent, id_field)
        answer = record.get("answer")
        entry.answer = _letter(answer if _str(answer) is not None else answers.get(qid or ""), 5, problems,
                               entry.where, "answer")
        entries.append(entry)
    return _questions(label, entries, problems, _root(data, path.parent))


READERS: dict[str, Callable[[DataConfig], list[Question]]] = {
    "videollava": read_videollava,
    "videomme": read_videomme,
    "mvbench": read_mvbench,
    "nextqa": read_nextqa,
    "egoschema": read_egoschema,
}


def _questions(label: str, entries: list[_Entry], problems: list[str], root: Path,
               prefixes: tuple[str, ...] = ("",)) -> list[Question]:
    """Check ids and options (every problem at once, else ManifestError), then find the videos (indexing
    `root` once) and make the `Question`s."""
    first: dict[str, str] = {}
    for entry in entries:
        if entry.id is None:
            continue
        if entry.id in first:
            problems.append(f"{entry.where}: duplicate id {entry.id!r} (first at {first[entry.id]})")
        else:
            first[entry.id] = entry.where
        options = entry.options
        if isinstance(options, list | tuple):  # a null option is an empty one, not the text "None"
            options = ["" if option is None else option for option in options]
        try:
            entry.options, entry.answer = choice_options(options, entry.answer)
        except ValueError as err:
            problems.append(f"{entry.where} (id {entry.id!r}): {err}")
    if not entries and not problems:
        problems.append("no questions")
    if not root.is_dir():
        problems.append(f"data.video_root {root}: no such folder")
    _raise(label, problems)
    index = VideoIndex(root)
    questions = []
    for entry in entries:
        assert entry.id is not None and entry.video is not None  # else a problem was raised
        video, error = index.find(entry.video, prefixes)
        questions.append(Question(entry.id, video, entry.question, entry.answer, entry.start, entry.end,
                                  entry.category, entry.options, entry.error or error, extra=entry.extra))
    return questions


def _load_table(path: Path, problems: list[str]) -> _Table | None:
    """The file's records by its extension (.json: a list of objects; .jsonl; .parquet; .csv), or None
    with the reason in `problems`."""
    if not path.is_file():
        problems.append(f"{path}: no such file")
        return None
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            rows = [(f"row {i}", record) for i, record in enumerate(table.to_pylist())]
            return _Table(path, rows, frozenset(table.column_names))
        text = path.read_text(encoding="utf-8")
        if suffix == ".csv":
            reader = csv.DictReader(text.splitlines())
            rows = [(f"line {reader.line_num}", {k: v for k, v in record.items() if v != ""})
                    for record in reader]
            return _Table(path, rows, frozenset(reader.fieldnames or ()))
        if suffix == ".jsonl":
            rows, bad = [], []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    record = json.loads(line)
                    (rows if isinstance(record, dict) else bad).append((f"line {number}", record))
        else:
            document = json.loads(text)
            if not isinstance(document, list):
                problems.append(f"{path}: a JSON list of records is expected, got {type(document).__name__}")
                return None
            rows = [(f"item {i}", r) for i, r in enumerate(document) if isinstance(r, dict)]
            bad = [(f"item {i}", r) for i, r in enumerate(document) if not isinstance(r, dict)]
        problems += [f"{path} {where}: a JSON object is expected" for where, _ in bad]
        return _Table(path, rows, None)
    except (OSError, ValueError, UnicodeDecodeError) as err:  # pyarrow's ArrowInvalid is a ValueError
        problems.append(f"{path}: cannot be read ({type(err).__name__}: {err})")
        return None


def _absent(table: _Table, fields: tuple[str, ...], problems: list[str]) -> set[str]:
    """The required fields the whole file lacks (a column not in the schema or header, a field no record
    has), each one problem; an empty file is one too."""
    if not table.rows:
        problems.append(f"{table.path}: no records")
        return set(fields)
    if table.columns is not None:
        absent = [f for f in fields if f not in table.columns]
        have = ", ".join(sorted(table.columns))
        problems += [f"{table.path}: no column {f!r} (columns: {have})" for f in absent]
    else:
        absent = [f for f in fields if not any(f in record for _, record in table.rows)]
        problems += [f"{table.path}: no record has the field {f!r}" for f in absent]
    return set(absent)


def _require(problems: list[str], table: _Table, where: str, entry: _Entry, fields: tuple[str, ...],
             absent: set[str], id_field: str | None = None) -> None:
    """A problem per required field this record lacks (fields the whole file lacks are reported once)."""
    values = {"question": entry.question, "options": entry.options, "candidates": entry.options,
              "answer": entry.answer, "video": entry.video, "videoID": entry.video, "video_name": entry.video,
              "video_idx": entry.video, "option": entry.options}
    if id_field is not None and entry.id is None:
        _missing(problems, table, where, id_field, absent)
    for field_name in fields:
        if field_name in values and values[field_name] is None:
            _missing(problems, table, where, field_name, absent)


def _option_fields(problems: list[str], table: _Table, where: str, record: dict, keys: tuple[str, ...],
                   absent: set[str]) -> list | None:
    """Options shipped one per field (NExT-QA's a0..a4, EgoSchema's `option 0`..): their texts, or None
    when one is missing (reported by name; a field the whole file lacks was reported once)."""
    texts = [_str(record.get(key)) for key in keys]
    for key, text in zip(keys, texts, strict=True):
        if text is None:
            _missing(problems, table, where, key, absent)
    return None if None in texts else texts


def _missing(problems: list[str], table: _Table, where: str, field_name: str, absent: set[str]) -> None:
    if field_name not in absent:
        problems.append(f"{table.path} {where}: missing {field_name}")


def _raise(label: str, problems: list[str]) -> None:
    if problems:
        raise ManifestError(f"{label} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))


def _path(value: str | None) -> Path:
    return Path(value or "").expanduser()


def _root(data: DataConfig, default: Path) -> Path:
    return Path(data.video_root if data.video_root else default).expanduser().absolute()


def _str(value: object) -> str | None:
    """A record's value as text: None for missing, empty or NaN; integral floats without `.0` (a Parquet
    column with nulls turns ids into floats)."""
    if value is None or isinstance(value, list | tuple | dict):
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            value = int(value)
    text = str(value).strip()
    return text or None


def _strip_letters(options: object) -> object:
    """["A. x", "B. y"] -> ["x", "y"] when every option starts with its own letter (then "." or ")"),
    as Video-MME and EgoSchema ship them; anything else unchanged (checked later)."""
    if not isinstance(options, list | tuple) or not options or len(options) > len(LETTERS):
        return options
    stripped = []
    for letter, option in zip(LETTERS, options, strict=False):
        match = re.match(rf"\s*\(?{letter}[.):]\s*", option) if isinstance(option, str) else None
        if match is None:
            return list(options)
        stripped.append(option[match.end() :])
    return stripped


def _letter(value: object, count: int, problems: list[str], where: str, name: str) -> str | None:
    """An answer given as an option index (0-based: NExT-QA, EgoSchema) or letter -> the letter."""
    text = _str(value)
    if text is None:
        return None
    if text.isdigit() and int(text) < count:
        return LETTERS[int(text)]
    if len(text) == 1 and text.upper() in LETTERS[:count]:
        return text.upper()
    problems.append(f"{where}: {name}={value!r} is neither an option index 0-{count - 1} nor a letter")
    return None


def _window(start: object, end: object) -> tuple[float | None, float | None, str | None]:
    """MVBench's clip window in seconds, or why it cannot be used (the question's error)."""
    try:
        begin, stop = float(start), float(end)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, None, f"window start={start!r}, end={end!r} is not a pair of numbers of seconds"
    if not (math.isfinite(begin) and math.isfinite(stop)) or begin < 0 or stop <= begin:
        return None, None, f"window start={start!r}, end={end!r} is not 0 <= start < end"
    return begin, stop, None


def _precut(video: str) -> bool:
    """lmms-eval's MVBench videos: the windowed tasks' clips already cut, in `*_segment` folders."""
    return Path(video).parent.name.endswith("_segment")


def _egoschema_answers(path: str, problems: list[str]) -> dict[str, object]:
    """The release's subset_answers.json: {q_uid: index}."""
    file = _path(path)
    try:
        answers = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        problems.append(f"{file}: cannot be read ({type(err).__name__}: {err})")
        return {}
    if not isinstance(answers, dict):
        problems.append(f"{file}: a JSON object {{q_uid: answer index}} is expected")
        return {}
    return {str(k): v for k, v in answers.items()}
