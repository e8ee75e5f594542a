"""Multi-turn conversations: the manifest's checks, the exact prompt of every turn (Video-LLaVA's template
with the model's own earlier answers), one prefix read per conversation, and a resumed run that picks a
conversation up at its first missing turn with the recorded answers of the earlier ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.config import compose_job
from pipelines.job import run_job
from pipelines.manifest import ManifestError, Question, group_by_video, read_manifest
from pipelines.runner import conversation_history, item_rows, unanswerable_turns
from stages.answer import AnswerConfig, AnswerStage, GenerateConfig, conversation_text
from stages.encode import EncodeStage
from stages.engine import Conversation, Sampling, Video
from stages.model import load_video_llava
from stages.prompts import PromptBuilder
from synthqa.clips import synth_sample
from synthqa.dataset import HELDOUT, write_dataset

ROOT = Path(__file__).resolve().parent.parent
SYNTH = ROOT / "models" / "synth"
VAL_SEED = HELDOUT["val500"][0]


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_template_is_video_llavas_conversation():
    assert conversation_text("Q1") == "USER: <video>\nQ1 ASSISTANT:"
    assert conversation_text("Q3", [("Q1", "A1"), ("Q2", "A2")]) == (
        "USER: <video>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>USER: Q3 ASSISTANT:")
    assert conversation_text("b?", [("a?", "x")], prompt="<video> {question} =>", turn_prompt="{question} =>",
                             separator="\n") == "<video> a? => x\nb? =>"


def test_the_manifest_checks_each_conversations_turns(tmp_path):
    good = write_manifest(tmp_path / "good.jsonl", [
        {"id": "c2", "video": "a.mp4", "question": "And its shape?", "conversation": "c", "turn": 2},
        {"id": "c1", "video": "a.mp4", "question": "What color?", "conversation": "c", "turn": "1"},
        {"id": "s", "video": "a.mp4", "question": "Alone?"},
    ])
    questions = {q.id: q for q in read_manifest(good)}
    assert (questions["c1"].conversation, questions["c1"].turn, questions["c2"].turn) == ("c", 1, 2)
    assert questions["s"].conversation is None and questions["c1"].extra == {}
    bad = write_manifest(tmp_path / "bad.jsonl", [
        {"id": "g1", "video": "a.mp4", "question": "q", "conversation": "gap", "turn": 1},
        {"id": "g3", "video": "a.mp4", "question": "q", "conversation": "gap", "turn": 3},
        {"id": "d1", "video": "a.mp4", "question": "q", "conversation": "dup", "turn": 1},
        {"id": "d2", "video": "a.mp4", "question": "q", "conversation": "dup", "turn": 1},
        {"id": "v1", "video": "a.mp4", "question": "q", "conversation": "two", "turn": 1},
        {"id": "v2", "video": "b.mp4", "question": "q", "conversation": "two", "turn": 2},
        {"id": "w1", "video": "a.mp4", "question": "q", "conversation": "win", "turn": 1, "start": 1,
         "end": 2},
        {"id": "w2", "video": "a.mp4", "question": "q", "conversation": "win", "turn": 2},
        {"id": "n1", "video": "a.mp4", "question": "q", "conversation": "alone"},
        {"id": "n2", "video": "a.mp4", "question": "q", "turn": 2},
        {"id": "n3", "video": "a.mp4", "question": "q", "conversation": "x", "turn": 1.5},
        {"id": "n4", "video": "a.mp4", "question": "q", "conversation": "y", "turn": 0},
    ])
    with pytest.raises(ManifestError) as err:
        read_manifest(bad)
    message = str(err.value)
    assert "has 8 problem(s)" in message
    for expected in (
        "bad.jsonl:9: conversation 'alone' needs a turn (1, 2, ...)",
        "bad.jsonl:10: turn=2 needs a conversation id",
        "bad.jsonl:11: turn=1.5 must be a whole number >= 1",
        "bad.jsonl:12: turn=0 must be a whole number >= 1",
        "conversation 'gap' has turns [1, 3]: they must be 1..2 without gaps (lines 1, 2)",
        "conversation 'dup' has turn 1 more than once (lines 3, 4)",
        f"conversation 'two' is about more than one clip ({tmp_path}/a.mp4 [None, None]; "
        f"{tmp_path}/b.mp4 [None, None]; lines 5, 6): a conversation has one video",
        "conversation 'win' is about more than one clip",
    ):
        assert expected in message, expected


def test_rows_carry_conversations_and_what_earlier_runs_answered():
    questions = [Question("a1", "v.mp4", "Color?", conversation="a", turn=1),
                 Question("a2", "v.mp4", "Shape?", conversation="a", turn=2),
                 Question("a3", "v.mp4", "Where?", conversation="a", turn=3),
                 Question("s", "v.mp4", "Alone?", options=("x", "y"))]
    assert "conversations" not in item_rows(group_by_video(questions[3:]))[0]  # none: rows as before
    done = [{"id": "a1", "prediction": "red", "error": None}]
    history = conversation_history(questions, done)
    assert history == {"a": {1: ("Color?", "red")}}
    row = item_rows(group_by_video(questions[1:]), history=history)[0]
    assert (row["conversations"], row["turns"]) == (["a", "a", ""], [2, 3, 0])
    assert json.loads(row["history"]) == {"a": {"1": ["Color?", "red"]}}
    assert row["questions"][2].startswith("Alone?\n(A) x\n(B) y")
    # a turn after a recorded error row (kept with retry_errors=false) cannot be asked: an error row too
    failed = conversation_history(questions, [{"id": "a1", "prediction": None, "error": "decode: broken"}])
    marked = {q.id: q.error for q in unanswerable_turns(questions[1:], failed)}
    assert marked["s"] is None
    assert marked["a2"] == marked["a3"].replace("turn 3", "turn 2") == (
        "conversation 'a': turn 1 is an error row, and turn 2 needs its answer (rerun with "
        "output.retry_errors=true)")


@pytest.fixture(scope="module")
def synth():
    return load_video_llava(SYNTH, dtype="float32", device="cpu")


def recording(stage: AnswerStage) -> list[str]:
    """Every prompt text the stage tokenizes from now on."""
    texts: list[str] = []
    tokenize = stage.builder.prompt_of_text

    def record(text: str, index: int = 0):
        texts.append(text)
        return tokenize(text, index)

    stage.builder.prompt_of_text = record
    return texts


@pytest.mark.parametrize("reuse", [True, False])
def test_each_turn_is_asked_with_the_earlier_answers_and_one_prefix_per_conversation(synth, reuse):
    model, tokenizer = synth
    samples = [synth_sample(VAL_SEED, i) for i in range(2)]
    embeds = [e.embeds.numpy() for e in EncodeStage(model).encode([s.clip.frames for s in samples])]
    texts = [[q.question for q in s.questions] for s in samples]
    stage = AnswerStage(model, tokenizer, config=AnswerConfig(
        generation=GenerateConfig(max_new_tokens=3, reuse_prefix=reuse)))
    prompts = recording(stage)
    batch = {  # clip 0: turns 3, 1, 2 of "x" (any order) and a standalone question; clip 1: "y" turns 1, 2
        "visual_embeds": embeds,
        "questions": [[texts[0][2], texts[0][0], texts[0][1], texts[0][3]], [texts[1][1], texts[1][4]]],
        "conversations": [["x", "x", "x", ""], ["y", "y"]],
        "turns": [[3, 1, 2, 0], [1, 2]],
        "history": ["", ""],
    }
    out = stage(batch)
    assert out["error"] == [None, None]
    x3, x1, x2, alone = out["predictions"][0]
    y1, y2 = out["predictions"][1]
    q = texts
    first = [f"USER: <video>\n{q[0][0]} ASSISTANT:", f"USER: <video>\n{q[0][3]} ASSISTANT:",
             f"USER: <video>\n{q[1][1]} ASSISTANT:"]
    second = [f"USER: <video>\n{q[0][0]} ASSISTANT: {x1}</s>USER: {q[0][1]} ASSISTANT:",
              f"USER: <video>\n{q[1][1]} ASSISTANT: {y1}</s>USER: {q[1][4]} ASSISTANT:"]
    third = (f"USER: <video>\n{q[0][0]} ASSISTANT: {x1}</s>USER: {q[0][1]} ASSISTANT: {x2}</s>"
             f"USER: {q[0][2]} ASSISTANT:")
    assert sorted(prompts[:3]) == sorted(first) and sorted(prompts[3:5]) == sorted(second)  # by rounds
    assert prompts[5:] == [third]
    assert stage.engine.prefix_reads == (2 if reuse else 0)  # one per video, for all its turns
    # each turn's answer is the model's answer to that exact prompt, read whole
    single = AnswerStage(model, tokenizer, config=AnswerConfig(
        generation=GenerateConfig(max_new_tokens=3, reuse_prefix=False)))
    alone_turn = Conversation(0, [q[0][2]], earlier=[(q[0][0], x1), (q[0][1], x2)])
    assert single.engine.generate([Video(torch.as_tensor(embeds[0]))], [alone_turn], single.sampling
                                  )[0][0].text == x3
    assert alone == single.answer([embeds[0]], [q[0][3]])[0].text
    assert out["prompt_tokens"][0][0] > out["prompt_tokens"][0][2] > out["prompt_tokens"][0][1]
    # the turns of a conversation after an error: the row fails, naming the missing answer
    lost = stage({**batch, "visual_embeds": embeds[1:], "questions": [[q[1][4]]], "conversations": [["y"]],
                  "turns": [[2]], "history": [json.dumps({"y": {"1": [q[1][1], None]}})]})
    assert lost["error"] == ["answer: ValueError: conversation 'y': turn 2 needs the answer of turn 1, which "
                             "has none"]
    resumed = stage({**batch, "visual_embeds": embeds[1:], "questions": [[q[1][4]]], "conversations": [["y"]],
                     "turns": [[2]], "history": [json.dumps({"y": {"1": [q[1][1], "purple"]}})]})
    assert prompts[-1] == f"USER: <video>\n{q[1][1]} ASSISTANT: purple</s>USER: {q[1][4]} ASSISTANT:"
    assert resumed["error"] == [None]


def test_a_conversation_extends_its_cache_turn_by_turn(synth):
    """Ten turns: the answers of the re-reading path (every turn reads its whole prompt), while turn k
    reads only what its prompt adds to the cache of turn k-1: the tokens read grow linearly, not
    quadratically."""
    model, tokenizer = synth
    samples = [synth_sample(VAL_SEED, i) for i in range(2)]
    videos = [Video(e.embeds) for e in EncodeStage(model).encode([s.clip.frames for s in samples])]
    talks = [Conversation(v, [q.question for q in s.questions] * 2) for v, s in enumerate(samples)]
    answers, reads = {}, {}
    for reuse in (False, True):
        engine = AnswerStage(model, tokenizer, config=AnswerConfig(
            generation=GenerateConfig(max_new_tokens=3, reuse_prefix=reuse))).engine
        answers[reuse] = engine.generate(videos, talks, Sampling(max_new_tokens=3))
        reads[reuse] = engine.tokens_read
    tokens = {reuse: [[a.token_ids for a in c] for c in found] for reuse, found in answers.items()}
    assert tokens[True] == tokens[False]
    assert len({a.text for c in answers[True] for a in c}) > 3
    whole = sum(a.prompt_tokens for c in answers[True] for a in c)
    assert reads[False] == whole  # the re-reading path: every turn's whole prompt
    # with the cache: each video's head once, turn 1's own tokens, then each turn's prompt beyond turn
    # k-1's prompt and its answer (the answer's last token, EOS, is read with the next turn)
    expected = 0
    for turns in answers[True]:
        expected += turns[0].prompt_tokens
        for before, now in zip(turns, turns[1:], strict=False):
            expected += now.prompt_tokens - before.prompt_tokens - (before.generated_tokens - 1)
    assert reads[True] == expected
    assert expected < whole / 3 and turns[9].prompt_tokens > turns[0].prompt_tokens + 9 * 8
    assert engine.prefix_reads == 2


def test_a_resumed_job_continues_each_conversation_at_its_first_missing_turn(tmp_path, monkeypatch):
    clips = write_dataset(tmp_path / "clips", VAL_SEED, 2)
    source = [json.loads(line) for line in clips.read_text().splitlines()]
    rows = []
    for clip in ("00000", "00001"):
        asked = [r for r in source if r["id"].startswith(clip)]
        rows += [{**r, "conversation": f"c{clip}", "turn": turn} for turn, r in enumerate(asked[:3], 1)]
        rows += asked[3:]  # standalone questions about the same clip
    manifest = write_manifest(tmp_path / "clips" / "talk.jsonl", rows)
    out = tmp_path / "out.jsonl"

    def job():
        return compose_job("model=synth", f"model.path={SYNTH}", f"data.manifest={manifest}",
                           f"output.path={out}", "runner=local", "decode.size=null",
                           "pipeline.generation.max_new_tokens=3")

    prompts: list[str] = []
    tokenize = PromptBuilder.prompt_of_text

    def record(self, text: str, index: int = 0):
        prompts.append(text)
        return tokenize(self, text, index)

    monkeypatch.setattr(PromptBuilder, "prompt_of_text", record)
    first = run_job(job())
    assert first["error"] == 0 and first["this_run"]["rows"] == 10
    full = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert (full["00000-color"]["conversation"], full["00000-color"]["turn"]) == ("c00000", 1)
    assert "conversation" not in full["00000-direction"]
    # as if killed: conversation c00000 has its first turn written, c00001 its first two; c00001's second
    # turn is recorded with another answer, so the prompt of its third turn shows which answer it reused
    kept = [full["00000-color"], full["00001-color"], {**full["00001-shape"], "prediction": "purple"}]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    prompts.clear()
    again = run_job(job())
    assert again["this_run"]["rows"] == 7 and again["error"] == 0
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in final) == sorted(r["id"] for r in rows)  # every id exactly once
    by_id = {r["id"]: r for r in final}
    q = {r["id"]: r["question"] for r in rows}
    c0, c1 = full["00000-color"]["prediction"], full["00001-color"]["prediction"]
    assert f"USER: <video>\n{q['00000-color']} ASSISTANT: {c0}</s>USER: {q['00000-shape']} ASSISTANT:" \
        in prompts
    assert (f"USER: <video>\n{q['00001-color']} ASSISTANT: {c1}</s>USER: {q['00001-shape']} ASSISTANT: purple"
            f"</s>USER: {q['00001-count']} ASSISTANT:") in prompts
    assert not any(p == f"USER: <video>\n{q['00001-color']} ASSISTANT:" for p in prompts)  # not asked again
    assert by_id["00000-shape"]["prediction"] == full["00000-shape"]["prediction"]  # same history and answer
