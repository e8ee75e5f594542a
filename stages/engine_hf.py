"""The transformers answer engine: `generate` on key/value caches that are read once and extended.

**Prefix reuse** (`reuse_prefix`, on by default). Every prompt about a video starts with the template's
shared head (`PromptBuilder.head`: the text before `<video>`, the visual tokens, the question-independent
text after them). The engine reads the heads of a group of up to `batch_size` videos in one forward
(left-padded) and keeps that cache; each chunk of up to `batch_size` conversations of the group then
starts from a copy of its videos' rows (`kv_cache.select_rows`) and reads only its own tokens, inside
`generate`. Causal attention makes this the computation of reading whole prompts: in float32 the answers
are those of `reuse_prefix=False` (tests).

**Conversations extend their cache**: a chunk keeps its cache from turn to turn; turn k reads only the
tokens of its prompt beyond what the cache holds (the earlier turns, the model's answers as generated).
The cache is compared token by token with turn k's whole prompt (the tokenizer's reading of the text,
as `reuse_prefix=False` reads it): where they part (an answer that re-tokenizes differently, a question
that joins the head's seam differently) the row's later slots are masked out and the prompt is read from
there, so the result is always that of reading the whole prompt. Turn k thus costs its own ~20 tokens, not
the whole conversation again (O(T) tokens over T turns instead of O(T^2)).

**Memory** (KV = bytes of keys and values per token over all layers; B = `batch_size`; P = the longest
head, about the visual tokens M; T = the longest conversation's tokens after its head, its questions and
answers): at any time one group's head cache (<= B x P tokens) and one chunk's cache (<= B x (P + T))
are alive, each row padded to its batch's longest, so the caches take at most KV x B x (2P + T) whatever
the number of videos or questions in the call; a group's cache is dropped when its conversations are
answered, a chunk's when its last turn is. `peak_cache_tokens` records the most token slots alive.

Padding: a batch is left-padded, and a chunk's new tokens are left-padded after its cache, so padding can
sit inside a row; the attention mask skips it and the position ids are explicit (`prompt_positions`), so
they count only real tokens (or follow the video's own positions).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    VideoLlavaForConditionalGeneration,
)

from stages import kv_cache
from stages.engine import (
    Answer,
    Conversation,
    Sampling,
    Video,
    answer_text,
    check_video,
    prompt_positions,
    spliced,
    token_keys,
    until_eos,
)
from stages.prompts import PromptBuilder, PromptIds, Templates


@dataclass
class _Rows:
    """Conversations that share one cache: per row the tokens its cache slots hold (`keys`, see
    `token_keys`), their slots and position ids; `mask` [rows, slots] marks what each row attends to."""

    cache: DynamicCache | None
    mask: torch.Tensor
    keys: list[list[int]]
    slots: list[list[int]]
    positions: list[list[int]]

    def pick(self, rows: Sequence[int], config) -> _Rows:
        """A copy holding `rows` (repeats allowed)."""
        cache = None if self.cache is None else kv_cache.select_rows(self.cache, rows, config)
        return _Rows(cache, self.mask[list(rows)], [list(self.keys[r]) for r in rows],
                     [list(self.slots[r]) for r in rows], [list(self.positions[r]) for r in rows])

    def keep(self, rows: list[int]) -> None:
        """Drop the other rows, in place."""
        if self.cache is not None:
            kv_cache.keep_rows(self.cache, rows)
        self.mask = self.mask[rows]
        self.keys, self.slots, self.positions = ([part[r] for r in rows]
                                                  for part in (self.keys, self.slots, self.positions))

    def tokens(self) -> int:
        return self.mask.numel()


class HfEngine:
    """transformers' `generate` on Video-LLaVA's language model (see the module doc)."""

    accepts_positions = True

    def __init__(self, model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                 templates: Templates | None = None, *, batch_size: int = 8, reuse_prefix: bool = True
                 ) -> None:
        kv_cache.check_transformers()
        self.model, self.tokenizer = model, tokenizer
        self.builder = builder = PromptBuilder(tokenizer, model.config.video_token_id, templates)
        self.lm = model.model.language_model
        self.text_config = model.config.text_config
        self.embed_tokens, self.dtype = model.get_input_embeddings(), model.dtype
        self.batch_size, self.reuse_prefix = batch_size, reuse_prefix
        self.record_logits = False  # keep each answer's logits (parity tests)
        self.prefix_reads = 0  # videos whose head the LLM has read
        self.tokens_read = 0  # tokens the LLM has read before generating (padding excluded)
        self.peak_cache_tokens = 0  # most key/value token slots (rows x width) alive at once
        head = builder.head
        self._head = PromptIds(head, head.index(builder.video_token_id)) if (
            builder.video_token_id in head) else None

    def close(self) -> None:
        """Nothing to stop: the model belongs to the caller."""

    @torch.inference_mode()
    def generate(self, videos: Sequence[Video], conversations: Sequence[Conversation], sampling: Sampling
                 ) -> list[list[Answer]]:
        """Each conversation's answers in order; `batch_size` videos' heads per forward and
        `batch_size` conversations per `generate` call."""
        hidden = self.embed_tokens.embedding_dim
        used = sorted({c.video for c in conversations})
        checked = {v: check_video(videos[v], v, hidden) for v in used}
        config = self._generation_config(sampling)
        answers: dict[int, list[Answer]] = {}
        order = sorted(used, key=lambda v: len(checked[v].embeds))
        for start in range(0, len(order), self.batch_size):
            group = order[start : start + self.batch_size]
            members = sorted((i for i, c in enumerate(conversations) if c.video in group),
                             key=lambda i: (len(conversations[i].questions), conversations[i].video))
            heads, shares = self._read_heads(group, checked, members, conversations)
            for first in range(0, len(members), self.batch_size):
                chunk = members[first : first + self.batch_size]
                rows = (heads.pick([group.index(conversations[i].video) for i in chunk], self.text_config)
                        if heads is not None else self._empty(len(chunk)))
                found = self._converse(rows, [conversations[i] for i in chunk], checked, config,
                                       heads.tokens() if heads is not None else 0)
                for i, got in zip(chunk, found, strict=True):
                    got[0].prefill_seconds += shares.get(i, 0.0)
                    answers[i] = got
            del heads  # this group's videos are answered: their cache goes
        return [answers[i] for i in range(len(conversations))]

    # ------------------------------------------------------------ parts

    def _generation_config(self, sampling: Sampling) -> GenerationConfig:
        tokenizer = self.tokenizer
        chosen = {"temperature": sampling.temperature, "top_p": sampling.top_p} if sampling.do_sample else {}
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
            do_sample=sampling.do_sample, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True, output_logits=self.record_logits, **chosen)

    def _empty(self, rows: int) -> _Rows:
        device = self.embed_tokens.weight.device
        return _Rows(None, torch.zeros(rows, 0, dtype=torch.long, device=device),
                     [[] for _ in range(rows)], [[] for _ in range(rows)], [[] for _ in range(rows)])

    def _read_heads(self, group: list[int], videos: dict[int, Video], members: list[int],
                    conversations: Sequence[Conversation]) -> tuple[_Rows | None, dict[int, float]]:
        """The group's heads read in one forward (left-padded), and each conversation's share of its
        time (added to its first answer's prefill). None without reuse or a head holding the video."""
        if not self.reuse_prefix or self._head is None:
            return None, {}
        head = self._head
        sequences = [spliced(self.embed_tokens, head, videos[v], self.dtype) for v in group]
        positions = [prompt_positions(head, videos[v]) for v in group]
        rows = self._empty(len(group))
        inputs, rows.mask, position_ids = self._append(rows, sequences, positions,
                                                       [token_keys(head, videos[v]) for v in group])
        rows.cache = kv_cache.new_cache(self.text_config)
        began = time.perf_counter()
        self.lm(inputs_embeds=inputs, attention_mask=rows.mask, position_ids=position_ids, use_cache=True,
                **{kv_cache.CACHE: rows.cache})
        seconds = _synchronized(inputs) - began
        self.prefix_reads += len(group)
        self._note_peak(rows.tokens())
        asking = {v: [i for i in members if conversations[i].video == v] for v in group}
        shares = {i: seconds / len(group) / len(asking[v]) for v in group for i in asking[v]}
        return rows, shares

    def _append(self, rows: _Rows, sequences: list[torch.Tensor], positions: list[torch.Tensor],
                keys: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs for reading `sequences` (one per row, [L_r, hidden]) after the rows' cache: embeddings
        [rows, width + W, hidden] (zeros over the cache: `generate` reads only the last W), the attention
        mask and the position ids, each row's new tokens at the right; the rows' bookkeeping gains them."""
        width = rows.mask.shape[1]
        new = max(len(s) for s in sequences)
        device = self.embed_tokens.weight.device
        inputs = torch.zeros(len(sequences), width + new, self.embed_tokens.embedding_dim, device=device,
                             dtype=self.dtype)
        added = torch.zeros(len(sequences), new, dtype=torch.long, device=device)
        position_ids = torch.zeros(len(sequences), width + new, dtype=torch.long, device=device)
        for r, (seq, pos) in enumerate(zip(sequences, positions, strict=True)):
            inputs[r, width + new - len(seq) :] = seq
            added[r, new - len(seq) :] = 1
            position_ids[r, width + new - len(seq) :] = pos.to(device)
            rows.keys[r] += keys[r]
            rows.slots[r] += range(width + new - len(seq), width + new)
            rows.positions[r] += pos.tolist()
        self.tokens_read += sum(len(s) for s in sequences)
        return inputs, torch.cat([rows.mask, added], 1), position_ids

    def _converse(self, rows: _Rows, conversations: list[Conversation], videos: dict[int, Video],
                  config: GenerationConfig, held: int) -> list[list[Answer]]:
        """Ask the conversations' turns in order, round by round on the rows' cache; `held` is the token
        slots of other caches alive meanwhile (the group's heads)."""
        found: list[list[Answer]] = [[] for _ in conversations]
        alive = list(range(len(conversations)))
        for turn in range(max(len(c.questions) for c in conversations)):
            going = [j for j, i in enumerate(alive) if turn < len(conversations[i].questions)]
            if len(going) < len(alive):
                rows.keep(going)
                alive = [alive[j] for j in going]
            if not self.reuse_prefix:  # the re-reading path: every turn reads its whole prompt
                rows = self._empty(len(alive))
            prompts = []
            for i in alive:
                c = conversations[i]
                earlier = [*c.earlier, *zip(c.questions[:turn], (a.text for a in found[i]), strict=True)]
                prompts.append(self.builder.prompt(c.questions[turn], earlier, index=i))
            asked = [videos[conversations[i].video] for i in alive]
            results = self._round(rows, prompts, asked, config, held)
            for i, answer in zip(alive, results, strict=True):
                found[i].append(answer)
        return found

    def _round(self, rows: _Rows, prompts: list[PromptIds], videos: list[Video], config: GenerationConfig,
               held: int) -> list[Answer]:
        """One turn of each row: its prompt beyond what its cache holds, then generation."""
        sequences, positions, keys, lengths = [], [], [], []
        for r, (prompt, video) in enumerate(zip(prompts, videos, strict=True)):
            want = token_keys(prompt, video)
            have = rows.keys[r]
            same = next((k for k, (a, b) in enumerate(zip(have, want, strict=False)) if a != b),
                        min(len(have), len(want)))
            same = min(same, len(want) - 1)  # at least one token to read: the next token's logits
            if same < len(have):  # the cache holds tokens this prompt does not: mask them out
                rows.mask[r, rows.slots[r][same:]] = 0
                del rows.keys[r][same:], rows.slots[r][same:], rows.positions[r][same:]
            sequences.append(spliced(self.embed_tokens, prompt, video, self.dtype)[same:])
            positions.append(prompt_positions(prompt, video)[same:])
            keys.append(want[same:])
            lengths.append(len(want))
        inputs, mask, position_ids = self._append(rows, sequences, positions, keys)
        if rows.cache is None:
            rows.cache = kv_cache.new_cache(self.text_config)
        timer = _FirstLogitsTimer()
        start = time.perf_counter()
        out = self.model.generate(inputs_embeds=inputs, attention_mask=mask, position_ids=position_ids,
                                  generation_config=config, logits_processor=LogitsProcessorList([timer]),
                                  **{kv_cache.CACHE: rows.cache})
        end = _synchronized(out.sequences)
        steps = out.sequences.shape[1]
        width = inputs.shape[1]
        if rows.cache.get_seq_length() != width + steps - 1:
            raise RuntimeError(f"generate left {rows.cache.get_seq_length()} cached tokens, expected "
                               f"{width + steps - 1}: transformers changed how it continues a cache")
        generated = torch.zeros(len(prompts), steps - 1, dtype=torch.long, device=mask.device)
        answers = []
        eos = self.tokenizer.eos_token_id
        share = len(prompts)
        for r, tokens in enumerate(out.sequences.tolist()):
            real = until_eos(tokens, eos)
            cached = min(len(real), steps - 1)  # the last generated token is never read back
            generated[r, :cached] = 1
            last = rows.positions[r][-1]
            rows.keys[r] += real[:cached]
            rows.slots[r] += range(width, width + cached)
            rows.positions[r] += range(last + 1, last + 1 + cached)
            logits = (torch.stack([step[r] for step in out.logits[: len(real)]]) if self.record_logits
                      else None)
            answers.append(Answer(text=answer_text(self.tokenizer, real), token_ids=real,
                                  prompt_tokens=lengths[r], generated_tokens=len(real),
                                  prefill_seconds=(timer.first - start) / share,
                                  llm_decode_seconds=(end - timer.first) / share, logits=logits))
        rows.mask = torch.cat([mask, generated], 1)
        self._note_peak(held + rows.tokens())
        return answers

    def _note_peak(self, tokens: int) -> None:
        self.peak_cache_tokens = max(self.peak_cache_tokens, tokens)


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
