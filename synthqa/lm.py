"""Phase 2 of training the synth model: with the tower frozen, the multimodal projector and the LLM learn
to answer.

The loss is on the answer token and EOS, after the answer stage's own prompt (`stages.answer.PROMPT`),
so training and inference read exactly the same prompt. Every question of a clip shares the clip's
visual prefix, which the LLM reads once (`shared_prefix_logits`). Among 520 visual tokens a
from-scratch LLM stays on a plateau (about 70%: it answers about whichever object, never binding the
question's object) for thousands of steps, so `synthqa.train` calls `train_lm` once per phase of a
curriculum of token subsets (`synthqa.subsets.TokenSubsets`; the phases and their flags are in its doc).
With `motion_weight`, a training-only probe (`MotionProbe`) also asks the LLM's visual tokens which way
their object moves: without it direction stayed at chance.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase, VideoLlavaForConditionalGeneration

from stages import kv_cache
from stages.prompts import PROMPT
from synthqa.clips import DIRECTIONS, NUM_FRAMES, TrainingSample, training_samples
from synthqa.model import answer_token_ids, save_checkpoint, visual_features
from synthqa.optim import batches, optimizer_and_schedule, optimizer_step
from synthqa.scoring import quick_accuracy
from synthqa.subsets import TokenSubsets, subset_index, tokens_at
from synthqa.tower import frame_label_batch
from visionzip.video_llava import project

log = logging.getLogger("vzpipe.train")


class MotionProbe(nn.Module):
    """Training-only readout of the LLM's hidden state at visual tokens: which way the object that a
    patch shows moves (`patch_direction`), from patches in the second half of the clip.

    The answer loss alone never taught the small LLM direction (it stayed at chance even trained on
    direction alone): the answer needs a circuit that compares an object's place across frames, and
    nothing rewards its parts before it works. This dense loss rewards them where they can form: a
    later frame's object patch attends (causally) to the same object's earlier patches and tells how
    its row and column changed. The question then reads it from the object's patches, as it reads the
    shape. It is dropped from the saved model. Measured: on in the first curriculum phase too, it kept
    the LLM from learning to find the question's object (color and shape near 70%, about whichever
    object), so `synthqa.train` turns it on from the second phase.
    """

    def __init__(self, width: int, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(width, len(DIRECTIONS))

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden [B, M, W] at the visual tokens, labels [B, M] (0 = no target, else 1 + direction)."""
        return F.cross_entropy(self.head(hidden).flatten(0, 1), labels.flatten() - 1, ignore_index=-1)


