"""Answer stage: Ray Data batches (one row per video) adapted to an answer engine, and the answer settings.

The parts: `stages.prompts` builds the prompt ids (Video-LLaVA's `USER: <video>\\n{question} ASSISTANT:`
by default, any template of the `pipeline` config), `stages.engine` is the engine interface,
`stages.engine_hf` the transformers engine (prefix reuse, conversations extending their cache) and
`stages.vllm_engine` the vLLM one. This module turns a batch's columns into the engine's videos and
conversations, and its answers back into columns.

Each prompt's single `<video>` token is replaced by the video's M embeddings (`stages.engine.spliced`).
The alternative, writing M `<video>` placeholders and passing features for HF to `masked_scatter`, needs
the placeholder count to match each video's M, which after temporal merging differs per video; splicing
embeddings is exact (a test checks it against HF's own placeholder path) and lets several questions reuse
one video's embeddings without re-encoding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, VideoLlavaForConditionalGeneration

from stages.columns import RowErrors, from_column, is_missing
from stages.engine import (
    Answer,
    Conversation,
    Sampling,
    Video,
    check_video,
    position_problems,
    prompt_positions,
    spliced,
)
from stages.engine_hf import HfEngine
from stages.model import ModelConfig, load_model
from stages.prompts import (
    CAPTION_PROMPT,
    CHOICE_PROMPT,
    LETTERS,
    PROMPT,
    TURN_PROMPT,
    TURN_SEPARATOR,
    Templates,
    conversation_text,
    question_text,
)
from stages.vllm_engine import VllmConfig, VllmEngine

__all__ = ["CAPTION_PROMPT", "CHOICE_PROMPT", "LETTERS", "PROMPT", "TURN_PROMPT", "TURN_SEPARATOR", "Answer",
           "AnswerConfig", "AnswerStage", "GenerateConfig", "conversation_text", "question_text"]

TASKS = ("qa", "caption")
ENGINES = {"hf": HfEngine, "vllm": VllmEngine}
# batch column <- Answer field
_COLUMNS = {
    "predictions": "text",
    "prompt_tokens": "prompt_tokens",
    "generated_tokens": "generated_tokens",
    "prefill_seconds": "prefill_seconds",
    "llm_decode_seconds": "llm_decode_seconds",
}


@dataclass
class GenerateConfig:
    """How answers are generated (`generate`'s settings, and how many prompts go through it at once)."""

    max_new_tokens: int = 64
    do_sample: bool = False  # greedy unless set; then temperature and top_p apply
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8  # prompts per `generate` call (left-padded together), videos per prefix read
    reuse_prefix: bool = True  # read each video's prompt prefix once, and extend a conversation's cache

    def problems(self) -> list[str]:
        found = [f"{key}={getattr(self, key)} must be >= 1" for key in ("max_new_tokens", "batch_size")
                 if getattr(self, key) < 1]
        if not self.temperature > 0:
            found.append(f"temperature={self.temperature} must be > 0")
        if not 0 < self.top_p <= 1:
            found.append(f"top_p={self.top_p} must be in (0, 1]")
        return found

    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.do_sample, self.temperature, self.top_p)


@dataclass
class AnswerConfig:
    """What the answer stage asks about each video, and how it generates (the `pipeline` config group)."""

    task: str = "qa"  # qa: each question of the manifest; caption: `caption_prompt` once per video
    prompt: str = PROMPT  # the conversation around the video and the question (Video-LLaVA's)
    turn_prompt: str = TURN_PROMPT  # a later turn of a conversation
    turn_separator: str = TURN_SEPARATOR  # closes each earlier answer of a conversation
    choice_prompt: str = CHOICE_PROMPT  # a multiple-choice question with its lettered options
    caption_prompt: str = CAPTION_PROMPT
    engine: str = "hf"  # hf: transformers' generate; vllm: vLLM on the exported LLM (stages.vllm_engine)
    generation: GenerateConfig = field(default_factory=GenerateConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)

    def problems(self) -> list[str]:
        found = [] if self.task in TASKS else [f"task={self.task!r} is not one of {', '.join(TASKS)}"]
        if self.engine not in ENGINES:
            found.append(f"engine={self.engine!r} is not one of {', '.join(ENGINES)}")
        for key in ("prompt", "turn_prompt"):
            if "{question}" not in getattr(self, key):
                found.append(f"{key} must contain {{question}}, got {getattr(self, key)!r}")
        if "{question}" not in self.choice_prompt or "{options}" not in self.choice_prompt:
            found.append(f"choice_prompt must contain {{question}} and {{options}}, "
                         f"got {self.choice_prompt!r}")
        return (found + [f"generation.{problem}" for problem in self.generation.problems()]
                + [f"vllm.{problem}" for problem in self.vllm.problems()])

    def templates(self) -> Templates:
        return Templates(self.prompt, self.turn_prompt, self.turn_separator)

    def position_problems(self, custom_positions: bool) -> list[str]:
        """The engine's problem with the visual tokens' own position ids, when they are asked for
        (`stages.engine.position_problems`); none for an unknown engine (`problems` names it)."""
        engine = ENGINES.get(self.engine)
        return [] if engine is None else position_problems(self.engine, engine.accepts_positions,
                                                           custom_positions)


