"""Synthetic video QA whose answers live in a few patches: the instrument for answer quality here.

Real checkpoints cannot be loaded on every machine, so nothing else tells whether token compression
keeps answers right. Each clip is 8 frames of a static textured background with 1-3 small objects (a
shape in a colour, about 2 x 2 patches of a 112 px / patch 14 frame) that each move in a straight line.
Every question has a one-word answer that only the object patches hold:

- `color`:     "What color is the circle?"                    -> red
- `shape`:     "What shape is the red object?"                -> circle
- `count`:     "How many objects are there?"                  -> two
- `direction`: "Which way does the red object move?"          -> left   (needs two frames)
- `half`:      "Is the circle in the top or bottom half?"     -> top    (localised: where, not what)

Shapes and colours are distinct within a clip, so every question names exactly one object. An object
stays inside its half of the frame for the whole clip, so `half` has one answer.

Everything is seeded: clip `i` of seed `s` is the same on every machine (numpy's PCG64 per clip). This
module makes clips in memory (`make_clip`, `synth_sample`, `training_samples`: what training reads) and
the per-frame and per-patch targets the tower learns from (`frame_labels`); `synthqa.dataset` writes the
same clips as mp4 files with a manifest, for held-out sets that go through the whole pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 235), "yellow": (235, 215, 40)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COUNTS = ("one", "two", "three")
QUESTION_TYPES = ("color", "shape", "count", "direction", "half")
FRAME_SIZE = 112
NUM_FRAMES = 8
SPEED = 4  # pixels per frame: 28 px (2 patches) over 8 frames
POSITION_BINS = 8  # per axis, for the per-frame position targets: a bin is a patch wide (14 px)
CENTER_BINS = FRAME_SIZE // SPEED  # per axis, for the per-patch object centre: a bin is a frame's motion


@dataclass(frozen=True)
class SynthObject:
    """One object: a shape in a colour, `size` px across, centre (x, y) at frame 0, moving `SPEED` px
    per frame in `direction`."""

    shape: str
    color: str
    size: int
    x: float
    y: float
    direction: str

    def center(self, t: int) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        return self.x + dx * SPEED * t, self.y + dy * SPEED * t

    @property
    def half(self) -> str:
        return "top" if self.y < FRAME_SIZE / 2 else "bottom"


@dataclass
class SynthClip:
    """Frames uint8 [T, H, W, 3] and the objects drawn; `owner` [T, H, W] int8 says which object (index
    into `objects`, -1 = background) each pixel shows."""

    frames: np.ndarray
    owner: np.ndarray
    objects: list[SynthObject]


@dataclass(frozen=True)
class SynthQuestion:
    type: str
    question: str
    answer: str


def clip_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of clip `index` of the set `seed`: clips are independent of how many came before."""
    return np.random.default_rng([seed, index])


def make_clip(rng: np.random.Generator, size: int = FRAME_SIZE, num_frames: int = NUM_FRAMES) -> SynthClip:
    """Draw a clip: textured background, 1-3 objects with distinct shapes and colours, no overlaps."""
    if size < 64 or num_frames < 2:
        raise ValueError(f"need size >= 64 and num_frames >= 2, got size={size}, num_frames={num_frames}")
    background = _background(rng, size)
    for _ in range(100):
        objects = _draw_objects(rng, size, num_frames)
        if objects is not None:
            break
    else:  # pragma: no cover - 3 small objects always fit in a few tries
        raise RuntimeError("could not place non-overlapping objects")
    frames = np.repeat(background[None], num_frames, axis=0)
    owner = np.full((num_frames, size, size), -1, dtype=np.int8)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for t in range(num_frames):
        for k, obj in enumerate(objects):
            mask = _shape_mask(obj, t, xx, yy)
            frames[t][mask] = COLORS[obj.color]
            owner[t][mask] = k
    return SynthClip(frames, owner, objects)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Static grey-brown texture: a few random plane waves plus fine noise, far from the object colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    tex = np.zeros((size, size), np.float32)
    for _ in range(4):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.05, 0.5), rng.uniform(0, 2 * np.pi)
        tex += np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    tex = 115 + 12 * tex + rng.normal(0, 6, (size, size)).astype(np.float32)
    tint = rng.uniform(-10, 10, 3).astype(np.float32)
    return np.clip(tex[..., None] + tint, 0, 255).astype(np.uint8)


