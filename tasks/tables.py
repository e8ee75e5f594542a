"""Reading a published set's annotation files: the records of a JSON, JSONL, Parquet or CSV file, every
problem gathered and named (file, record, field) before any video is decoded, and the videos found by name.

Each set's reader (`tasks.<set>.read`) turns its records into `Entry`s and hands them to
`make_questions`, which checks ids and options, then looks the videos up under the video root
(`VideoIndex`, indexed once): a set's video name matches a file of that name with or without a video
extension (`VIDEO_EXTENSIONS`, any case), in any subfolder; a name with a folder part must match that
folder. No match, or several, is the question's `error`, naming the candidates.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from pipelines.manifest import ManifestError, Question, choice_options
from stages.remote import is_remote, local_path
from tasks.choice import LETTERS

if TYPE_CHECKING:
    from pipelines.datasets import DataConfig

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".gif", ".mov")


@dataclass
class Table:
    """An annotation file's records, each with where it is (`item 3`, `line 4`, `row 2`), numbered from 1
    as the lines of a manifest are (a CSV's header is its line 1)."""

    path: Path
    rows: list[tuple[str, dict]]
    columns: frozenset[str] | None  # the Parquet schema or CSV header; None for JSON (per record)


@dataclass
class Entry:
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

def make_questions(label: str, entries: list[Entry], problems: list[str], root: Path,
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
    raise_problems(label, problems)
    index = VideoIndex(root)
    questions = []
    for entry in entries:
        assert entry.id is not None and entry.video is not None  # else a problem was raised
        video, error = index.find(entry.video, prefixes)
        questions.append(Question(entry.id, video, entry.question, entry.answer, entry.start, entry.end,
                                  entry.category, entry.options, entry.error or error, extra=entry.extra))
    return questions


def load_table(path: Path, problems: list[str]) -> Table | None:
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
            rows = [(f"row {i}", record) for i, record in enumerate(table.to_pylist(), start=1)]
            return Table(path, rows, frozenset(table.column_names))
        text = path.read_text(encoding="utf-8")
        if suffix == ".csv":
            reader = csv.DictReader(text.splitlines())
            rows = [(f"line {reader.line_num}", {k: v for k, v in record.items() if v != ""})
                    for record in reader]
            return Table(path, rows, frozenset(reader.fieldnames or ()))
        if suffix == ".jsonl":
            rows, bad = [], []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    record = json.loads(line)
                    (rows if isinstance(record, dict) else bad).append((f"line {number}", record))
        else:
            document = loads_lenient(text)
            if not isinstance(document, list):
                problems.append(f"{path}: a JSON list of records is expected, got {type(document).__name__}")
                return None
            rows = [(f"item {i}", r) for i, r in enumerate(document, start=1) if isinstance(r, dict)]
            bad = [(f"item {i}", r) for i, r in enumerate(document, start=1) if not isinstance(r, dict)]
        problems += [f"{path} {where}: a JSON object is expected" for where, _ in bad]
        return Table(path, rows, None)
    except (OSError, ValueError, UnicodeDecodeError) as err:  # pyarrow's ArrowInvalid is a ValueError
        problems.append(f"{path}: cannot be read ({type(err).__name__}: {err})")
        return None


_TRAILING_COMMA = re.compile(r'("(?:\\.|[^"\\])*")|,(\s*[}\]])')


def loads_lenient(text: str) -> object:
    """JSON, also with a comma before a closing brace or bracket (Video-MME's official
    `output_test_template.json` has one after each question's last field): strict JSON first, then with
    those commas dropped (never inside strings)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        relaxed = _TRAILING_COMMA.sub(lambda m: m.group(1) or m.group(2), text)
        if relaxed == text:
            raise
        return json.loads(relaxed)


def absent_fields(table: Table, fields: tuple[str, ...], problems: list[str]) -> set[str]:
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


def require(problems: list[str], table: Table, where: str, entry: Entry, fields: tuple[str, ...],
             absent: set[str], id_field: str | None = None) -> None:
    """A problem per required field this record lacks (fields the whole file lacks are reported once)."""
    values = {"question": entry.question, "options": entry.options, "candidates": entry.options,
              "answer": entry.answer, "video": entry.video, "videoID": entry.video, "video_name": entry.video,
              "video_idx": entry.video, "option": entry.options}
    if id_field is not None and entry.id is None:
        missing(problems, table, where, id_field, absent)
    for field_name in fields:
        if field_name in values and values[field_name] is None:
            missing(problems, table, where, field_name, absent)


def option_fields(problems: list[str], table: Table, where: str, record: dict, keys: tuple[str, ...],
                   absent: set[str]) -> list | None:
    """Options shipped one per field (NExT-QA's a0..a4, EgoSchema's `option 0`..): their texts, or None
    when one is missing (reported by name; a field the whole file lacks was reported once)."""
    texts = [field_text(record.get(key)) for key in keys]
    for key, text in zip(keys, texts, strict=True):
        if text is None:
            missing(problems, table, where, key, absent)
    return None if None in texts else texts


def missing(problems: list[str], table: Table, where: str, field_name: str, absent: set[str]) -> None:
    if field_name not in absent:
        problems.append(f"{table.path} {where}: missing {field_name}")


def required_table(path: Path, label: str, problems: list[str]) -> Table:
    """`load_table`, or a `ManifestError` naming `label` with `problems` when the file cannot be read."""
    table = load_table(path, problems)
    if table is None:
        raise_problems(label, problems)
    return table


def raise_problems(label: str, problems: list[str]) -> None:
    if problems:
        raise ManifestError(f"{label} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))


def as_path(value: str | None) -> Path:
    return Path(value or "").expanduser()


def video_root(data: DataConfig, default: Path) -> Path:
    """The local folder the set's videos are looked up in (`VideoIndex` lists it); a URL root is refused:
    only our manifest takes URL videos."""
    if data.video_root and is_remote(data.video_root):
        raise ManifestError(f"data.video_root={data.video_root}: a published set's videos are found by "
                            "listing a local folder; copy them to one, or list their URLs in a manifest "
                            "(data.format=manifest)")
    return Path(local_path(data.video_root) if data.video_root else default).expanduser().absolute()


def field_text(value: object) -> str | None:
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


def strip_letters(options: object) -> object:
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


def option_letter(value: object, count: int, problems: list[str], where: str, name: str) -> str | None:
    """An answer given as an option index (0-based: NExT-QA, EgoSchema) or letter -> the letter."""
    text = field_text(value)
    if text is None:
        return None
    if text.isdigit() and int(text) < count:
        return LETTERS[int(text)]
    if len(text) == 1 and text.upper() in LETTERS[:count]:
        return text.upper()
    problems.append(f"{where}: {name}={value!r} is neither an option index 0-{count - 1} nor a letter")
    return None


