"""A picture of what VisionZip and temporal merging keep of one video, on the job's own settings.

    python -m pipelines.show_kept VIDEO OUT.png [job overrides ...] [--scale N]
    python -m pipelines.show_kept clip.mp4 kept.png model=synth compression=visionzip_temporal

Decodes VIDEO as the job would (`decode.*`), runs the encode stage's own VisionZip and temporal merging
(`compression.*`, `model.*`; `EncodeStage.selection`) and writes one row of the sampled frames, as the
tower saw them (resized and centre-cropped), with the patches drawn by what became of them
(`visionzip.vis`): kept patches outlined in white, folded ones shaded with the colour of the token they
fold into (that token shaded alike), the contextual tokens' clusters tinted one colour each. Any override
of the batch job works (composed by `pipelines.config.compose_job`); `data.*` and `output.*` are not used.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.cli import plain_errors
from pipelines.config import ConfigError, check, compose_job, job_problems
from pipelines.job import prepare_model
from stages.decode import DecodeError, DecodeStage, read_frames
from stages.encode import EncodeStage
from stages.preprocess import ClipPreprocess
from visionzip.video_llava import tokens_per_frame
from visionzip.vis import kept_tokens_picture

# the job's schema asks for its data and output; this command reads one video and writes one picture
_UNUSED_JOB_SECTIONS = ("data.manifest=unused", "output.path=unused")
MIN_SIDE = 224  # pixels: smaller frames are upscaled (nearest) by an integer factor to at least this


@dataclass
class KeptPicture:
    """What `show_kept` drew: the file, its frames, and the visual tokens per frame and in all."""

    path: Path
    frame_indices: list[int]
    tokens_full: int  # T * tokens per frame: what Video-LLaVA reads without compression
    tokens_after_zip: int  # T * (dominant + contextual)
    tokens_kept: int  # after temporal merging: what the LLM reads
    width: int
    height: int


def show_kept(video: str | Path, out: str | Path, overrides: Sequence[str] = (),
              scale: int | None = None) -> KeptPicture:
    """Write the picture of what the job configured by `overrides` keeps of `video` to `out` (PNG).

    `scale`: integer upscaling of the frames (default: the smallest that makes them >= MIN_SIDE pixels).
    """
    job = compose_job(*_UNUSED_JOB_SECTIONS, *overrides)
    if job.compression.method != "visionzip":
        raise ConfigError(f"compression.method={job.compression.method!r}: the picture shows VisionZip's "
                          "selection; use compression=visionzip or compression=visionzip_temporal")
    check(job_problems(job, tokens_per_frame(prepare_model(job.model))))
    decoded = read_frames(video, **DecodeStage(job.decode).options)  # the frames the job's stage reads
    stage = EncodeStage(job.model, compression=job.compression)
    chosen = stage.selection(decoded.frames)
    view = tower_view(chosen.pixels, stage.preprocess)
    if scale is None:
        scale = max(1, math.ceil(MIN_SIDE / min(view.shape[1:3])))
    picture = kept_tokens_picture(view, chosen.zipped.dominant_index.cpu().numpy(),
                                  chosen.zipped.contextual_assignment.cpu().numpy(),
                                  None if chosen.merged is None else chosen.merged.group_of.cpu().numpy(),
                                  scale=scale, line=max(1, scale))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(out, format="PNG")
    after_zip = chosen.zipped.tokens.shape[:2].numel()
    return KeptPicture(out, decoded.indices.tolist(), len(view) * stage.full_per_frame, after_zip,
                       after_zip if chosen.merged is None else len(chosen.merged.tokens),
                       picture.shape[1], picture.shape[0])


def tower_view(pixels: torch.Tensor, preprocess: ClipPreprocess) -> np.ndarray:
    """Preprocessed frames [T, 3, H, W] back to uint8 [T, H, W, 3]: the pictures the tower saw."""
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    values = (pixels.float().cpu() * std + mean) / preprocess.rescale_factor
    return values.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.show_kept", description=__doc__.split("\n")[0])
    parser.add_argument("video", help="the video file")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("overrides", nargs="*",
                        help="batch-job overrides, e.g. model=synth decode.num_frames=8")
    parser.add_argument("--scale", type=int, default=None,
                        help=f"integer upscaling of the frames (default: to at least {MIN_SIDE} px)")
    args = parser.parse_args(argv)
    with plain_errors():
        try:
            drawn = show_kept(args.video, args.out, args.overrides, args.scale)
        except DecodeError as err:  # a video that cannot be read is this command's input error
            raise ConfigError(f"cannot read the video: {err}") from None
    print(f"{drawn.path}: {drawn.width}x{drawn.height} px, frames {drawn.frame_indices}; visual tokens "
          f"{drawn.tokens_full} -> {drawn.tokens_after_zip} (VisionZip) -> {drawn.tokens_kept} (read by the "
          "LLM)")


if __name__ == "__main__":
    main()
