"""The synthetic clips written as the published video-QA sets ship them, each with a twin manifest.

`pipelines.datasets` reads Video-LLaVA's, Video-MME's, MVBench's, NExT-QA's and EgoSchema's files as they
ship. To test a reader without the real sets, `write_published(folder, seed, clips)` writes the clips of
`synthqa.dataset.write_dataset` (5 questions each, one per type) in each set's layout and naming, and
beside each the same questions as a plain JSONL manifest, its twin: a job on the set and a job on the twin
must ask the same questions about the same files, so give the same predictions per id.

- `videollava` (open-ended): `test_q.json` + `test_a.json` (answers in reverse order: they are matched by
  `question_id`). Clip 0 is a GIF named like TGIF-QA's (`tumblr_*.gif`, no `type`); the others are
  ActivityNet-QA style: video `v_<name>.mp4` for the `video_name` `<name>`, and a `type` on their answers
  (the question type's index, an int as ActivityNet-QA's). `data.video_root` is left to its default, the
  questions' folder: the videos are found in its `videos/` subfolder.
- `videomme`: lmms-lab/Video-MME's layout, `videomme/test-00000-of-00001.parquet` and `data/<videoID>.mp4`;
  four options "A. ..." (the answer and three distractors), `answer` a letter, `task_type` the question
  type; its twin carries `video_id`, `duration`, `domain` and `sub_category` as extra columns, as the
  reader passes them on.
- `mvbench`: `json/<type>.json`, one task file per question type, and `video/synth/clip_*.mp4`; the
  candidates are every value of the answer's kind (2 to 4), `answer` the correct one's text; the
  `direction` task carries a `start`/`end` window (the whole clip), as MVBench's windowed tasks do.
- `nextqa`: the release's CSV (`val.csv`: video, frame_count, width, height, question, answer, qid, type,
  a0..a4; `answer` the option's index) and `NExTVideo/<folder>/<video>.mp4`.
- `egoschema`: lmms-lab/egoschema's `Subset/test-00000-of-00001.parquet` (`question_idx`, `question`,
  `video_idx`, `option`: five "A. ..." texts, `answer`: the index as text) and `videos/<video_idx>.mp4`.

Multiple-choice options are the answer and distractors of the same kind (other colours, shapes, counts,
directions, halves), then, where a set has more options than the kind has values, of other kinds, in a
seeded order. A twin manifest lists the option texts in `options` and the correct letter in `answer`.
Twins sit in `folder` (`<format>.jsonl`), their video paths relative to it, so they can be concatenated
(ids never collide across formats).

    python -m synthqa.formats .cache/synth/published --seed 7 --clips 3   # prints each set's overrides
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from pipelines.files import write_json, write_jsonl, write_text
from stages.answer import LETTERS
from synthqa.clips import COLORS, COUNTS, DIRECTIONS, QUESTION_TYPES, SHAPES, SynthQuestion, synth_sample
from synthqa.dataset import mux_frames, write_dataset

FORMATS = ("videollava", "videomme", "mvbench", "nextqa", "egoschema")
# the values a question type's answer takes: its distractors
KINDS = {"color": tuple(COLORS), "shape": SHAPES, "count": COUNTS, "direction": tuple(DIRECTIONS),
         "half": ("top", "bottom")}


@dataclass
class PublishedSet:
    """One set written in a published layout, and how to run the job on it."""

    format: str
    overrides: list[str]  # the job's data.* overrides that read it
    twin: Path  # the same questions as a plain manifest
    ids: list[str] = field(default_factory=list)  # in the set's order


def write_gif(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Frames uint8 [T, H, W, 3] -> an animated GIF (FFmpeg's gif encoder, its fixed 8-bit palette)."""
    path = Path(path)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("gif", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb8"
        mux_frames(out, stream, frames, fps)
    return path


def choices(question: SynthQuestion, count: int | None, rng: np.random.Generator) -> tuple[list[str], int]:
    """(options, index of the answer): the answer and `count - 1` distractors, same kind first (`count`
    None: every value of the kind), in a random order from `rng`."""
    same = [v for v in KINDS[question.type] if v != question.answer]
    other = [v for kind, values in KINDS.items() if kind != question.type for v in values]
    rng.shuffle(same)
    rng.shuffle(other)
    count = len(same) + 1 if count is None else count
    options = [question.answer, *(same + other)[: count - 1]]
    order = rng.permutation(len(options))
    options = [options[i] for i in order]
    return options, options.index(question.answer)


def write_published(folder: str | Path, seed: int, clips: int, formats: tuple[str, ...] = FORMATS
                    ) -> dict[str, PublishedSet]:
    """Write `clips` synthetic clips (`write_dataset(folder / "clips", seed, clips)`) in each of `formats`
    under `folder/<format>/`, and each set's twin manifest `folder/<format>.jsonl`."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats must be among {', '.join(FORMATS)}, got {sorted(unknown)}")
    folder = Path(folder).absolute()
    write_dataset(folder / "clips", seed, clips)
    samples = [synth_sample(seed, index) for index in range(clips)]
    writers = {"videollava": _videollava, "videomme": _videomme, "mvbench": _mvbench, "nextqa": _nextqa,
               "egoschema": _egoschema}
    out = {}
    for number, name in enumerate(FORMATS):
        if name in formats:
            rng = np.random.default_rng([seed, number])
            out[name] = writers[name](folder, seed, samples, rng)
    return out


def _clip(folder: Path, index: int, to: Path) -> str:
    """Copy clip `index`'s mp4 to `to`; its path relative to `folder`, for the twin."""
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "clips" / f"clip_{index:05d}.mp4", to)
    return to.relative_to(folder).as_posix()