def _draw_objects(rng: np.random.Generator, size: int, num_frames: int) -> list[SynthObject] | None:
    count = int(rng.integers(1, 4))
    shapes = rng.permutation(len(SHAPES))[:count]
    colors = rng.permutation(len(COLORS))[:count]
    travel = SPEED * (num_frames - 1)
    objects = []
    for shape, color in zip(shapes, colors, strict=True):
        s = int(rng.integers(18, 25))
        direction = list(DIRECTIONS)[int(rng.integers(4))]
        dx, dy = DIRECTIONS[direction]
        top = bool(rng.integers(2))
        # the centre's whole path keeps the object inside the frame and inside its half
        y_lo, y_hi = (s / 2, size / 2 - s / 2) if top else (size / 2 + s / 2, size - s / 2)
        x_lo, x_hi = s / 2, size - s / 2
        x_lo, x_hi = x_lo - min(dx, 0) * travel, x_hi - max(dx, 0) * travel
        y_lo, y_hi = y_lo - min(dy, 0) * travel, y_hi - max(dy, 0) * travel
        x, y = float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi))
        objects.append(SynthObject(SHAPES[shape], list(COLORS)[color], s, x, y, direction))
    for t in range(num_frames):
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                (ax, ay), (bx, by) = a.center(t), b.center(t)
                gap = (a.size + b.size) / 2 + 3
                if abs(ax - bx) < gap and abs(ay - by) < gap:
                    return None
    return objects


