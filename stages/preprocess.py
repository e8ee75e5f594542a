"""CLIP frame preprocessing in plain torch: batched, on the model's device, no PIL and no torchvision.

transformers' `VideoLlavaImageProcessor` converts every frame to a PIL image and resizes it one by one.
This does the same recipe (shortest side to 224 bicubic with antialiasing, centre crop 224, rescale
1/255, CLIP mean/std) for all frames of a video at once, on the GPU when the model is there, and stays
within one 8-bit level of PIL's resize (tests/test_preprocess.py states the measured difference).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# PIL resampling codes as saved in preprocessor_config.json ("resample"), mapped to torch modes.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ClipPreprocess:
    """The CLIP recipe's parameters; defaults are Video-LLaVA's (and OpenAI CLIP's)."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
    std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None) -> ClipPreprocess:
        """Read `preprocessor_config.json` from a model folder; CLIP defaults when there is none.

        Hub ids get the defaults, which are what Video-LLaVA-7B-hf's processor uses.
        """
        file = Path(path) / "preprocessor_config.json" if path else None
        if file is None or not file.is_file():
            return cls()
        cfg = json.loads(file.read_text())
        size, crop = cfg.get("size", {}), cfg.get("crop_size", {})
        if "shortest_edge" not in size:
            raise ValueError(f"{file}: only size={{'shortest_edge': n}} is supported, got size={size}")
        if cfg.get("resample", 3) not in _RESAMPLE:
            raise ValueError(f"{file}: resample must be 2 (bilinear) or 3 (bicubic), got {cfg['resample']}")
        return cls(
            shortest_edge=int(size["shortest_edge"]),
            crop_height=int(crop.get("height", size["shortest_edge"])),
            crop_width=int(crop.get("width", size["shortest_edge"])),
            mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            resample=_RESAMPLE[cfg.get("resample", 3)],
        )

    def __call__(
        self,
        frames: np.ndarray | torch.Tensor,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        name: str = "frames",
    ) -> torch.Tensor:
        """uint8 RGB frames [T, H, W, 3] -> pixel values [T, 3, crop_height, crop_width] in `dtype`.

        Computed in float32 on `device`; `name` labels the input in error messages.
        """
        frames = check_frames(frames, name)
        x = torch.as_tensor(frames).to(device).permute(0, 3, 1, 2)
        x = resize_like_pil(x, self.resized_size(*x.shape[-2:]), self.resample)
        top = (x.shape[-2] - self.crop_height) // 2
        left = (x.shape[-1] - self.crop_width) // 2
        x = x[..., top : top + self.crop_height, left : left + self.crop_width]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x * self.rescale_factor - mean) / std).to(dtype)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Shortest side to `shortest_edge`, the other truncated as transformers does (360x640 -> 224x398)."""
        short, long = sorted((height, width))
        new_long = int(self.shortest_edge * long / short)
        size = (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)
        if size[0] < self.crop_height or size[1] < self.crop_width:
            raise ValueError(
                f"a {height}x{width} frame resized to {size[0]}x{size[1]} is smaller than the "
                f"{self.crop_height}x{self.crop_width} crop"
            )
        return size


def resize_like_pil(
    images: torch.Tensor, size: tuple[int, int], mode: str = "bicubic", uint8_kernel: bool | None = None
) -> torch.Tensor:
    """Resize uint8 images [T, 3, H, W] as PIL resizes 8-bit images; float32 result with integer values.

    torch's antialiased uint8 kernels (CPU only, `uint8_kernel=None` picks them there) implement PIL's
    fixed-point resampling and are about 15x faster than float on a CPU. Elsewhere: two float 1-D passes,
    horizontal first, each rounded and clamped to 8 bits as PIL does; the intermediate clamp matters at
    sharp edges, where bicubic overshoots. Both stay within one 8-bit level of PIL.
    """
    if uint8_kernel is None:
        uint8_kernel = images.device.type == "cpu"
    if uint8_kernel:
        images = images.contiguous(memory_format=torch.channels_last)
        return F.interpolate(images, size=size, mode=mode, antialias=True).float()
    x = images.float()
    for step in ((x.shape[-2], size[1]), size):
        x = F.interpolate(x, size=step, mode=mode, antialias=True).round_().clamp_(0, 255)
    return x


def check_frames(frames: object, name: str = "frames") -> np.ndarray | torch.Tensor:
    """Reject anything but a non-empty uint8 RGB array [T, H, W, 3], naming the input and the problem."""
    if not isinstance(frames, np.ndarray | torch.Tensor):
        raise ValueError(f"{name} must be a uint8 array [T, H, W, 3], got {type(frames).__name__}")
    shape = tuple(frames.shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{name} must have shape [T, H, W, 3] (RGB frames), got {shape}")
    if min(shape) == 0:
        raise ValueError(f"{name} is empty: shape {shape}")
    if frames.dtype != (torch.uint8 if isinstance(frames, torch.Tensor) else np.uint8):
        raise ValueError(f"{name} must be uint8 (0..255 RGB), got dtype {frames.dtype}")
    return frames