def motion_labels(patch_direction: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[clips, M] `MotionProbe` targets of the tokens `index` chose (`subset_index`): 1 + direction of
    the object a patch shows in frames T/2.., else 0 (CLS, background, early frames).
    `patch_direction` [clips * T, P]: `frame_label_batch`'s."""
    clips = len(index)
    direction = patch_direction.reshape(clips, NUM_FRAMES, -1)
    late = torch.arange(NUM_FRAMES)[:, None] >= NUM_FRAMES // 2
    per_token = torch.cat([torch.zeros(clips, NUM_FRAMES, 1, dtype=torch.long),
                           direction * late], dim=2).flatten(1)  # fmt: skip
    return per_token.gather(1, index)


def shared_prefix_logits(model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                         samples: list[TrainingSample], targets: torch.Tensor,
                         augment: TokenSubsets | None = None, generator: torch.Generator | None = None,
                         motion: MotionProbe | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, motion loss): logits [B * Q, 2, vocab] for every question of every clip, at the prompt's
    last token (predicts the answer) and at the answer token (predicts EOS); `targets` [B * Q] are the
    answer tokens. The motion loss is `motion`'s on the LLM's visual tokens, None without it.

    Every prompt of a clip starts with the same tokens (`USER: <video>\n`), so the LLM reads that long
    prefix (the visual tokens) once per clip and each question continues from its key/value cache: the
    same numbers as one prompt at a time (causal attention), Q times cheaper. The tower runs without
    gradients (frozen in phase 2); the projector and the LLM with them. `augment` (with its `generator`)
    shows the LLM random token subsets, see `TokenSubsets`.
    """
    features = visual_features(model, samples)
    frames, n, _ = features.shape
    needs_labels = motion is not None or (augment is not None and augment.objects)
    labels = frame_label_batch(samples) if needs_labels else None
    objects = labels["patch_color"] > 0 if augment is not None and augment.objects else None
    index = subset_index(frames, n, len(samples), augment, generator, objects)
    visual = project(model, tokens_at(features, len(samples), index))  # [B, M, H]
    texts = [PROMPT.format(question=q.question) for s in samples for q in s.questions]
    ids = [tokenizer(t).input_ids for t in texts]
    common = next(i for i in range(min(map(len, ids))) if len({row[i] for row in ids}) > 1)
    at = ids[0].index(model.config.video_token_id)
    if at >= common:
        raise ValueError("the prompts must share the tokens up to and including the video placeholder")
    embed = model.get_input_embeddings()
    head = torch.tensor(ids[0][:common])
    prefix = torch.cat([embed(head[:at]).expand(len(samples), -1, -1), visual,
                        embed(head[at + 1 :]).expand(len(samples), -1, -1)], 1)  # fmt: skip
    lm = model.model.language_model
    cache = kv_cache.new_cache(lm.config)
    out = lm(inputs_embeds=prefix, use_cache=True, output_hidden_states=motion is not None,
             **{kv_cache.CACHE: cache})
    motion_loss = None
    if motion is not None:
        hidden = out.hidden_states[motion.layer][:, at : at + visual.shape[1]]
        motion_loss = motion.loss(hidden, motion_labels(labels["patch_direction"], index))
    per_clip = len(ids) // len(samples)
    cache.batch_repeat_interleave(per_clip)
    tails = [row[common:] + [int(t)] for row, t in zip(ids, targets, strict=True)]
    width = max(map(len, tails))
    tail_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in tails])
    mask = torch.ones(len(tails), prefix.shape[1] + width, dtype=torch.long)
    for row, tail in enumerate(tails):
        mask[row, prefix.shape[1] + len(tail) :] = 0
    positions = prefix.shape[1] + torch.arange(width).expand(len(tails), -1)
    hidden = lm(inputs_embeds=embed(tail_ids), attention_mask=mask, position_ids=positions, use_cache=True,
                **{kv_cache.CACHE: cache}).last_hidden_state  # fmt: skip
    last = torch.tensor([len(tail) - 2 for tail in tails])  # the prompt's last token
    rows = torch.arange(len(tails))[:, None]
    return model.lm_head(hidden[rows, torch.stack([last, last + 1], 1)]), motion_loss


def train_lm(model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, steps: int,
             clips: int = 8, lr: float = 1e-3, seed: int = 1, log_every: int = 25,
             eval_every: int = 0, eval_samples: list[TrainingSample] | None = None,
             save_to: str | Path | None = None, augment: TokenSubsets | None = None,
             per_type: int = 1, motion_weight: float = 0.0, motion_layer: int = 2) -> list[float]:
    """Phase 2 (see module doc): answer token + EOS loss, tower frozen, `clips` clips (x `per_type`
    questions of each of the 5 types) per step. Every `eval_every` steps: accuracy on `eval_samples`
    logged, checkpoint saved to `save_to`. `augment`: token subsets (`TokenSubsets`) instead of all
    tokens. `motion_weight`: of a `MotionProbe` loss on the output of LLM block `motion_layer` (0 = off).
    Returns the step losses (answer + EOS only).
    (Projector-only tuning on compressed tokens is `pipeline=tune`, `pipelines.tune`.)"""
    model.model.video_tower.requires_grad_(False)
    torch.manual_seed(seed)
    motion = MotionProbe(model.config.text_config.hidden_size, motion_layer) if motion_weight else None
    params = [p for p in model.parameters() if p.requires_grad] + ([*motion.parameters()] if motion else [])
    optimizer, scheduler = optimizer_and_schedule(params, lr, steps)
    generator = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    model.train()
    losses, motion_losses = [], []
    start = time.perf_counter()
    samples = training_samples(seed, per_type=per_type)
    for step, batch in zip(range(steps), batches(samples, clips), strict=False):
        target = answer_token_ids(tokenizer, [q.answer for s in batch for q in s.questions])
        logits, motion_loss = shared_prefix_logits(model, tokenizer, batch, target, augment, generator,
                                                   motion)
        labels = torch.stack([target, torch.full_like(target, eos)], 1)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        losses.append(loss.item())
        if motion_loss is not None:
            motion_losses.append(motion_loss.item())
            loss = loss + motion_weight * motion_loss
        optimizer_step(optimizer, scheduler, params, loss)
        if log_every and (step + 1) % log_every == 0:
            log.info("lm step %d/%d loss %.4f%s (%.0f s)", step + 1, steps, np.mean(losses[-log_every:]),
                     f" motion {np.mean(motion_losses[-log_every:]):.4f}" if motion else "",
                     time.perf_counter() - start)  # fmt: skip
        if eval_every and eval_samples and (step + 1) % eval_every == 0:
            accuracy = quick_accuracy(model, tokenizer, eval_samples)
            log.info("lm step %d accuracy %s", step + 1, json.dumps(accuracy))
            if save_to is not None:
                save_checkpoint(model, tokenizer, save_to)
            model.train()
    model.eval()
    return losses