def _shape_mask(obj: SynthObject, t: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    cx, cy = obj.center(t)
    r = obj.size / 2
    if obj.shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if obj.shape == "square":
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    # triangle pointing up: width grows linearly from the apex to the base
    rel = (yy - (cy - r)) / obj.size
    return (rel >= 0) & (rel <= 1) & (np.abs(xx - cx) <= rel * r)


def ask(clip: SynthClip, qtype: str, rng: np.random.Generator) -> SynthQuestion:
    """A question of type `qtype` about `clip` with its one-word answer."""
    obj = clip.objects[int(rng.integers(len(clip.objects)))]
    by_color = bool(rng.integers(2))
    name = f"the {obj.color} object" if by_color else f"the {obj.shape}"
    if qtype == "color":
        return SynthQuestion(qtype, f"What color is the {obj.shape}?", obj.color)
    if qtype == "shape":
        return SynthQuestion(qtype, f"What shape is the {obj.color} object?", obj.shape)
    if qtype == "count":
        return SynthQuestion(qtype, "How many objects are there?", COUNTS[len(clip.objects) - 1])
    if qtype == "direction":
        return SynthQuestion(qtype, f"Which way does {name} move?", obj.direction)
    if qtype == "half":
        return SynthQuestion(qtype, f"Is {name} in the top or bottom half?", obj.half)
    raise ValueError(f"question type must be one of {', '.join(QUESTION_TYPES)}, got {qtype!r}")


@dataclass
class TrainingSample:
    """A clip (frames in `clip.frames`) with questions: `per_type` rounds of one question of every type,
    each round in `QUESTION_TYPES` order."""

    clip: SynthClip
    questions: list[SynthQuestion]


def synth_sample(seed: int, index: int, per_type: int = 1) -> TrainingSample:
    """Clip `index` of the set `seed` and its questions: the same draws `synthqa.dataset.write_dataset`
    makes (its first round of questions does not depend on `per_type`)."""
    rng = clip_rng(seed, index)
    clip = make_clip(rng)
    return TrainingSample(clip, [ask(clip, qtype, rng) for _ in range(per_type) for qtype in QUESTION_TYPES])


def training_samples(seed: int, start: int = 0, per_type: int = 1) -> Iterator[TrainingSample]:
    """Endless in-memory samples: clip `start`, `start + 1`, ... of `seed`, `per_type` questions of each
    type per clip."""
    index = start
    while True:
        yield synth_sample(seed, index, per_type)
        index += 1


def frame_labels(clip: SynthClip, patch: int = 14) -> dict[str, np.ndarray]:
    """Per-frame attribute targets for pretraining the tower's CLS, and per-patch targets.

    `count` [T] (0..2 = one..three objects); for each colour c: `present` [T, C] (0/1), `shape`
    [T, C] (shape index, -1 when absent), `x` and `y` [T, C] (which of `POSITION_BINS` columns / rows
    of the frame the centre is in, -1 when absent; an object's bin moves by 2 over a clip, so the
    first and last frames tell its direction); `patch_color` [T, P] (0 = background, 1 + colour index
    of the object covering most of the patch when it covers at least a quarter of it) and
    `patch_shape` [T, P], `patch_direction` [T, P] (1 + index in `DIRECTIONS`) and `patch_x`,
    `patch_y` [T, P] (1 + which of `CENTER_BINS` columns / rows the object's centre is in) likewise;
    `object_share` [T, P] float32: every object gets an equal share of 1, spread over the patches it
    covers in proportion to its pixels in each (a target for where the tower's CLS attends,
    `synthqa.tower.cls_attention_loss`).
    """
    t_count, size = clip.owner.shape[0], clip.owner.shape[1]
    n_colors = len(COLORS)
    present = np.zeros((t_count, n_colors), np.int64)
    shape = np.full((t_count, n_colors), -1, np.int64)
    xs, ys = shape.copy(), shape.copy()
    for obj in clip.objects:
        c = list(COLORS).index(obj.color)
        for t in range(t_count):
            cx, cy = obj.center(t)
            present[t, c], shape[t, c] = 1, SHAPES.index(obj.shape)
            xs[t, c] = min(POSITION_BINS - 1, int(cx * POSITION_BINS // size))
            ys[t, c] = min(POSITION_BINS - 1, int(cy * POSITION_BINS // size))
    grid = size // patch
    cells = clip.owner[:, : grid * patch, : grid * patch].reshape(t_count, grid, patch, grid, patch)
    cells = cells.transpose(0, 1, 3, 2, 4).reshape(t_count, grid * grid, patch * patch)
    cover = np.stack([(cells == k).sum(-1) for k in range(len(clip.objects))])  # [K, T, P]
    covered, owner = cover.max(0) * 4 >= patch * patch, cover.argmax(0)
    colors = np.array([1 + list(COLORS).index(obj.color) for obj in clip.objects])
    shapes = np.array([1 + SHAPES.index(obj.shape) for obj in clip.objects])
    directions = np.array([1 + list(DIRECTIONS).index(obj.direction) for obj in clip.objects])
    centers = np.array([[obj.center(t) for obj in clip.objects] for t in range(t_count)])  # [T, K, 2]
    center_bins = 1 + np.minimum(CENTER_BINS - 1, (centers * CENTER_BINS // size).astype(np.int64))
    at_owner = np.take_along_axis(center_bins, owner[..., None], axis=1)  # [T, P, 2]
    patch_color, patch_shape = np.where(covered, colors[owner], 0), np.where(covered, shapes[owner], 0)
    patch_direction = np.where(covered, directions[owner], 0)
    patch_x, patch_y = np.where(covered, at_owner[..., 0], 0), np.where(covered, at_owner[..., 1], 0)
    share = (cover / cover.sum(-1, keepdims=True)).mean(0).astype(np.float32)
    count = np.full(t_count, len(clip.objects) - 1, np.int64)
    return {"count": count, "present": present, "shape": shape, "x": xs, "y": ys,
            "patch_color": patch_color, "patch_shape": patch_shape, "patch_direction": patch_direction,
            "patch_x": patch_x, "patch_y": patch_y, "object_share": share}