def _twin(folder: Path, name: str, rows: list[dict], **data: Path) -> PublishedSet:
    """Write the twin manifest; the set's overrides are `data.format=name` and `data.<key>=<path>`."""
    twin = write_jsonl(folder / f"{name}.jsonl", rows)
    overrides = [f"data.format={name}", *(f"data.{key}={path}" for key, path in data.items())]
    return PublishedSet(name, overrides, twin, [row["id"] for row in rows])


def _mc_row(qid: str, video: str, question: SynthQuestion, options: list[str], answer: int,
            category: str | None) -> dict:
    return {"id": qid, "video": video, "question": question.question, "options": options,
            "answer": LETTERS[answer], **({"category": category} if category is not None else {})}


def _videollava(folder: Path, seed: int, samples: list, rng: np.random.Generator) -> PublishedSet:
    root = folder / "videollava"
    questions, answers, rows = [], [], []
    for index, sample in enumerate(samples):
        if index == 0:  # TGIF-QA: a GIF, no question type
            name = f"tumblr_synth{index:05d}"
            (root / "videos").mkdir(parents=True, exist_ok=True)
            video = write_gif(root / "videos" / f"{name}.gif", sample.clip.frames).relative_to(folder)
        else:  # ActivityNet-QA: the file is v_<video_name>, answers carry a type
            name = f"synth{index:05d}"
            video = _clip(folder, index, root / "videos" / f"v_{name}.mp4")
        for k, q in enumerate(sample.questions):
            qid = f"{'' if index == 0 else 'v_'}{name}_{k}"
            questions.append({"video_name": name, "question": q.question, "question_id": qid})
            answer = {"answer": q.answer, "question_id": qid}
            if index:
                answer["type"] = QUESTION_TYPES.index(q.type)
            answers.append(answer)
            rows.append({"id": qid, "video": str(video), "question": q.question, "answer": q.answer,
                         **({"category": str(answer["type"])} if "type" in answer else {})})
    write_json(root / "test_q.json", questions)
    write_json(root / "test_a.json", answers[::-1])
    return _twin(folder, "videollava", rows, questions=root / "test_q.json", answers=root / "test_a.json")


def _videomme(folder: Path, seed: int, samples: list, rng: np.random.Generator) -> PublishedSet:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = folder / "videomme"
    records, rows = [], []
    for index, sample in enumerate(samples):
        video_id = f"synthYT{seed % 1000:03d}{index:04d}"
        video = _clip(folder, index, root / "data" / f"{video_id}.mp4")
        for k, q in enumerate(sample.questions):
            options, answer = choices(q, 4, rng)
            qid = f"{index + 1:03d}-{k + 1}"
            records.append({"video_id": f"{index + 1:03d}", "duration": "short", "domain": "Synthetic",
                            "sub_category": "Synthetic", "url": "", "videoID": video_id, "question_id": qid,
                            "task_type": q.type, "question": q.question,
                            "options": [f"{LETTERS[i]}. {text}" for i, text in enumerate(options)],
                            "answer": LETTERS[answer]})
            rows.append(_mc_row(qid, video, q, options, answer, q.type)
                        | {"video_id": f"{index + 1:03d}", "duration": "short", "domain": "Synthetic",
                           "sub_category": "Synthetic"})
    annotations = root / "videomme" / "test-00000-of-00001.parquet"
    annotations.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), annotations)
    return _twin(folder, "videomme", rows, annotations=annotations, video_root=root / "data")


