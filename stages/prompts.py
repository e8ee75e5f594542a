"""Prompt building: templates, conversations and multiple-choice questions -> token ids with the place of
the video, and the template's head that every prompt about one video shares.

**What the model reads** is the tokenizer's reading of the whole prompt text (`tokenizer(text)`), as
transformers' Video-LLaVA processor tokenizes it: that is what `PromptBuilder.prompt` returns, the video
placeholder (`<video>`, one id) at `video_at`.

**The shared head, built segment by segment.** Prefix reuse needs the ids that every prompt of a template
starts with, whatever the question: the text before `<video>`, the placeholder, and the text after it up
to the question. Tokenizing "the template up to {question}" as one string does not give them: LLaMA's
SentencePiece (and byte-level BPE alike) attaches a space to the word after it, so the head of
`"USER: <video> {question} ASSISTANT:"` would end in a lone `▁` token while every real prompt has `▁What`
there. The rule used here, one segment at a time:
  1. the text before `<video>` is tokenized as the start of a string (with BOS, and the prefix space
     SentencePiece adds only at the start of a string);
  2. `<video>` is a special token: tokenizers split the text at it, so it is its own id;
  3. the text after it up to `{question}` is tokenized as a continuation (after the placeholder, so with
     no prefix space), less its trailing spaces, which belong to the question's first word;
  4. the concatenation is checked against the tokenizer: ids that are not a prefix of the whole prompt's
     ids for a set of probe questions (different first characters) are dropped from the end.
The question and the rest of the template are never segmented: they are the whole prompt's ids after the
head, so every prompt is exactly what the model expects, and an engine that finds a prompt not starting
with the head (a question that joins the seam in an unusual way) reads it from where they part.
A template with `<video>` after `{question}` shares only text: it is logged once (`head_note`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the templates are imported where transformers is not (`tasks`, `pipelines.score`)
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PROMPT = "USER: <video>\n{question} ASSISTANT:"
# Later turns of a conversation, and what closes each answer (Video-LLaVA's conv_llava_v1: roles USER and
# ASSISTANT, sep " ", sep2 "</s>")
TURN_PROMPT = "USER: {question} ASSISTANT:"
TURN_SEPARATOR = "</s>"
CAPTION_PROMPT = "Describe the video in detail."
# multiple choice, as LLaVA's evaluations ask it: the options lettered, then the instruction
CHOICE_PROMPT = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"
# questions whose whole prompts the shared head must be a prefix of (step 4 of the rule)
_PROBES = ("What is it?", "a", "Z?", "1 2", "(A) x", "¿Qué?", '"quoted"', "'s", "-", "é", " spaced",
           "\nline")


def question_text(question: str, options: Sequence[str] | None = None, choice_prompt: str = CHOICE_PROMPT
                  ) -> str:
    """What is asked in the prompt: an open question as it is; a multiple-choice one in `choice_prompt`
    with its options as lines `(A) text`."""
    if not options:
        return question
    lettered = "\n".join(f"({letter}) {text}" for letter, text in zip(LETTERS, options, strict=False))
    return choice_prompt.format(question=question, options=lettered)


def conversation_text(question: str, earlier: Sequence[tuple[str, str]] = (), prompt: str = PROMPT,
                      turn_prompt: str = TURN_PROMPT, separator: str = TURN_SEPARATOR) -> str:
    """The prompt of a conversation's turn: the first turn in `prompt`, each earlier answer after its
    question (`" " + answer`, then `separator`), each later turn in `turn_prompt`. `earlier` holds the
    (question, answer) pairs of the turns before this one. Video-LLaVA's template (conv_llava_v1):
    `USER: <video>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:`."""
    turns = [q for q, _ in earlier] + [question]
    text = prompt.format(question=turns[0])
    for (_, answer), asked in zip(earlier, turns[1:], strict=True):
        text += (f" {answer}" if answer else "") + separator + turn_prompt.format(question=asked)
    return text


@dataclass(frozen=True)
class Templates:
    """The conversation around the video and the questions (`AnswerConfig`'s prompt fields)."""

    prompt: str = PROMPT  # the first turn: holds the video once and {question}
    turn_prompt: str = TURN_PROMPT  # each later turn: {question}, no video
    turn_separator: str = TURN_SEPARATOR  # closes each earlier answer


@dataclass(frozen=True)
class PromptIds:
    """One prompt's token ids: the whole text as the tokenizer reads it, the video placeholder once."""

    ids: list[int]
    video_at: int  # index of the placeholder in `ids`


class PromptBuilder:
    """Token ids of prompts in one template, and the template's shared head (see the module doc)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, video_token_id: int,
                 templates: Templates | None = None) -> None:
        self.tokenizer, self.video_token_id = tokenizer, video_token_id
        self.templates = templates or Templates()
        self.video_token = tokenizer.convert_ids_to_tokens(video_token_id)
        for key in ("prompt", "turn_prompt"):
            text = getattr(self.templates, key)
            if "{question}" not in text:
                raise ValueError(f"invalid answer settings: {key} must contain {{question}}, got {text!r}")
            count, wanted = text.count(self.video_token), (1 if key == "prompt" else 0)
            if count != wanted:
                raise ValueError(f"invalid answer settings: {key} must contain {self.video_token} "
                                 f"{'once' if wanted else 'never'}, got {text!r}")
        self.head, self.head_note = self._shared_head()
        if self.head_note:
            log.info("%s", self.head_note)

    def text(self, question: str, earlier: Sequence[tuple[str, str]] = ()) -> str:
        t = self.templates
        return conversation_text(question, earlier, t.prompt, t.turn_prompt, t.turn_separator)

    def prompt(self, question: str, earlier: Sequence[tuple[str, str]] = (), index: int = 0) -> PromptIds:
        """The ids of `question` asked after the `earlier` (question, answer) turns; `index` names the
        question in errors."""
        if not isinstance(question, str):
            raise ValueError(f"question {index} must be a string, got {type(question).__name__}")
        return self.prompt_of_text(self.text(question, earlier), index)

    def prompt_of_text(self, text: str, index: int = 0) -> PromptIds:
        """The ids of a whole prompt text, which must hold the video placeholder once."""
        ids = self.tokenizer(text).input_ids
        if ids.count(self.video_token_id) != 1:
            raise ValueError(f"question {index} must not contain {self.video_token}: {text!r}")
        return PromptIds(ids, ids.index(self.video_token_id))

    def continuation_ids(self, prompt: str, answer: str, index: int = 0) -> list[int]:
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
        return [*joined[len(prompt_ids):], self.tokenizer.eos_token_id]

    def _shared_head(self) -> tuple[list[int], str | None]:
        """(head ids, why nothing is shared or None): steps 1-4 of the module doc's rule."""
        template = self.templates.prompt
        before, after = template.split(self.video_token, 1)
        if "{question}" in before:
            segments = self.tokenizer(before.split("{question}")[0].rstrip(" ")).input_ids
        else:
            middle = after.split("{question}")[0].rstrip(" ")
            segments = (self.tokenizer(before).input_ids + [self.video_token_id]
                        + self._continuation(middle))
        head = segments
        for probe in _PROBES:
            whole = self.tokenizer(template.format(question=probe)).input_ids
            head = head[: next((i for i, (a, b) in enumerate(zip(head, whole, strict=False)) if a != b),
                               min(len(head), len(whole)))]
        if self.video_token_id in head:
            return head, None
        return head, (f"prompt {template!r}: the video is not in the tokens every question shares "
                      f"({'it comes after {question}' if '{question}' in before else 'its seam is unstable'})"
                      ": each question reads it (a conversation's later turns still extend their cache)")

    def _continuation(self, text: str) -> list[int]:
        """`text` tokenized as it reads after the video placeholder (no prefix space)."""
        if not text:
            return []
        ids = self.tokenizer(self.video_token + text, add_special_tokens=False).input_ids
        if ids[0] != self.video_token_id:
            raise ValueError(f"the tokenizer does not read {self.video_token} as one token")
        return ids[1:]
