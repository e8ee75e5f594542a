"""The answer engine's interface: videos and conversations in, answers (with their times) out.

An engine answers `Conversation`s about `Video`s: a standalone question is a conversation of one turn; the
turns of a conversation are asked in order, each after the earlier ones with the model's own answers
(`PromptBuilder.prompt`). Engines: `stages.engine_hf.HfEngine` (transformers) and
`stages.vllm_engine.VllmEngine`. Both build the same prompt ids and splice the same embeddings
(`spliced`), so greedy answers agree.

Positions: each video may carry the position ids of its visual tokens (`Video.positions`, offsets from
the first visual slot, non-decreasing: e.g. the kept tokens' places among all of a clip's tokens); None is
consecutive (0..M-1). Text before the video counts from 0, the visual tokens sit at `a + offset` (a =
the tokens before them), the text after them continues at `a + span` (`Video.span`, default: last offset +
1; e.g. the clip's full token count, so the text stands where it would with every token kept). An
engine that cannot take them has `accepts_positions = False` and says so before any work
(`position_problems`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from stages.prompts import PromptIds


@dataclass(frozen=True)
class Sampling:
    """How answers are generated, for any engine."""

    max_new_tokens: int = 64
    do_sample: bool = False  # greedy unless set; then temperature and top_p apply
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 0  # benches force long answers with it


@dataclass
class Video:
    """One video's visual embeddings [M, hidden] and, optionally, their position ids [M] and the positions
    the video spans (see module)."""

    embeds: torch.Tensor
    positions: torch.Tensor | None = None
    span: int | None = None


@dataclass
class Conversation:
    """Turns to ask about `videos[video]`, in order, after the `earlier` (question, answer) turns that were
    answered before (a resumed run)."""

    video: int
    questions: list[str]
    earlier: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Answer:
    """One generated answer. Its times are its share of the engine calls it was part of (the call's time
    divided by its prompts); prefill also holds its share of its video's prefix read, when it had one."""

    text: str
    token_ids: list[int]  # the generated tokens, EOS included when generated
    prompt_tokens: int  # text tokens + visual tokens of the whole prompt (padding excluded)
    generated_tokens: int  # new tokens up to and including EOS
    prefill_seconds: float  # prompt forward up to the first token's logits
    llm_decode_seconds: float  # the LLM's remaining new tokens (not video decoding)
    logits: torch.Tensor | None = None  # [generated_tokens, vocab] when the engine records them (tests)


class Engine(Protocol):
    accepts_positions: bool

    def generate(self, videos: Sequence[Video], conversations: Sequence[Conversation], sampling: Sampling
                 ) -> list[list[Answer]]:
        """Each conversation's answers, one per question, in order."""
        ...

    def close(self) -> None: ...


def position_problems(engine: str, accepts_positions: bool, custom_positions: bool) -> list[str]:
    """The settings problem of asking custom visual positions of an engine that cannot take them."""
    if custom_positions and not accepts_positions:
        return [f"engine={engine} cannot take the visual tokens' position ids (its prompts are embeddings "
                "read at consecutive positions): use engine=hf"]
    return []


def check_video(video: Video, index: int, hidden: int) -> Video:
    """`video` with tensors, checked: embeds [M >= 1, hidden]; positions, when given, [M] integers >= 0,
    non-decreasing; span, when given, an integer beyond the last offset. Errors name the video `index`."""
    embeds = torch.as_tensor(video.embeds)
    if embeds.dim() != 2 or embeds.shape[1] != hidden or len(embeds) == 0:
        raise ValueError(f"visual embeddings {index} must be [M >= 1, {hidden}], got {tuple(embeds.shape)}")
    positions = video.positions
    if positions is not None:
        positions = torch.as_tensor(np.asarray(positions))
        if (positions.dtype.is_floating_point or positions.dtype == torch.bool
                or positions.shape != (len(embeds),)):
            raise ValueError(f"visual positions {index} must be [{len(embeds)}] integers, got "
                             f"{tuple(positions.shape)} {positions.dtype}")
        if len(positions) and (positions.min() < 0 or bool((positions.diff() < 0).any())):
            raise ValueError(f"visual positions {index} must be >= 0 and non-decreasing")
        positions = positions.long()
    span = video.span
    if span is not None:
        last = int(positions[-1]) if positions is not None else len(embeds) - 1
        if isinstance(span, bool) or not isinstance(span, int | np.integer) or span <= last:
            raise ValueError(f"visual span {index} must be an integer > the last visual offset {last}, "
                             f"got {span!r}")
        span = int(span)
    return Video(embeds, positions, span)


def expanded_length(prompt: PromptIds, video: Video) -> int:
    """Tokens the LLM reads for `prompt`: its text tokens and the video's visual tokens."""
    return len(prompt.ids) - 1 + len(video.embeds)


def prompt_positions(prompt: PromptIds, video: Video) -> torch.Tensor:
    """Position ids [expanded_length] of `prompt` with `video` spliced in (module doc)."""
    a, count = prompt.video_at, len(video.embeds)
    offsets = video.positions if video.positions is not None else torch.arange(count)
    after = len(prompt.ids) - a - 1
    span = video.span if video.span is not None else int(offsets[-1]) + 1
    return torch.cat([torch.arange(a), a + offsets, a + span + torch.arange(after)])


def token_keys(prompt: PromptIds, video: Video) -> list[int]:
    """What each of the prompt's LLM tokens is, comparable between prompts about one video: a text token's
    id, or -(j + 1) for visual token j."""
    return [*prompt.ids[: prompt.video_at], *range(-1, -len(video.embeds) - 1, -1),
            *prompt.ids[prompt.video_at + 1 :]]


def spliced(embed_tokens: torch.nn.Embedding, prompt: PromptIds, video: Video, dtype: torch.dtype
            ) -> torch.Tensor:
    """The prompt's embeddings [expanded_length, hidden]: its text's around the visual ones."""
    weight = embed_tokens.weight
    text = embed_tokens(torch.as_tensor(prompt.ids, device=weight.device)).to(dtype)
    a = prompt.video_at
    return torch.cat([text[:a], video.embeds.to(weight.device, dtype), text[a + 1 :]])


def answer_text(tokenizer, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def until_eos(token_ids: list[int], eos: int | None) -> list[int]:
    """The generated tokens up to and including the first EOS."""
    return token_ids[: token_ids.index(eos) + 1] if eos is not None and eos in token_ids else token_ids
