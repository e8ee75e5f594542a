"""VisionZip token compression for CLIP towers, plus temporal merging across video frames (pure torch)."""

from .clip import clip_selection_layer_outputs, zip_clip
from .temporal import MergeResult, merge_frames
from .zip import ZipResult, zip_tokens

__all__ = [
    "MergeResult",
    "ZipResult",
    "clip_selection_layer_outputs",
    "merge_frames",
    "zip_clip",
    "zip_tokens",
]