class AnswerStage:
    """Visual embeddings + questions -> answers. A plain callable, and a Ray Data `map_batches` class.

    `model` is a `ModelConfig` (model and tokenizer are loaded here, the LLM only) or a loaded
    `VideoLlavaForConditionalGeneration`, which then needs its `tokenizer`. With `engine=vllm`, vLLM loads
    the exported LLM of that checkpoint itself (a loaded model is only asked where it came from) and this
    stage keeps only the tokenizer and the token embeddings. `custom_positions`: the batches carry the
    visual tokens' position ids (`visual_positions`), checked against the engine here, before any work.
    """

    def __init__(
        self,
        model: ModelConfig | VideoLlavaForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        config: AnswerConfig | None = None,
        custom_positions: bool = False,
    ) -> None:
        config = config or AnswerConfig()
        problems = config.problems() + config.position_problems(custom_positions)
        if problems:
            raise ValueError("invalid answer settings: " + "; ".join(problems))
        g = config.generation
        if config.engine == "vllm":
            if not isinstance(model, ModelConfig):  # e.g. runner=local's shared model: vLLM loads its own
                model = _model_config_of(model)
            self.engine = VllmEngine(model, config.vllm, config.templates())
            self.model = None
        else:
            if isinstance(model, ModelConfig):
                model, tokenizer = load_model(model, keep="language")
            if tokenizer is None:
                raise ValueError("a loaded model needs its tokenizer: AnswerStage(model, tokenizer)")
            self.engine = HfEngine(model, tokenizer, config.templates(), batch_size=g.batch_size,
                                   reuse_prefix=g.reuse_prefix)
            self.model = model
        self.builder, self.tokenizer = self.engine.builder, self.engine.tokenizer
        self.embed_tokens, self.dtype = self.engine.embed_tokens, self.engine.dtype
        self.task, self.caption_prompt = config.task, config.caption_prompt
        self.sampling = g.sampling()

    # ------------------------------------------------------------ direct use

    def answer(self, embeds: Sequence[torch.Tensor | np.ndarray | Video], questions: Sequence[str]
               ) -> list[Answer]:
        """Answer questions[i] about the video with embeddings embeds[i]; answers come back in input order.
        Questions given the same embeddings object are one video's: its prefix is read once for all.
        embeds[i] is a tensor (read at consecutive positions), or anything with `embeds`, `positions` and
        `span` (an `EncodedVideo` of `EncodeStage.encode`, a `Video`): with `compression.positions=original`
        its tokens then stand where the encode stage placed them."""
        if len(embeds) != len(questions):
            raise ValueError(f"got {len(embeds)} visual embeddings for {len(questions)} questions")
        videos: list[Video] = []
        index: dict[int, int] = {}
        for visual in embeds:
            if id(visual) not in index:
                index[id(visual)] = len(videos)
                videos.append(Video(torch.as_tensor(visual.embeds), visual.positions, visual.span)
                              if hasattr(visual, "embeds") else Video(torch.as_tensor(visual)))
        for i, question in enumerate(questions):
            if not isinstance(question, str):
                raise ValueError(f"question {i} must be a string, got {type(question).__name__}")
        talks = [Conversation(index[id(v)], [q]) for v, q in zip(embeds, questions, strict=True)]
        return [found[0] for found in self.engine.generate(videos, talks, self.sampling)]

    def build_inputs(
        self,
        embeds: Sequence[torch.Tensor | np.ndarray],
        questions: Sequence[str],
        answers: Sequence[str] | None = None,
        *,
        texts: Sequence[str] | None = None,
        positions: Sequence[torch.Tensor | None] | None = None,
        spans: Sequence[int | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Left-padded `inputs_embeds` [B, L, H], `attention_mask` and `position_ids` for prompt i =
        questions[i] with embeds[i] ([M_i, H]) in place of its `<video>` token (`texts`: whole prompt
        texts instead, e.g. a conversation's turn; `questions` is then ignored), for a direct forward.
        `positions[i]` and `spans[i]`: video i's `Video.positions` and `Video.span`, as the encode stage
        gives them for `compression.positions=original` (default: consecutive).

        With `answers` (teacher forcing, for tuning) each prompt is followed by its answer's tokens and
        EOS, and `labels` [B, L] holds those tokens where they sit (-100 elsewhere; HF's convention: the
        logits at position p predict labels[p + 1]).
        """
        count = len(texts) if texts is not None else len(questions)
        positions = positions if positions is not None else [None] * count
        spans = spans if spans is not None else [None] * count
        if len(embeds) != count or (answers is not None and len(answers) != count) \
                or len(positions) != count or len(spans) != count:
            raise ValueError(
                f"got {len(embeds)} visual embeddings for {count} questions"
                + ("" if answers is None else f" and {len(answers)} answers")
                + f", {len(positions)} visual positions and {len(spans)} spans"
            )
        if texts is None:
            prompts = [self.builder.prompt(q, index=i) for i, q in enumerate(questions)]
            texts = [self.builder.text(q) for q in questions]
        else:
            prompts = [self.builder.prompt_of_text(t, i) for i, t in enumerate(texts)]
        hidden, device = self.embed_tokens.embedding_dim, self.embed_tokens.weight.device
        sequences, prompt_position_ids, targets = [], [], []
        for i, (visual, prompt, text, where, span) in enumerate(
                zip(embeds, prompts, texts, positions, spans, strict=True)):
            video = check_video(Video(visual, where, span), i, hidden)
            answer = None if answers is None else self.builder.continuation_ids(text, answers[i], i)
            if answer is not None:
                prompt = type(prompt)(prompt.ids + answer, prompt.video_at)
            sequences.append(spliced(self.embed_tokens, prompt, video, self.dtype))
            prompt_position_ids.append(prompt_positions(prompt, video))
            targets.append(answer)
        length = max(len(seq) for seq in sequences)
        inputs = torch.zeros(len(sequences), length, hidden, device=device, dtype=self.dtype)
        mask = torch.zeros(len(sequences), length, device=device, dtype=torch.long)
        position_ids = torch.zeros(len(sequences), length, device=device, dtype=torch.long)
        labels = torch.full((len(sequences), length), -100, device=device, dtype=torch.long)
        for row, (seq, pos, answer) in enumerate(zip(sequences, prompt_position_ids, targets, strict=True)):
            inputs[row, length - len(seq) :] = seq
            mask[row, length - len(seq) :] = 1
            position_ids[row, length - len(seq) :] = pos.to(device)
            if answer is not None:
                labels[row, length - len(answer) :] = torch.tensor(answer, device=device)
        out = {"inputs_embeds": inputs, "attention_mask": mask, "position_ids": position_ids}
        return out if answers is None else {**out, "labels": labels}

    def continuation_ids(self, prompt: str, answer: str, index: int = 0) -> torch.Tensor:
        """`PromptBuilder.continuation_ids` as a tensor."""
        return torch.tensor(self.builder.continuation_ids(prompt, answer, index))

    # ------------------------------------------------------------ the batch callable

    def __call__(self, batch: dict) -> dict:
        """Ray Data / local batch, one row per video: `visual_embeds` ([M, H] per row), optionally
        `visual_positions` ([M] integers per row, or None) with `visual_span` (where the text after the
        video continues, or None: `Video.span`), and, for `qa`, `questions` (a list of
        questions per row) -> list columns aligned with `questions`: `predictions`, `prompt_tokens`,
        `generated_tokens`, `prefill_seconds`, `llm_decode_seconds`; `visual_embeds` is dropped.

        Conversations (`qa`): with columns `conversations` (per question: its conversation's id, "" for
        none), `turns` (its turn, 1..n) and `history` (per row, JSON: {conversation: {turn: [question,
        answer]}} of the turns answered before this run), the questions of a conversation are asked in
        turn order, each prompt holding the earlier turns with their answers.

        For `caption` each row (a clip) gets one caption, asked with `caption_prompt`. Rows with an
        upstream `error` get None in the new columns.
        A failed generation never fails the batch: the batch is retried one video at a time and a video
        that still fails gets None and its `error`. Other columns pass through.
        """
        dtypes = batch.get("visual_embeds_dtype", [None] * len(batch["visual_embeds"]))
        embeds = [from_column(e, dtype) for e, dtype in zip(batch["visual_embeds"], dtypes, strict=True)]
        given = batch.get("visual_positions", [None] * len(embeds))
        positions = [None if np.ndim(p) == 0 and is_missing(p) else torch.as_tensor(np.asarray(p))
                     for p in given]
        spans = [None if is_missing(s) else int(s) for s in batch.get("visual_span", [None] * len(embeds))]
        errors = RowErrors(batch, len(embeds))
        if self.task == "qa" and "questions" not in batch:
            raise ValueError(f"task 'qa' needs a 'questions' column, got columns {sorted(batch)}")
        if self.task == "qa":
            asked = [list(q) for q in batch["questions"]]
        else:
            asked = [[self.caption_prompt] for _ in embeds]
        talks = _talks(batch, asked) if self.task == "qa" else [None] * len(embeds)
        rows = [row for row, visual in enumerate(embeds) if errors.ok(row) and visual is not None]
        videos = [Video(e, p, s) for e, p, s in zip(embeds, positions, spans, strict=True)]
        per_row: dict[int, list[Answer]] = {}
        try:
            per_row = self._answer_rows(rows, videos, asked, talks)
        except Exception:  # noqa: BLE001 - isolate the failing video(s) below
            for row in rows:
                try:
                    per_row.update(self._answer_rows([row], videos, asked, talks))
                except Exception as err:  # noqa: BLE001 - one video's failure becomes its error
                    errors.fail(row, f"answer: {type(err).__name__}: {err}")
        out = {k: v for k, v in batch.items()
               if k not in ("visual_embeds", "visual_embeds_dtype", "visual_positions", "visual_span")}
        for column, attribute in _COLUMNS.items():
            out[column] = [
                [getattr(a, attribute) for a in per_row[row]] if row in per_row else None
                for row in range(len(embeds))
            ]
        return {**out, **errors.columns()}

    def _answer_rows(self, rows: list[int], videos: list[Video], asked: list[list[str]],
                     talks: list[_Talks | None]) -> dict[int, list[Answer]]:
        """The rows' questions through the engine: each conversation, or standalone question, of a row
        one `Conversation` about the row's video; answers back in each row's question order."""
        conversations, where = [], []
        for k, row in enumerate(rows):
            for question_indices, earlier in (talks[row] or _Talks.single(len(asked[row]))).grouped():
                conversations.append(Conversation(k, [asked[row][i] for i in question_indices], earlier))
                where.append((row, question_indices))
        found = self.engine.generate([videos[row] for row in rows], conversations, self.sampling)
        per_row: dict[int, dict[int, Answer]] = {row: {} for row in rows}
        for (row, question_indices), answers in zip(where, found, strict=True):
            per_row[row].update(zip(question_indices, answers, strict=True))
        return {row: [per_row[row][i] for i in range(len(asked[row]))] for row in rows}


@dataclass
class _Talks:
    """The conversations among one row's questions: per question its conversation ("" for none) and
    turn, and the turns answered before this run ({conversation: {turn: (question, answer)}})."""

    conversation: list[str]
    turn: list[int]
    history: dict[str, dict[int, tuple[str, str | None]]]

    @classmethod
    def single(cls, questions: int) -> _Talks:
        return cls([""] * questions, [0] * questions, {})

    def grouped(self) -> list[tuple[list[int], list[tuple[str, str]]]]:
        """(question indices in turn order, the earlier turns' (question, answer) pairs) per conversation;
        a standalone question is a conversation of its own."""
        groups = [([i], []) for i, name in enumerate(self.conversation) if not name]
        for name in dict.fromkeys(c for c in self.conversation if c):
            members = sorted((self.turn[i], i) for i, c in enumerate(self.conversation) if c == name)
            first = members[0][0]
            turns = [t for t, _ in members]
            if turns != list(range(first, first + len(turns))):
                raise ValueError(f"conversation {name!r}: turns {turns} are asked with a gap")
            earlier = []
            for t in range(1, first):
                pair = self.history.get(name, {}).get(t)
                if pair is None or pair[1] is None:
                    raise ValueError(f"conversation {name!r}: turn {first} needs the answer of turn {t}, "
                                     "which has none")
                earlier.append((pair[0], pair[1]))
            groups.append(([i for _, i in members], earlier))
        return groups


def _talks(batch: dict, asked: list[list[str]]) -> list[_Talks | None]:
    """Each row's `_Talks`, from the batch's `conversations`, `turns` and `history` columns (None for every
    row of a batch without them)."""
    if "conversations" not in batch:
        return [None] * len(asked)
    histories = batch.get("history", [None] * len(asked))
    talks = []
    for names, turns, history, questions in zip(batch["conversations"], batch["turns"], histories, asked,
                                                strict=True):
        recorded = json.loads(history) if isinstance(history, str) and history else {}
        before = {c: {int(t): (qa[0], qa[1]) for t, qa in per.items()} for c, per in recorded.items()}
        talks.append(_Talks([str(n) if n else "" for n in names], [int(t) for t in turns], before))
        if len(talks[-1].conversation) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(talks[-1].conversation)} conversation ids")
    return talks


def _model_config_of(model: VideoLlavaForConditionalGeneration) -> ModelConfig:
    """Where a loaded model came from, and its dtype: what the vLLM engine exports and loads."""
    path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not path:
        raise ValueError("engine=vllm needs the model's checkpoint: pass a ModelConfig (a loaded model that "
                         "does not know its path cannot be exported for vLLM)")
    return ModelConfig(path=str(path), dtype=str(model.dtype).removeprefix("torch."))
