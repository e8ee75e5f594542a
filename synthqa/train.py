"""Train the small Video-LLaVA that answers the synthetic video QA of `synthqa.clips`, on a CPU.

    python -m synthqa.train --help

A feasibility run found that the answer loss alone leaves a from-scratch model at chance for a long time:
the LLM cannot learn what to look for before the tower shows it anything. So, in two phases:

1. `tower` (`synthqa.tower`): the CLIP tower alone learns, from single frames, what each frame holds:
   its CLS the count, colours and columns; every patch token where it is and which object covers it.
   With `--attention-weight`, the CLS attention is also taught to spread over the objects, which makes
   VisionZip's premise hold by construction. No LLM runs, so a step is cheap.
2. `lm` (`synthqa.lm`): tower frozen; the multimodal projector and the LLM learn the answer token and
   EOS, through the answer stage's own prompt. A curriculum of token subsets (`synthqa.subsets`),
   because among 520 tokens a from-scratch LLM stays on a plateau (about 70%: it answers about
   whichever object, never binding the question's object) for thousands of steps: first
   (`--object-steps`) each frame shows its CLS and two object patches (24 tokens a clip), where it
   learns the binding in a few hundred steps; then (`--background-steps`) every object patch plus a
   random amount of background; last (`--lm-steps`) every token or, with `--full-fraction`, uniform
   random subsets in the other steps. With `--motion-weight`, a training-only probe (`MotionProbe`)
   also asks the LLM's visual tokens which way their object moves: without it direction stayed at
   chance.

Both phases: AdamW, linear warm-up over a tenth of the steps (at most 100), cosine decay to 10%
(`synthqa.optim`). Everything is seeded (model init, data streams); `models/synth/README.md` records the
command that made the shipped checkpoint. The checkpoint's `metrics.json` is its fixed-set accuracy
(`synthqa.scoring`).
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from transformers import VideoLlavaForConditionalGeneration

from synthqa.clips import synth_sample
from synthqa.lm import train_lm
from synthqa.model import new_model, save_checkpoint
from synthqa.scoring import quick_accuracy, write_metrics
from synthqa.subsets import TokenSubsets
from synthqa.tower import CLS_TARGETS, SHIPPED_CLS_TARGETS, pretrain_tower

log = logging.getLogger("vzpipe.train")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the synthetic-QA Video-LLaVA (see module doc).")
    parser.add_argument("--out", default="models/synth", help="checkpoint folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tower-steps", type=int, default=2500)
    parser.add_argument("--tower-clips", type=int, default=8, help="clips (x 8 frames) per tower step")
    parser.add_argument("--tower-lr", type=float, default=2e-3)
    parser.add_argument("--lm-steps", type=int, default=1200)
    parser.add_argument("--lm-clips", type=int, default=8,
                        help="clips (x 5 x --questions-per-type questions) per LM step")
    parser.add_argument("--lm-lr", type=float, default=1e-3)
    parser.add_argument("--cls-targets", nargs="+", default=list(SHIPPED_CLS_TARGETS), choices=CLS_TARGETS,
                        help="what the tower's CLS predicts (TowerHeads); by default the answers live in "
                             "the patches alone")
    parser.add_argument("--attention-weight", type=float, default=0.0,
                        help="weight of a loss that teaches the tower's CLS to attend to the objects "
                             "(cls_attention_loss): VisionZip's premise, made to hold")
    parser.add_argument("--object-steps", type=int, default=0,
                        help="first train the LLM on the object patches alone, --object-patches a frame")
    parser.add_argument("--object-patches", type=int, default=2)
    parser.add_argument("--background-steps", type=int, default=0,
                        help="then on every object patch plus a random number of background patches")
    parser.add_argument("--motion-weight", type=float, default=0.0,
                        help="weight of a training-only loss that teaches the LLM's visual tokens which way "
                             "their object moves (MotionProbe), in --motion-phases")
    parser.add_argument("--motion-phases", nargs="+", default=["background", "lm"],
                        choices=["objects", "background", "lm"], help="the LLM phases with that loss")
    parser.add_argument("--questions-per-type", type=int, default=1, help="questions of each type per clip")
    parser.add_argument("--full-fraction", type=float, default=None,
                        help="last, train the LLM on random token subsets, all tokens in this fraction of "
                             "the steps (see TokenSubsets); default: all tokens always")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tower-out", default=".cache/synth-tower", help="where phase 1's model goes")
    parser.add_argument("--tower-from", default=None, help="skip phase 1: load the tower of this checkpoint")
    parser.add_argument("--score", default=None, help="only (re)write metrics.json of this checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.score:
        log.info("fixed-set metrics %s", json.dumps(write_metrics(args.score)))
        return
    model, tokenizer = new_model(args.seed)
    eval_samples = [synth_sample(args.seed + 999_999, i) for i in range(40)]
    if args.tower_from:
        trained = VideoLlavaForConditionalGeneration.from_pretrained(args.tower_from, dtype=torch.float32)
        model.model.video_tower.load_state_dict(trained.model.video_tower.state_dict())
    else:
        pretrain_tower(model, args.tower_steps, args.tower_clips, args.tower_lr, seed=args.seed,
                       cls_targets=tuple(args.cls_targets), attention_weight=args.attention_weight)
        save_checkpoint(model, tokenizer, args.tower_out, torch.float32)
    objects_only = TokenSubsets(0.0, objects=True, patches=args.object_patches)
    curriculum = [("objects", args.object_steps, args.seed + 2, objects_only),
                  ("background", args.background_steps, args.seed + 3, TokenSubsets(0.0, objects=True)),
                  ("lm", args.lm_steps, args.seed + 1,
                   None if args.full_fraction is None else TokenSubsets(args.full_fraction))]  # fmt: skip
    for phase, steps, seed, augment in curriculum:
        if steps:
            motion_weight = args.motion_weight if phase in args.motion_phases else 0.0
            train_lm(model, tokenizer, steps, args.lm_clips, args.lm_lr, seed=seed,
                     eval_every=args.eval_every, eval_samples=eval_samples, save_to=args.out,
                     augment=augment, per_type=args.questions_per_type,
                     motion_weight=motion_weight)  # fmt: skip
    log.info("final in-memory accuracy %s", json.dumps(quick_accuracy(model, tokenizer, eval_samples)))
    save_checkpoint(model, tokenizer, args.out)
    log.info("fixed-set metrics %s", json.dumps(write_metrics(args.out)))


if __name__ == "__main__":
    main()
