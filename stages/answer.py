"""Answer stage: Video-LLaVA's LLM reads a prompt with the visual embeddings spliced in, and generates.

The prompt is Video-LLaVA's `USER: <video>\\n{question} ASSISTANT:`. Its single `<video>` token is
replaced by the video's M embeddings by building `inputs_embeds` directly. The alternative, writing M
`<video>` placeholders and passing features for HF to `masked_scatter`, needs the placeholder count to
match each video's M, which after temporal merging differs per video; counting fake tokens in text buys
nothing. Splicing embeddings is exact (a test checks it against HF's own placeholder path) and lets
several questions reuse one video's embeddings without re-encoding.

Batches are left-padded (generation appends on the right) with an attention mask; `generate` derives
position ids from the mask, and `build_inputs` returns them for a direct forward.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    VideoLlavaForConditionalGeneration,
)

from stages.columns import RowErrors, from_column
from stages.model import ModelConfig, load_model

PROMPT = "USER: <video>\n{question} ASSISTANT:"
CAPTION_PROMPT = "Describe the video in detail."
# multiple choice, as LLaVA's evaluations ask it: the options lettered, then the instruction
CHOICE_PROMPT = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"
TASKS = ("qa", "caption")
# batch column <- Answer field
_COLUMNS = {
    "predictions": "text",
    "prompt_tokens": "prompt_tokens",
    "generated_tokens": "generated_tokens",
    "prefill_seconds": "prefill_seconds",
    "llm_decode_seconds": "llm_decode_seconds",
}


@dataclass
class Answer:
    """One generated answer. Its times are its share of the batched `generate` call it was part of (the
    call's time divided by its prompts)."""

    text: str
    token_ids: list[int]  # the generated tokens, EOS included when generated
    prompt_tokens: int  # text tokens + visual tokens read by the LLM (padding excluded)
    generated_tokens: int  # new tokens up to and including EOS
    prefill_seconds: float  # prompt forward up to the first token's logits
    llm_decode_seconds: float  # the LLM's remaining new tokens (not video decoding)


@dataclass
class GenerateConfig:
    """How answers are generated (`generate`'s settings, and how many prompts go through it at once)."""

    max_new_tokens: int = 64
    do_sample: bool = False  # greedy unless set; then temperature and top_p apply
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8  # prompts per `generate` call (left-padded together)

    def problems(self) -> list[str]:
        found = [f"{key}={getattr(self, key)} must be >= 1" for key in ("max_new_tokens", "batch_size")
                 if getattr(self, key) < 1]
        if not self.temperature > 0:
            found.append(f"temperature={self.temperature} must be > 0")
        if not 0 < self.top_p <= 1:
            found.append(f"top_p={self.top_p} must be in (0, 1]")
        return found


@dataclass
class AnswerConfig:
    """What the answer stage asks about each video, and how it generates (the `pipeline` config group)."""

    task: str = "qa"  # qa: each question of the manifest; caption: `caption_prompt` once per video
    prompt: str = PROMPT  # the conversation around the video and the question (Video-LLaVA's)
    choice_prompt: str = CHOICE_PROMPT  # a multiple-choice question with its lettered options
    caption_prompt: str = CAPTION_PROMPT
    generation: GenerateConfig = field(default_factory=GenerateConfig)

    def problems(self) -> list[str]:
        found = [] if self.task in TASKS else [f"task={self.task!r} is not one of {', '.join(TASKS)}"]
        if "{question}" not in self.prompt:
            found.append(f"prompt must contain {{question}}, got {self.prompt!r}")
        if "{question}" not in self.choice_prompt or "{options}" not in self.choice_prompt:
            found.append(f"choice_prompt must contain {{question}} and {{options}}, "
                         f"got {self.choice_prompt!r}")
        return found + [f"generation.{problem}" for problem in self.generation.problems()]


def question_text(question: str, options: Sequence[str] | None = None, choice_prompt: str = CHOICE_PROMPT
                  ) -> str:
    """What is asked in the prompt: an open question as it is; a multiple-choice one in `choice_prompt`
    with its options as lines `(A) text`."""
    if not options:
        return question
    lettered = "\n".join(f"({letter}) {text}" for letter, text in zip(LETTERS, options, strict=False))
    return choice_prompt.format(question=question, options=lettered)


class AnswerStage:
    """Visual embeddings + questions -> answers. A plain callable, and a Ray Data `map_batches` class.

    `model` is a `ModelConfig` (model and tokenizer are loaded here, the LLM only) or a loaded
    `VideoLlavaForConditionalGeneration`, which then needs its `tokenizer`.
    """

    def __init__(
        self,
        model: ModelConfig | VideoLlavaForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        config: AnswerConfig | None = None,
    ) -> None:
        if isinstance(model, ModelConfig):
            model, tokenizer = load_model(model, keep="language")
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: AnswerStage(model, tokenizer)")
        config = config or AnswerConfig()
        problems = config.problems()
        self.video_token = tokenizer.convert_ids_to_tokens(model.config.video_token_id)
        if config.prompt.count(self.video_token) != 1:
            problems.append(f"prompt must contain {self.video_token} once, got {config.prompt!r}")
        if problems:
            raise ValueError("invalid answer settings: " + "; ".join(problems))
        self.model, self.tokenizer = model, tokenizer
        self.task, self.caption_prompt, self.prompt = config.task, config.caption_prompt, config.prompt
        g = config.generation
        self.batch_size = g.batch_size
        sampling = {"temperature": g.temperature, "top_p": g.top_p} if g.do_sample else {}
        self.generation_config = GenerationConfig(
            max_new_tokens=g.max_new_tokens,
            do_sample=g.do_sample,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )

    def build_inputs(
        self,
        embeds: Sequence[torch.Tensor | np.ndarray],
        questions: Sequence[str],
        answers: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Left-padded `inputs_embeds` [B, L, H], `attention_mask` and `position_ids` for prompt i =
        questions[i] with embeds[i] ([M_i, H]) in place of its `<video>` token.

        With `answers` (teacher forcing, for tuning) each prompt is followed by its answer's tokens and
        EOS, and `labels` [B, L] holds those tokens where they sit (-100 elsewhere; HF's convention: the
        logits at position p predict labels[p + 1]).
        """
        if len(embeds) != len(questions) or (answers is not None and len(answers) != len(questions)):
            raise ValueError(
                f"got {len(embeds)} visual embeddings for {len(questions)} questions"
                + ("" if answers is None else f" and {len(answers)} answers")
            )
        embed_tokens = self.model.get_input_embeddings()
        hidden, device, dtype = embed_tokens.embedding_dim, self.model.device, self.model.dtype
        sequences, targets = [], []
        for i, (visual, question) in enumerate(zip(embeds, questions, strict=True)):
            if not isinstance(question, str):
                raise ValueError(f"question {i} must be a string, got {type(question).__name__}")
            visual = torch.as_tensor(visual)
            if visual.dim() != 2 or visual.shape[1] != hidden or len(visual) == 0:
                shape = tuple(visual.shape)
                raise ValueError(f"visual embeddings {i} must be [M >= 1, {hidden}], got {shape}")
            prompt = self.prompt.format(question=question)
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids[0]
            at = (ids == self.model.config.video_token_id).nonzero().flatten()
            if len(at) != 1:
                raise ValueError(f"question {i} must not contain {self.video_token}: {question!r}")
            answer = None if answers is None else self.continuation_ids(prompt, answers[i], i)
            if answer is not None:
                ids = torch.cat([ids, answer])
            text = embed_tokens(ids.to(device))
            visual = visual.to(device, dtype)
            sequences.append(torch.cat([text[: at[0]], visual, text[at[0] + 1 :]]))
            targets.append(answer)
        length = max(len(seq) for seq in sequences)
        inputs = torch.zeros(len(sequences), length, hidden, device=device, dtype=dtype)
        mask = torch.zeros(len(sequences), length, device=device, dtype=torch.long)
        labels = torch.full((len(sequences), length), -100, device=device, dtype=torch.long)
        for row, (seq, answer) in enumerate(zip(sequences, targets, strict=True)):
            inputs[row, length - len(seq) :] = seq
            mask[row, length - len(seq) :] = 1
            if answer is not None:
                labels[row, length - len(answer) :] = answer.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = {"inputs_embeds": inputs, "attention_mask": mask, "position_ids": positions}
        return out if answers is None else {**out, "labels": labels}

    def continuation_ids(self, prompt: str, answer: str, index: int = 0) -> torch.Tensor:
        """The tokens that follow `prompt` when the model answers `answer`, then EOS: the tokens of
        `prompt + " " + answer` beyond the prompt's own (so the split is the tokenizer's, as in
        generation). Raises ValueError naming `index` when the answer is empty or the prompt's tokens
        are not a prefix of the joined text's."""
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"answer {index} must be a non-empty string, got {answer!r}")
        prompt_ids = self.tokenizer(prompt).input_ids
        joined = self.tokenizer(f"{prompt} {answer.strip()}").input_ids
        if joined[: len(prompt_ids)] != prompt_ids or len(joined) == len(prompt_ids):
            raise ValueError(f"answer {index} ({answer!r}) does not tokenize as a continuation of the prompt")
        return torch.tensor([*joined[len(prompt_ids) :], self.tokenizer.eos_token_id])

    @torch.inference_mode()
    def answer(self, embeds: Sequence[torch.Tensor | np.ndarray], questions: Sequence[str]) -> list[Answer]:
        """Answer questions[i] about the video with embeddings embeds[i], `batch_size` at a time.

        Prompts are grouped by length (less padding); answers come back in input order.
        """
        order = sorted(range(len(questions)), key=lambda i: len(embeds[i]))
        answers: dict[int, Answer] = {}
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            results = self._generate([embeds[i] for i in chunk], [questions[i] for i in chunk])
            answers.update(zip(chunk, results, strict=True))
        return [answers[i] for i in range(len(questions))]

    def _generate(
        self, embeds: Sequence[torch.Tensor | np.ndarray], questions: Sequence[str]
    ) -> list[Answer]:
        inputs = self.build_inputs(embeds, questions)
        timer = _FirstLogitsTimer()
        start = time.perf_counter()
        new = self.model.generate(
            inputs_embeds=inputs["inputs_embeds"],
            attention_mask=inputs["attention_mask"],
            generation_config=self.generation_config,
            logits_processor=LogitsProcessorList([timer]),
        )
        end = time.perf_counter()
        share = len(questions)  # each answer carries its share of the batched call's times
        prefill = timer.first - start
        eos = self.tokenizer.eos_token_id
        answers = []
        for row, tokens in enumerate(new.tolist()):
            generated = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            answers.append(
                Answer(
                    text=self.tokenizer.decode(tokens[:generated], skip_special_tokens=True).strip(),
                    token_ids=tokens[:generated],
                    prompt_tokens=int(inputs["attention_mask"][row].sum()),
                    generated_tokens=generated,
                    prefill_seconds=prefill / share,
                    llm_decode_seconds=(end - timer.first) / share,
                )
            )
        return answers

    def __call__(self, batch: dict) -> dict:
        """Ray Data / local batch, one row per video: `visual_embeds` ([M, H] per row) and, for `qa`,
        `questions` (a list of questions per row) -> list columns aligned with `questions`:
        `predictions`, `prompt_tokens`, `generated_tokens`, `prefill_seconds`, `llm_decode_seconds`;
        `visual_embeds` is dropped.

        For `caption` each row (a clip) gets one caption, asked with `caption_prompt`. Rows with an
        upstream `error` get None in the new columns.
        A failed generation never fails the batch: the batch is retried one video at a time and a video
        that still fails gets None and its `error`. Other columns pass through.
        """
        dtypes = batch.get("visual_embeds_dtype", [None] * len(batch["visual_embeds"]))
        embeds = [from_column(e, dtype) for e, dtype in zip(batch["visual_embeds"], dtypes, strict=True)]
        errors = RowErrors(batch, len(embeds))
        if self.task == "qa" and "questions" not in batch:
            raise ValueError(f"task 'qa' needs a 'questions' column, got columns {sorted(batch)}")
        if self.task == "qa":
            asked = [list(q) for q in batch["questions"]]
        else:
            asked = [[self.caption_prompt] for _ in embeds]
        rows = [row for row, visual in enumerate(embeds) if errors.ok(row) and visual is not None]
        per_row: dict[int, list[Answer]] = {}
        try:
            per_row = self._answer_rows(rows, embeds, asked)
        except Exception:  # noqa: BLE001 - isolate the failing video(s) below
            for row in rows:
                try:
                    per_row.update(self._answer_rows([row], embeds, asked))
                except Exception as err:  # noqa: BLE001 - one video's failure becomes its error
                    errors.fail(row, f"answer: {type(err).__name__}: {err}")
        out = {k: v for k, v in batch.items() if k not in ("visual_embeds", "visual_embeds_dtype")}
        for column, attribute in _COLUMNS.items():
            out[column] = [
                [getattr(a, attribute) for a in per_row[row]] if row in per_row else None
                for row in range(len(embeds))
            ]
        return {**out, **errors.columns()}

    def _answer_rows(
        self, rows: list[int], embeds: list, asked: list[list[str]]
    ) -> dict[int, list[Answer]]:
        pairs = [(row, q) for row in rows for q in asked[row]]
        results = self.answer([embeds[row] for row, _ in pairs], [q for _, q in pairs])
        per_row: dict[int, list[Answer]] = {row: [] for row in rows}
        for (row, _), result in zip(pairs, results, strict=True):
            per_row[row].append(result)
        return per_row


class _FirstLogitsTimer(LogitsProcessor):
    """Notes when `generate` first asks for next-token scores, i.e. when the prefill forward is done."""

    def __init__(self) -> None:
        self.first = 0.0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.first:
            if scores.is_cuda:
                torch.cuda.synchronize(scores.device)
            self.first = time.perf_counter()
        return scores