def _mvbench(folder: Path, seed: int, samples: list, rng: np.random.Generator) -> PublishedSet:
    root = folder / "mvbench"
    tasks: dict[str, list[dict]] = {qtype: [] for qtype in QUESTION_TYPES}
    twin: dict[str, list[dict]] = {qtype: [] for qtype in QUESTION_TYPES}
    for index, sample in enumerate(samples):
        video = _clip(folder, index, root / "video" / "synth" / f"clip_{index:05d}.mp4")
        for q in sample.questions:
            options, answer = choices(q, None, rng)
            record = {"video": f"clip_{index:05d}.mp4", "question": q.question, "candidates": options,
                      "answer": options[answer]}
            if q.type == "direction":  # a windowed task: the whole clip (8 frames at 8 fps)
                record |= {"start": 0.0, "end": 1.0}
            row = _mc_row(f"{q.type}-{len(tasks[q.type])}", video, q, options, answer, q.type)
            tasks[q.type].append(record)
            twin[q.type].append(row | {k: record[k] for k in ("start", "end") if k in record})
    for qtype, records in tasks.items():
        write_json(root / "json" / f"{qtype}.json", records)
    rows = [row for qtype in sorted(twin) for row in twin[qtype]]  # the reader's order: task files by name
    return _twin(folder, "mvbench", rows, annotations=root / "json", video_root=root / "video")


def _nextqa(folder: Path, seed: int, samples: list, rng: np.random.Generator) -> PublishedSet:
    root = folder / "nextqa"
    columns = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type",
               *(f"a{i}" for i in range(5))]
    records, rows = [], []
    for index, sample in enumerate(samples):
        video_id = 4_000_000_000 + seed % 1000 * 1000 + index
        frames = sample.clip.frames
        video = _clip(folder, index, root / "NExTVideo" / f"{1000 + index % 2}" / f"{video_id}.mp4")
        for qid, q in enumerate(sample.questions):
            options, answer = choices(q, 5, rng)
            records.append({"video": video_id, "frame_count": len(frames), "width": frames.shape[2],
                            "height": frames.shape[1], "question": q.question, "answer": answer, "qid": qid,
                            "type": q.type, **{f"a{i}": text for i, text in enumerate(options)}})
            rows.append(_mc_row(f"{video_id}_{qid}", video, q, options, answer, q.type))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    annotations = write_text(root / "val.csv", text.getvalue())
    return _twin(folder, "nextqa", rows, annotations=annotations, video_root=root / "NExTVideo")


def _egoschema(folder: Path, seed: int, samples: list, rng: np.random.Generator) -> PublishedSet:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = folder / "egoschema"
    records, rows = [], []
    for index, sample in enumerate(samples):
        video_idx = str(uuid.uuid5(uuid.NAMESPACE_URL, f"synthqa/{seed}/{index}"))
        video = _clip(folder, index, root / "videos" / f"{video_idx}.mp4")
        for q in sample.questions:
            options, answer = choices(q, 5, rng)
            qid = str(len(records))
            records.append({"question_idx": qid, "question": q.question, "video_idx": video_idx,
                            "option": [f"{LETTERS[i]}. {text}" for i, text in enumerate(options)],
                            "answer": str(answer)})
            rows.append(_mc_row(qid, video, q, options, answer, None))
    annotations = root / "Subset" / "test-00000-of-00001.parquet"
    annotations.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), annotations)
    return _twin(folder, "egoschema", rows, annotations=annotations, video_root=root / "videos")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic clips in the published sets' layouts.")
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--clips", type=int, default=3, help="5 questions per clip")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    args = parser.parse_args(argv)
    for name, published in write_published(args.folder, args.seed, args.clips, tuple(args.formats)).items():
        print(f"{name}: python run.py +experiment=synth {' '.join(published.overrides)}")
        print(f"{' ' * len(name)}  twin: python run.py +experiment=synth data.manifest={published.twin}")


if __name__ == "__main__":
    main()
