"""Answer stage: Video-LLaVA's LLM reads a prompt with the visual embeddings spliced in, and generates.

The prompt is Video-LLaVA's `USER: <video>\\n{question} ASSISTANT:`. Its single `<video>` token is
replaced by the video's M embeddings by building `inputs_embeds` directly. The alternative, writing M
`<video>` placeholders and passing features for HF to `masked_scatter`, needs the placeholder count to
match each video's M, which after temporal merging differs per video; counting fake tokens in text buys
nothing. Splicing embeddings is exact (a test checks it against HF's own placeholder path) and lets
several questions reuse one video's embeddings without re-encoding.

**Prefix reuse** (`generation.reuse_prefix`, on by default). Every prompt about a video starts with the
same tokens: the template's text before `{question}` (`USER: <video>\\n`), the visual tokens among them,
which are nearly all of the prompt. The LLM reads that prefix once per video (a batch of videos, left-
padded, in one forward) and keeps its key/value cache; each question, and each turn of a conversation,
then reads only its own tokens on a copy of that cache (`DynamicCache`, expanded to the batch), inside
`generate`. Causal attention makes it the same computation as reading the whole prompt: the answers are
those of the path without reuse (`reuse_prefix=false`, kept for the parity tests). A template whose
`<video>` comes after `{question}` shares nothing and takes that path.

**Conversations**: the questions of a conversation are its turns, asked in order, each prompt holding the
earlier turns with the model's own answers in Video-LLaVA's template (`conv_llava_v1`, without its system
line, as the single-turn prompt): `USER: <video>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:`
(`conversation_text`).

**Engines** (`engine`): `hf` is transformers' `generate` here; `vllm` sends the same spliced prompts as
embeddings to vLLM running the exported language model (`stages.vllm_engine`).

HF batches are left-padded (generation appends on the right) with an attention mask; `generate` derives
position ids from the mask, and `build_inputs` returns them for a direct forward.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LlamaModel,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    VideoLlavaForConditionalGeneration,
)

from stages.columns import RowErrors, from_column
from stages.model import ModelConfig, load_model
from stages.vllm_engine import VllmConfig

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
TASKS = ("qa", "caption")
ENGINES = ("hf", "vllm")
# batch column <- Answer field
_COLUMNS = {
    "predictions": "text",
    "prompt_tokens": "prompt_tokens",
    "generated_tokens": "generated_tokens",
    "prefill_seconds": "prefill_seconds",
    "llm_decode_seconds": "llm_decode_seconds",
}
# transformers 5.24 names the key/value cache `cache` (forward argument and output), earlier 5.x releases
# `past_key_values`; vLLM's releases pin transformers below 5.21
_CACHE = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


@dataclass
class Answer:
    """One generated answer. Its times are its share of the batched `generate` call it was part of (the
    call's time divided by its prompts); with prefix reuse, prefill also holds its share of its video's
    prefix forward."""

    text: str
    token_ids: list[int]  # the generated tokens, EOS included when generated
    prompt_tokens: int  # text tokens + visual tokens read by the LLM (padding excluded)
    generated_tokens: int  # new tokens up to and including EOS
    prefill_seconds: float  # prompt forward up to the first token's logits
    llm_decode_seconds: float  # the LLM's remaining new tokens (not video decoding)
    logits: torch.Tensor | None = None  # [generated_tokens, vocab] when the stage records them (tests)


@dataclass
class GenerateConfig:
    """How answers are generated (`generate`'s settings, and how many prompts go through it at once)."""

    max_new_tokens: int = 64
    do_sample: bool = False  # greedy unless set; then temperature and top_p apply
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8  # prompts per `generate` call (left-padded together)
    reuse_prefix: bool = True  # read each video's prompt prefix (its visual tokens) once for all its prompts

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


@dataclass
class _Prompt:
    """One prompt of a stage call: which of the call's videos it is about, and its whole text."""

    video: int
    text: str


@dataclass
class _Prefix:
    """A video's prompt prefix read by the LLM: its per-layer keys and values [1, heads, P, head_dim]."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int
    seconds: float  # its share of the prefix forward, not yet counted in an answer


class AnswerStage:
    """Visual embeddings + questions -> answers. A plain callable, and a Ray Data `map_batches` class.

    `model` is a `ModelConfig` (model and tokenizer are loaded here, the LLM only) or a loaded
    `VideoLlavaForConditionalGeneration`, which then needs its `tokenizer`. With `engine=vllm`, vLLM loads
    the exported LLM of that checkpoint itself (a loaded model is only asked where it came from) and this
    stage keeps only the tokenizer and the token embeddings.
    """

    def __init__(
        self,
        model: ModelConfig | VideoLlavaForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        config: AnswerConfig | None = None,
    ) -> None:
        config = config or AnswerConfig()
        problems = config.problems()
        if problems:
            raise ValueError("invalid answer settings: " + "; ".join(problems))
        self.engine = None
        if config.engine == "vllm":
            if not isinstance(model, ModelConfig):  # e.g. runner=local's shared model: vLLM loads its own
                model = _model_config_of(model)
            from stages.vllm_engine import VllmEngine

            self.engine = VllmEngine(model, config.vllm)
            self.model, tokenizer = None, self.engine.tokenizer
            self.embed_tokens, self.video_token_id = self.engine.embed_tokens, self.engine.video_token_id
            self.dtype = self.engine.dtype
        else:
            if isinstance(model, ModelConfig):
                model, tokenizer = load_model(model, keep="language")
            if tokenizer is None:
                raise ValueError("a loaded model needs its tokenizer: AnswerStage(model, tokenizer)")
            self.model, self.embed_tokens = model, model.get_input_embeddings()
            self.video_token_id, self.dtype = model.config.video_token_id, model.dtype
        self.video_token = tokenizer.convert_ids_to_tokens(self.video_token_id)
        for key in ("prompt", "turn_prompt"):
            count = getattr(config, key).count(self.video_token)
            if count != (1 if key == "prompt" else 0):
                raise ValueError(f"invalid answer settings: {key} must contain {self.video_token} "
                                 f"{'once' if key == 'prompt' else 'never'}, got {getattr(config, key)!r}")
        self.tokenizer = tokenizer
        self.task, self.caption_prompt, self.prompt = config.task, config.caption_prompt, config.prompt
        self.turn_prompt, self.turn_separator = config.turn_prompt, config.turn_separator
        g = config.generation
        self.batch_size, self.reuse_prefix = g.batch_size, g.reuse_prefix
        self.generation_config = self._generation_config(g, tokenizer)
        # the prompt's shared head: its tokens before `{question}`, when they hold the video token
        head = self.tokenizer(self.prompt.split("{question}")[0]).input_ids
        self.prefix_ids = head if self.video_token_id in head else None
        if self.prefix_ids is None and self.reuse_prefix and self.engine is None:
            log.info("prompt %r has %s after {question}: no prefix to share, prefix reuse is off",
                     self.prompt, self.video_token)
        self.prefix_forwards = 0  # videos whose prefix the LLM has read (counted for tests and benches)
        self.record_logits = False  # keep each answer's logits (parity tests)

    @staticmethod
    def _generation_config(g: GenerateConfig, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        """transformers' settings for `g` (the vLLM engine maps them to its own, `sampling_params`)."""
        sampling = {"temperature": g.temperature, "top_p": g.top_p} if g.do_sample else {}
        return GenerationConfig(
            max_new_tokens=g.max_new_tokens,
            do_sample=g.do_sample,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )

    # ------------------------------------------------------------ prompts

    def conversation_text(self, question: str, earlier: Sequence[tuple[str, str]] = ()) -> str:
        """This stage's prompt text for `question` after the `earlier` (question, answer) turns."""
        return conversation_text(question, earlier, self.prompt, self.turn_prompt, self.turn_separator)

    def _prompt_ids(self, text: str, index: int = 0) -> list[int]:
        ids = self.tokenizer(text).input_ids
        if ids.count(self.video_token_id) != 1:
            raise ValueError(f"question {index} must not contain {self.video_token}: {text!r}")
        return ids

    def _embed(self, ids: Sequence[int]) -> torch.Tensor:
        weight = self.embed_tokens.weight
        return self.embed_tokens(torch.as_tensor(list(ids), device=weight.device))

    def _splice(self, ids: Sequence[int], visual: torch.Tensor) -> torch.Tensor:
        """The prompt's embeddings [len(ids) - 1 + M, H]: the text's around the visual ones at `<video>`."""
        at = list(ids).index(self.video_token_id)
        text = self._embed(ids)
        return torch.cat([text[:at], visual.to(text.device, text.dtype), text[at + 1 :]])

    def _check_visual(self, visual: torch.Tensor | np.ndarray, index: int) -> torch.Tensor:
        hidden = self.embed_tokens.embedding_dim
        visual = torch.as_tensor(visual)
        if visual.dim() != 2 or visual.shape[1] != hidden or len(visual) == 0:
            shape = tuple(visual.shape)
            raise ValueError(f"visual embeddings {index} must be [M >= 1, {hidden}], got {shape}")
        return visual

    def build_inputs(
        self,
        embeds: Sequence[torch.Tensor | np.ndarray],
        questions: Sequence[str],
        answers: Sequence[str] | None = None,
        *,
        texts: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Left-padded `inputs_embeds` [B, L, H], `attention_mask` and `position_ids` for prompt i =
        questions[i] with embeds[i] ([M_i, H]) in place of its `<video>` token (`texts`: whole prompt
        texts instead, e.g. a conversation's turn; `questions` is then ignored).

        With `answers` (teacher forcing, for tuning) each prompt is followed by its answer's tokens and
        EOS, and `labels` [B, L] holds those tokens where they sit (-100 elsewhere; HF's convention: the
        logits at position p predict labels[p + 1]).
        """
        count = len(texts) if texts is not None else len(questions)
        if len(embeds) != count or (answers is not None and len(answers) != count):
            raise ValueError(
                f"got {len(embeds)} visual embeddings for {count} questions"
                + ("" if answers is None else f" and {len(answers)} answers")
            )
        if texts is None:
            for i, question in enumerate(questions):
                if not isinstance(question, str):
                    raise ValueError(f"question {i} must be a string, got {type(question).__name__}")
            texts = [self.prompt.format(question=q) for q in questions]
        hidden, device, dtype = self.embed_tokens.embedding_dim, self.embed_tokens.weight.device, self.dtype
        sequences, targets = [], []
        for i, (visual, prompt) in enumerate(zip(embeds, texts, strict=True)):
            visual = self._check_visual(visual, i)
            ids = self._prompt_ids(prompt, i)
            answer = None if answers is None else self.continuation_ids(prompt, answers[i], i)
            if answer is not None:
                ids = ids + answer.tolist()
            sequences.append(self._splice(ids, visual))
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

    # ------------------------------------------------------------ answering

    @torch.inference_mode()
    def answer(self, embeds: Sequence[torch.Tensor | np.ndarray], questions: Sequence[str]) -> list[Answer]:
        """Answer questions[i] about the video with embeddings embeds[i], `batch_size` at a time; answers
        come back in input order. Questions given the same embeddings object are one video's: with prefix
        reuse its prefix is read once for all of them."""
        if len(embeds) != len(questions):
            raise ValueError(f"got {len(embeds)} visual embeddings for {len(questions)} questions")
        videos: list[torch.Tensor | np.ndarray] = []
        index: dict[int, int] = {}
        prompts = []
        for i, (visual, question) in enumerate(zip(embeds, questions, strict=True)):
            if not isinstance(question, str):
                raise ValueError(f"question {i} must be a string, got {type(question).__name__}")
            if id(visual) not in index:
                index[id(visual)] = len(videos)
                videos.append(visual)
            prompts.append(_Prompt(index[id(visual)], self.prompt.format(question=question)))
        return self._answer_prompts(videos, prompts, {})

    def _answer_prompts(self, videos: Sequence, prompts: list[_Prompt], prefixes: dict[int, _Prefix]
                        ) -> list[Answer]:
        """Answer whole prompt texts about the call's `videos`; `prefixes` holds the videos' prefixes
        already read in this call (a conversation's later turns reuse them) and gains the new ones."""
        visuals = {p.video: self._check_visual(videos[p.video], p.video) for p in prompts}
        ids = [self._prompt_ids(p.text, i) for i, p in enumerate(prompts)]
        if self.engine is not None:
            return self._answer_vllm(visuals, prompts, ids)
        head = self.prefix_ids
        shared = [i for i in range(len(prompts)) if self.reuse_prefix and head is not None
                  and ids[i][: len(head)] == head and len(ids[i]) > len(head)]
        plain = sorted(set(range(len(prompts))) - set(shared), key=lambda i: len(visuals[prompts[i].video]))
        answers: dict[int, Answer] = {}
        for start in range(0, len(plain), self.batch_size):
            chunk = plain[start : start + self.batch_size]
            sequences = [self._splice(ids[i], visuals[prompts[i].video]) for i in chunk]
            answers.update(zip(chunk, self._generate(sequences), strict=True))
        if shared:
            self._read_prefixes(sorted({prompts[i].video for i in shared}), visuals, prefixes)
            order = sorted(shared, key=lambda i: (prefixes[prompts[i].video].length, prompts[i].video))
            counts: dict[int, int] = {}
            for i in shared:
                counts[prompts[i].video] = counts.get(prompts[i].video, 0) + 1
            spent = {v: prefixes[v].seconds / counts[v] for v in counts}  # each prompt's share of its prefix
            for v in counts:
                prefixes[v].seconds = 0.0
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                results = self._generate_on_prefixes([prefixes[prompts[i].video] for i in chunk],
                                                     [ids[i][len(head):] for i in chunk])
                for i, result in zip(chunk, results, strict=True):
                    result.prefill_seconds += spent[prompts[i].video]
                    answers[i] = result
        return [answers[i] for i in range(len(prompts))]

    def _read_prefixes(self, videos: list[int], visuals: dict[int, torch.Tensor],
                       prefixes: dict[int, _Prefix]) -> None:
        """Read the prefix of each video not in `prefixes` yet: `batch_size` videos per forward,
        left-padded; each video keeps its own keys and values (the padding cut off)."""
        new = sorted((v for v in videos if v not in prefixes), key=lambda v: len(visuals[v]))
        lm = self.model.model.language_model
        for start in range(0, len(new), self.batch_size):
            chunk = new[start : start + self.batch_size]
            sequences = [self._splice(self.prefix_ids, visuals[v]) for v in chunk]
            inputs, mask = _left_padded(sequences, self.dtype)
            began = time.perf_counter()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = lm(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=True)
            cache = getattr(out, _CACHE)
            seconds = _synchronized(inputs) - began
            width = inputs.shape[1]
            for row, (v, seq) in enumerate(zip(chunk, sequences, strict=True)):
                layers = [(k[row : row + 1, :, width - len(seq) :], val[row : row + 1, :, width - len(seq) :])
                          for k, val in _cache_layers(cache)]
                prefixes[v] = _Prefix(layers, len(seq), seconds / len(chunk))
            self.prefix_forwards += len(chunk)

    def _generate_on_prefixes(self, prefixes: list[_Prefix], tails: list[list[int]]) -> list[Answer]:
        """Generate for prompts whose prefixes are read: each prompt's cache is its video's (left-padded
        to the batch's longest prefix), its own tokens follow, left-padded to the longest tail (so the
        padding sits between the prefix and the tail; the attention mask skips it and the positions
        count only real tokens)."""
        width = max(p.length for p in prefixes)
        tail_width = max(len(t) for t in tails)
        rows = len(prefixes)
        layers = []
        for layer in range(len(prefixes[0].layers)):
            keys, values = prefixes[0].layers[layer]
            shape = (rows, keys.shape[1], width, keys.shape[3])
            k_all = keys.new_zeros(shape)
            v_all = values.new_zeros((rows, values.shape[1], width, values.shape[3]))
            for row, prefix in enumerate(prefixes):
                k, v = prefix.layers[layer]
                k_all[row, :, width - prefix.length :] = k[0]
                v_all[row, :, width - prefix.length :] = v[0]
            layers.append((k_all, v_all))
        cache = DynamicCache(ddp_cache_data=layers)
        weight = self.embed_tokens.weight
        hidden = self.embed_tokens.embedding_dim
        inputs = torch.zeros(rows, width + tail_width, hidden, device=weight.device, dtype=self.dtype)
        mask = torch.zeros(rows, width + tail_width, device=weight.device, dtype=torch.long)
        for row, (prefix, tail) in enumerate(zip(prefixes, tails, strict=True)):
            mask[row, width - prefix.length : width] = 1
            inputs[row, width + tail_width - len(tail) :] = self._embed(tail)
            mask[row, width + tail_width - len(tail) :] = 1
        return self._generate_call(inputs, mask, {_CACHE: cache})

    def _generate(self, sequences: list[torch.Tensor]) -> list[Answer]:
        """Generate for whole prompts' embeddings, left-padded into one batch."""
        inputs, mask = _left_padded(sequences, self.dtype)
        return self._generate_call(inputs, mask, {})

    def _generate_call(self, inputs: torch.Tensor, mask: torch.Tensor, extra: dict) -> list[Answer]:
        timer = _FirstLogitsTimer()
        config = copy.copy(self.generation_config)  # as set now (a bench may change it after __init__)
        config.return_dict_in_generate, config.output_logits = True, self.record_logits
        start = time.perf_counter()
        out = self.model.generate(
            inputs_embeds=inputs,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([timer]),
            **extra,
        )
        end = time.perf_counter()
        share = len(inputs)  # each answer carries its share of the batched call's times
        prefill = timer.first - start
        eos = self.tokenizer.eos_token_id
        answers = []
        for row, tokens in enumerate(out.sequences.tolist()):
            generated = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            logits = (torch.stack([step[row] for step in out.logits[:generated]]) if self.record_logits
                      else None)
            answers.append(
                Answer(
                    text=self.tokenizer.decode(tokens[:generated], skip_special_tokens=True).strip(),
                    token_ids=tokens[:generated],
                    prompt_tokens=int(mask[row].sum()),
                    generated_tokens=generated,
                    prefill_seconds=prefill / share,
                    llm_decode_seconds=(end - timer.first) / share,
                    logits=logits,
                )
            )
        return answers

    def _answer_vllm(self, visuals: dict[int, torch.Tensor], prompts: list[_Prompt], ids: list[list[int]]
                     ) -> list[Answer]:
        sequences = [self._splice(i, visuals[p.video]) for i, p in zip(ids, prompts, strict=True)]
        generated = self.engine.generate(sequences, self.generation_config)
        eos = self.tokenizer.eos_token_id
        answers = []
        for seq, result in zip(sequences, generated, strict=True):
            tokens = result.token_ids
            tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
            answers.append(Answer(text=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                                  token_ids=tokens, prompt_tokens=len(seq), generated_tokens=len(tokens),
                                  prefill_seconds=result.prefill_seconds,
                                  llm_decode_seconds=result.decode_seconds))
        return answers

    # ------------------------------------------------------------ the batch callable

    def __call__(self, batch: dict) -> dict:
        """Ray Data / local batch, one row per video: `visual_embeds` ([M, H] per row) and, for `qa`,
        `questions` (a list of questions per row) -> list columns aligned with `questions`:
        `predictions`, `prompt_tokens`, `generated_tokens`, `prefill_seconds`, `llm_decode_seconds`;
        `visual_embeds` is dropped.

        Conversations (`qa`): with columns `conversations` (per question: its conversation's id, "" for
        none), `turns` (its turn, 1..n) and `history` (per row, JSON: {conversation: {turn: [question,
        answer]}} of the turns answered before this run), the questions of a conversation are asked in
        turn order, each prompt holding the earlier turns with their answers (`conversation_text`); the
        video's prefix is read once for all of them.

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
        talks = _conversations(batch, asked) if self.task == "qa" else [None] * len(embeds)
        rows = [row for row, visual in enumerate(embeds) if errors.ok(row) and visual is not None]
        per_row: dict[int, list[Answer]] = {}
        try:
            per_row = self._answer_rows(rows, embeds, asked, talks)
        except Exception:  # noqa: BLE001 - isolate the failing video(s) below
            for row in rows:
                try:
                    per_row.update(self._answer_rows([row], embeds, asked, talks))
                except Exception as err:  # noqa: BLE001 - one video's failure becomes its error
                    errors.fail(row, f"answer: {type(err).__name__}: {err}")
        out = {k: v for k, v in batch.items() if k not in ("visual_embeds", "visual_embeds_dtype")}
        for column, attribute in _COLUMNS.items():
            out[column] = [
                [getattr(a, attribute) for a in per_row[row]] if row in per_row else None
                for row in range(len(embeds))
            ]
        return {**out, **errors.columns()}

    @torch.inference_mode()
    def _answer_rows(self, rows: list[int], embeds: list, asked: list[list[str]],
                     talks: list[_Talks | None]) -> dict[int, list[Answer]]:
        """The rows' questions in rounds: every standalone question and each conversation's first turn,
        then each conversation's next turn with the answers so far, until all are asked. Each video's
        prefix is read in the first round and reused by the later ones."""
        videos = [embeds[row] for row in rows]
        plan = {row: (talks[row] or _Talks.single(len(asked[row]))) for row in rows}
        found: dict[tuple[int, int], Answer] = {}
        prefixes: dict[int, _Prefix] = {}
        for rnd in range(max((p.rounds for p in plan.values()), default=0)):
            keys, prompts = [], []
            for video, row in enumerate(rows):
                for i in plan[row].asked_in(rnd):
                    earlier = plan[row].earlier(i, asked[row], found, row)
                    keys.append((row, i))
                    prompts.append(_Prompt(video, self.conversation_text(asked[row][i], earlier)))
            found.update(zip(keys, self._answer_prompts(videos, prompts, prefixes), strict=True))
        return {row: [found[(row, i)] for i in range(len(asked[row]))] for row in rows}


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

    def __post_init__(self) -> None:
        # the round each question is asked in: a conversation's turns one round apart, in turn order
        self.round = [0] * len(self.conversation)
        for name in {c for c in self.conversation if c}:
            members = sorted((self.turn[i], i) for i, c in enumerate(self.conversation) if c == name)
            for rnd, (_, i) in enumerate(members):
                self.round[i] = rnd
        self.rounds = max(self.round, default=-1) + 1

    def asked_in(self, rnd: int) -> list[int]:
        return [i for i, r in enumerate(self.round) if r == rnd]

    def earlier(self, i: int, asked: list[str], found: dict[tuple[int, int], Answer], row: int
                ) -> list[tuple[str, str]]:
        """The (question, answer) pairs of the turns before question i's: answered before this run, or by
        this run's earlier rounds."""
        name, turn = self.conversation[i], self.turn[i]
        if not name:
            return []
        here = {self.turn[j]: j for j, c in enumerate(self.conversation) if c == name}
        pairs = []
        for earlier in range(1, turn):
            if earlier in here and (row, here[earlier]) in found:
                pairs.append((asked[here[earlier]], found[(row, here[earlier])].text))
            elif earlier in self.history.get(name, {}) and self.history[name][earlier][1] is not None:
                pairs.append(self.history[name][earlier])
            else:
                raise ValueError(f"conversation {name!r}: turn {turn} needs the answer of turn {earlier}, "
                                 "which has none")
        return pairs


def _conversations(batch: dict, asked: list[list[str]]) -> list[_Talks | None]:
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


def _left_padded(sequences: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, H] embeddings and [B, L] mask of sequences [L_i, H], padded on the left."""
    length = max(len(seq) for seq in sequences)
    first = sequences[0]
    inputs = torch.zeros(len(sequences), length, first.shape[1], device=first.device, dtype=dtype)
    mask = torch.zeros(len(sequences), length, device=first.device, dtype=torch.long)
    for row, seq in enumerate(sequences):
        inputs[row, length - len(seq) :] = seq
        mask[row, length - len(seq) :] = 1
    return inputs, mask


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _synchronized(tensor: torch.Tensor) -> float:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


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
