"""Projector tuning (`python tune.py`, conf/tune.yaml): VisionZip's efficient tuning, from questions with
answers (a manifest or a published set, `pipelines.datasets`; multiple choice as the job asks it).

A Video-LLaVA trained on full frames reads a few hundred compressed tokens that it never saw in training.
The paper closes part of that gap by fine-tuning only the multimodal projector on compressed tokens, with
the answer tokens' loss and everything else frozen. Here:

1. Every video of the manifest is decoded and encoded once (the job's decode and compression settings,
   through `DecodeStage` and `EncodeStage.compressed_videos`): the tower is frozen and the compression is
   deterministic, so the tokens before the projector, and their positions for
   `compression.positions=original`, are fixed and kept (on the CPU) for all steps. A video that fails is
   left out and listed in `tune.json`; the rest train.
2. The projector is trained in float32 (a bf16 copy loses small updates), its output cast to the LLM's
   dtype; the LLM reads the answer stage's own prompt (`AnswerStage.build_inputs` with the answers and the
   visual positions, so training and answering build the same sequence at the same position ids), and
   the loss is the cross-entropy of the answer's tokens and EOS. AdamW, linear warm-up then cosine decay
   (transformers' schedule), gradients accumulated over `grad_accum` forward passes and clipped.
3. Every `checkpoint_every` steps and at the end, OUT/projector.safetensors (what `model.projector_path`
   loads) and OUT/tune_state.pt (projector, optimizer, schedule, step, losses) are written, each by
   rename, so a killed job resumes from its last checkpoint: the questions of step s are a pure function of
   (`seed`, s), so a resumed run takes the same steps an uninterrupted one would. One run at a time writes
   OUT: a second one stops at once, naming the first (which holds OUT/tune.lock: `files.exclusive_lock`).

It runs in this process, on the model's device (`model.device=auto`: the GPU when there is one): training
is one process. `stages.model.load_projector` checks the shapes on load.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm
from transformers import (
    PreTrainedTokenizerBase,
    VideoLlavaForConditionalGeneration,
    get_cosine_schedule_with_warmup,
)

from pipelines.config import TuneConfig, TuneJobConfig, check, tune_problems
from pipelines.datasets import read_questions
from pipelines.files import atomic_path, exclusive_lock, write_json
from pipelines.fingerprint import model_fingerprint
from pipelines.job import prepare_model
from pipelines.manifest import ManifestError, Question, group_by_video
from stages.answer import AnswerStage, question_text
from stages.columns import errors_of
from stages.decode import DecodeStage
from stages.encode import CompressedVideo, EncodeStage
from stages.model import load_model
from visionzip.video_llava import tokens_per_frame

log = logging.getLogger(__name__)
STATE = "tune_state.pt"
LOCK = "tune.lock"  # held by the run tuning into the folder (`pipelines.files.exclusive_lock`)


def run_tune(job: TuneJobConfig) -> dict:
    """Tune the projector as `job.tune` says; returns the summary written to OUT/tune.json, less the loss
    of every step."""
    model_config = prepare_model(job.model)
    check(tune_problems(job, tokens_per_frame(model_config)))
    cfg = job.tune
    out = Path(cfg.out)
    with exclusive_lock(out / LOCK, f"tune.out={out}"):  # one run per folder, held until tune.json
        questions = read_questions(job.data)
        unanswered = [q.id for q in questions if not (q.answer or "").strip()]
        if unanswered:
            raise ManifestError(
                f"{job.data.describe()}: tuning needs an answer for every question; none for "
                f"{len(unanswered)} ids: {', '.join(unanswered[:10])}{' ...' if len(unanswered) > 10 else ''}"
            )
        model, tokenizer = load_model(job.model)
        start = time.perf_counter()
        videos, examples, errors = compressed_examples(job, model, questions)
        if not examples:
            raise RuntimeError(f"no video of {job.data.describe()} could be encoded: {errors}")
        log.info("tuning the projector on %d questions about %d videos (%d videos failed)", len(examples),
                 len(videos), len(errors))
        # the model's weights (the checkpoint's and the starting projector's digests), not only its path: a
        # checkpoint retrained in the same folder (or another model.projector_path) must not resume a run
        # tuned from other weights
        fingerprint = {"data": {key: str(Path(path).resolve()) for key, path in job.data.files().items()},
                       "questions": len(examples), "compression": asdict(job.compression),
                       "model": model_fingerprint(job.model, model_config),
                       "tune": {k: v for k, v in asdict(cfg).items()
                                if k not in ("out", "resume", "checkpoint_every", "frame_batch_size")}}
        losses = tune_projector(model, tokenizer, videos, examples, cfg, fingerprint)
        summary = {"projector": str(out / "projector.safetensors"), "steps": cfg.steps,
                   "questions": len(examples), "videos": len(videos), "errors": errors,
                   "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
                   "seconds": time.perf_counter() - start, **fingerprint}
        write_json(out / "tune.json", summary)
        return {**{k: v for k, v in summary.items() if k != "losses"}, "summary": str(out / "tune.json")}


def tune_projector(model: VideoLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                   videos: list[CompressedVideo], examples: list[tuple[int, str, str]], cfg: TuneConfig,
                   fingerprint: dict | None = None) -> list[float]:
    """Train `model`'s projector (now float32) on `examples` (index into `videos`, question, answer), all
    other weights frozen; checkpoint into `cfg.out`, resuming from its checkpoint when `cfg.resume` and
    its `fingerprint` (what the run trains on, stored with the checkpoint) matches. Returns every step's
    loss, those before a resume included."""
    out = Path(cfg.out)
    fingerprint = fingerprint or {}
    projector = model.model.multi_modal_projector.float()
    model.requires_grad_(False)
    projector.requires_grad_(True)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    step, losses = 0, []
    if cfg.resume and (out / STATE).exists():
        step, losses = _restore(out / STATE, projector, optimizer, schedule, fingerprint)
        log.info("resuming %s at step %d of %d", out, step, cfg.steps)
    answerer = AnswerStage(model, tokenizer)
    order = QuestionOrder(len(examples), cfg.seed)
    model.eval()
    with tqdm(total=cfg.steps, initial=step, desc="tune", unit="step", file=sys.stderr) as progress:
        while step < cfg.steps:
            loss = 0.0
            for part in range(cfg.grad_accum):
                chosen = [examples[i] for i in
                          order.batch((step * cfg.grad_accum + part) * cfg.batch_size, cfg.batch_size)]
                batch_loss = answer_loss(model, answerer, [videos[video] for video, _, _ in chosen],
                                         [q for _, q, _ in chosen], [a for _, _, a in chosen])
                (batch_loss / cfg.grad_accum).backward()
                loss += batch_loss.item() / cfg.grad_accum
            torch.nn.utils.clip_grad_norm_(projector.parameters(), cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _checkpoint(out, model, optimizer, schedule, step, losses, fingerprint)
    return losses


def compressed_examples(job: TuneJobConfig, model: torch.nn.Module, questions: list[Question]
                        ) -> tuple[list[CompressedVideo], list[tuple[int, str, str]], list[dict]]:
    """Decode and compress the video of every question once: (tokens before the projector, with their
    positions, per video, on the CPU; (video index, question, answer) per question; {"video", "ids",
    "error"} per failed video)."""
    decode = DecodeStage(job.decode)
    encode = EncodeStage(model, compression=job.compression, frame_batch_size=job.tune.frame_batch_size)
    videos: list[CompressedVideo] = []
    examples: list[tuple[int, str, str]] = []
    errors: list[dict] = []
    for item in group_by_video(questions):
        error = next((q.error for q in item.questions if q.error is not None), None)
        if error is None:
            decoded = decode({"video": [item.video], "start": [item.start], "end": [item.end]})
            error = errors_of(decoded, 1)[0]
        if error is None:
            try:
                kept = encode.compressed_videos([decoded["frames"][0]])[0]
            except Exception as err:  # noqa: BLE001 - one video's failure is listed, the rest train
                error = f"encode: {type(err).__name__}: {err}"
        if error is not None:
            errors.append({"video": item.video, "ids": [q.id for q in item.questions], "error": error})
            continue
        positions = None if kept.positions is None else kept.positions.cpu()
        # normal tensors: autograd cannot use inference ones
        videos.append(CompressedVideo(kept.tokens.cpu().clone(), positions, kept.span))
        examples += [(len(videos) - 1, question_text(q.question, q.options), q.answer)
                     for q in item.questions]
    return videos, examples, errors


def answer_loss(model: torch.nn.Module, answerer: AnswerStage, videos: list[CompressedVideo],
                questions: list[str], answers: list[str]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens and EOS, the projector's output spliced into the prompt at
    the position ids the answer stage gives it."""
    projector = model.model.multi_modal_projector
    embeds = [projector(v.tokens.to(model.device, torch.float32)).to(model.dtype) for v in videos]
    inputs = answerer.build_inputs(embeds, questions, answers, positions=[v.positions for v in videos],
                                   spans=[v.span for v in videos])
    labels = inputs.pop("labels")
    logits = model(**inputs).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class QuestionOrder:
    """Epochs over n questions, each a seeded permutation: position p of the endless stream is question
    perm(seed, p // n)[p % n], so any step's questions follow from (seed, step) alone."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epochs: dict[int, list[int]] = {}

    def batch(self, position: int, size: int) -> list[int]:
        return [self._epoch(p // self.n)[p % self.n] for p in range(position, position + size)]

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epochs[epoch] = torch.randperm(self.n, generator=generator).tolist()
        return self._epochs[epoch]


def save_projector(model: VideoLlavaForConditionalGeneration, folder: str | Path) -> Path:
    """The multimodal projector's weights alone (float32 safetensors) as FOLDER/projector.safetensors:
    what projector tuning changes, for `stages.model.load_projector` (`model.projector_path`)."""
    weights = model.model.multi_modal_projector.state_dict()
    with atomic_path(Path(folder) / "projector.safetensors") as partial:
        save_file({k: v.detach().float().contiguous() for k, v in weights.items()}, str(partial))
    return Path(folder) / "projector.safetensors"


def _checkpoint(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: LRScheduler,
                step: int, losses: list[float], fingerprint: dict) -> None:
    save_projector(model, out)
    state = {"step": step, "losses": losses, "fingerprint": fingerprint, "optimizer": optimizer.state_dict(),
             "schedule": schedule.state_dict(), "projector": model.model.multi_modal_projector.state_dict()}
    with atomic_path(out / STATE) as partial:
        torch.save(state, partial)


def _restore(path: Path, projector: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: LRScheduler,
             fingerprint: dict) -> tuple[int, list[float]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} is a checkpoint of another tuning run ({json.dumps(state['fingerprint'])}); this run is "
            f"{json.dumps(fingerprint)}. Pass another tune.out, or tune.resume=false "
            "to start over"
        )
    projector.load_state_dict(state["projector"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return state["step"], state["losses"]
