"""The picture of what is kept (`visionzip.vis`, `python -m pipelines.show_kept`) and the accessors it reads:
which contextual token each patch joined (`ZipResult.contextual_assignment`) and which group each token
joined in temporal merging (`MergeResult.group_of`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.config import ConfigError, compose_job
from pipelines.show_kept import main, show_kept
from stages.decode import DecodeStage, read_frames
from stages.encode import EncodeStage
from synthqa.sample_videos import write_video
from visionzip import merge_frames, zip_tokens
from visionzip.vis import (
    DIM,
    GAP,
    OUTLINE,
    SHADE_ALPHA,
    TINT_ALPHA,
    cluster_colours,
    group_colours,
    kept_tokens_picture,
)

GRID, CELL, GREY = 4, 8, 100  # a 4 x 4 patch grid (N = 17 tokens with the CLS), 8 px patches, grey frames


def grey_frames(count: int) -> np.ndarray:
    return np.full((count, GRID * CELL, GRID * CELL, 3), GREY, dtype=np.uint8)


def frame_of(picture: np.ndarray, t: int, side: int, gap: int = 4) -> np.ndarray:
    left = t * (side + gap)
    return picture[:, left : left + side]


def cell(image: np.ndarray, patch: int, size: int) -> np.ndarray:
    """The pixels of one patch (raster order) of one frame's picture."""
    row, col = divmod(patch, GRID)
    return image[row * size : (row + 1) * size, col * size : (col + 1) * size]


def interior(image: np.ndarray, patch: int, size: int = CELL) -> np.ndarray:
    return cell(image, patch, size)[1:-1, 1:-1].reshape(-1, 3)


def blend(colour: np.ndarray, alpha: float) -> np.ndarray:
    return np.floor(GREY * (1 - alpha) + colour * alpha + 0.5).astype(np.uint8)


def assignment_for(dominant_index: np.ndarray, clusters: list[list[int]]) -> np.ndarray:
    """contextual_assignment [T, N]: -1 at the dominant positions, the listed cluster elsewhere (each
    frame's list gives the cluster of its non-dominant positions in raster order)."""
    out = np.full((len(dominant_index), GRID * GRID + 1), -1)
    for t, (kept, joined) in enumerate(zip(dominant_index, clusters, strict=True)):
        rest = [p for p in range(GRID * GRID + 1) if p not in kept]
        out[t, rest] = joined
    return out


# ---------------------------------------------------------------- the pure picture


@pytest.mark.parametrize(("scale", "line"), [(1, 1), (2, 2), (3, 1)])
def test_outlined_pixels_are_exactly_the_kept_patches_borders(scale, line):
    dominant_index = np.array([[0, 2, 7, 16], [0, 1, 6, 7]])  # patches 1, 6, 15 and 0, 5, 6
    assignment = assignment_for(dominant_index, [[0, 1] * 6 + [0], [1, 0] * 6 + [1]])
    picture = kept_tokens_picture(grey_frames(2), dominant_index, assignment, scale=scale, line=line)
    side, size = GRID * CELL * scale, CELL * scale
    assert picture.shape == (side, 2 * side + 4, 3) and picture.dtype == np.uint8
    assert (picture[:, side : side + 4] == GAP).all()
    for t, kept in enumerate(dominant_index):
        expected = np.zeros((side, side), dtype=bool)
        for patch in kept[1:] - 1:
            top, left = (size * i for i in divmod(int(patch), GRID))
            expected[top : top + size, left : left + size] = True
            expected[top + line : top + size - line, left + line : left + size - line] = False
        outlined = (frame_of(picture, t, side) == OUTLINE).all(axis=-1)
        np.testing.assert_array_equal(outlined, expected)
        for patch in kept[1:] - 1:  # inside its outline a kept patch is the frame as it was
            inside = cell(frame_of(picture, t, side), int(patch), size)[line:-line, line:-line]
            assert (inside == GREY).all()


def test_contextual_clusters_are_tinted_one_colour_each():
    dominant_index = np.array([[0, 1, 2]])
    joined = [0, 1, 2] * 4 + [0, 1]  # 14 patches in 3 clusters
    picture = kept_tokens_picture(grey_frames(1), dominant_index, assignment_for(dominant_index, [joined]))
    tints = blend(cluster_colours(3), TINT_ALPHA)
    assert len({tuple(t) for t in tints}) == 3 and not (tints == GREY).all(axis=1).any()
    for patch, cluster in zip(range(2, 16), joined, strict=True):
        assert (cell(picture, patch, CELL).reshape(-1, 3) == tints[cluster]).all(), patch


def test_tokens_folded_into_the_same_token_share_its_shade():
    # 3 frames of D = 3 tokens (CLS + 2 patches) + C = 1 contextual token
    dominant_index = np.array([[0, 1, 2], [0, 1, 3], [0, 1, 3]])
    assignment = assignment_for(dominant_index, [[0] * 14] * 3)
    group_of = np.array([
        [0, 1, 2, 3],
        [4, 1, 2, 5],  # patch 0 folds into frame 0's patch 0 (group 1), patch 2 into frame 0's patch 1
        [6, 1, 7, 5],  # patch 0 folds again into group 1; the contextual token into frame 1's (group 5)
    ])
    picture = kept_tokens_picture(grey_frames(3), dominant_index, assignment, group_of)
    side = GRID * CELL
    frames = [frame_of(picture, t, side) for t in range(3)]
    shades = blend(group_colours(3), SHADE_ALPHA)  # shared groups by first appearance: 1, 2, then 5
    # group 1: the token folded into (frame 0, outlined) and both tokens folded into it (not outlined)
    for t in range(3):
        assert (interior(frames[t], 0) == shades[0]).all(), t
    assert (cell(frames[0], 0, CELL)[0] == OUTLINE).all()
    assert not (cell(frames[1], 0, CELL) == OUTLINE).all(axis=-1).any()
    assert not (cell(frames[2], 0, CELL) == OUTLINE).all(axis=-1).any()
    # group 2 has a colour of its own: frame 0's patch 1 and frame 1's patch 2
    assert (interior(frames[0], 1) == shades[1]).all() and (interior(frames[1], 2) == shades[1]).all()
    assert not (shades[0] == shades[1]).all()
    # a token nothing folds into and that folds into nothing: outlined, not shaded
    assert (interior(frames[2], 2) == GREY).all() and (cell(frames[2], 2, CELL)[0] == OUTLINE).all()
    # contextual tokens: frame 0's alone (its cluster colour), frames 1 and 2's folded together (group 5)
    assert (interior(frames[0], 9) == blend(cluster_colours(1)[0], TINT_ALPHA)).all()
    shared_tint = blend(group_colours(3)[2], TINT_ALPHA)
    assert (interior(frames[1], 9) == shared_tint).all() and (interior(frames[2], 9) == shared_tint).all()


def test_patches_no_token_stands_for_are_dimmed():
    dominant_index = np.array([[0, 5, 6]])  # no contextual tokens: every other patch is dropped
    picture = kept_tokens_picture(grey_frames(1), dominant_index, np.full((1, 17), -1))
    assert (cell(picture, 0, CELL) == np.floor(GREY * DIM + 0.5)).all()
    assert (interior(picture, 4) == GREY).all()


def test_bad_inputs_are_named():
    dominant_index = np.array([[0, 1, 2]])
    good = assignment_for(dominant_index, [[0] * 14])
    with pytest.raises(ValueError, match="frames must be uint8"):
        kept_tokens_picture(grey_frames(1).astype(np.float32), dominant_index, good)
    with pytest.raises(ValueError, match="not CLS \\+ a square patch grid"):
        kept_tokens_picture(grey_frames(1), dominant_index, good[:, :16])
    with pytest.raises(ValueError, match="do not split into the 4x4 patch grid"):
        kept_tokens_picture(grey_frames(1)[:, :30], dominant_index, good)
    with pytest.raises(ValueError, match="dominant_index must hold ascending positions"):
        kept_tokens_picture(grey_frames(1), np.array([[1, 2, 3]]), good)
    with pytest.raises(ValueError, match="contextual_assignment must be -1 exactly at the dominant"):
        kept_tokens_picture(grey_frames(1), np.array([[0, 1, 3]]), good)
    with pytest.raises(ValueError, match=r"group_of must be an integer \[T=1, K=4\]"):
        kept_tokens_picture(grey_frames(1), dominant_index, good, np.zeros((1, 3), dtype=int))
    with pytest.raises(ValueError, match="scale must be an integer >= 1"):
        kept_tokens_picture(grey_frames(1), dominant_index, good, scale=0)


# ---------------------------------------------------------------- the accessors it reads


def test_contextual_assignment_is_the_merge_zip_tokens_made():
    torch.manual_seed(0)
    batch, n, dim, dominant, contextual = 3, 17, 8, 5, 3
    features, metric = torch.randn(batch, n, dim, dtype=torch.float64), torch.randn(batch, n, 6)
    result = zip_tokens(features, torch.rand(batch, 2, n), metric, dominant=dominant, contextual=contextual)
    assignment = result.contextual_assignment
    for b in range(batch):
        kept = result.dominant_index[b].tolist()
        assert (assignment[b, kept] == -1).all()
        rest = [p for p in range(n) if p not in kept]
        targets = rest[:: (n - dominant) // contextual][:contextual]  # official: evenly spaced targets
        assert assignment[b, targets].tolist() == list(range(contextual))
        assert torch.bincount(assignment[b, rest], minlength=contextual).tolist() \
            == result.contextual_size[b].tolist()
        for j, target in enumerate(targets):
            members = [p for p in rest if assignment[b, p] == j and p != target]
            mean = features[b, members].mean(0) if members else torch.zeros(dim, dtype=torch.float64)
            torch.testing.assert_close(result.tokens[b, dominant + j], features[b, target] + mean)
    no_context = zip_tokens(features, torch.rand(batch, 2, n), metric, dominant=dominant, contextual=0)
    assert (no_context.contextual_assignment == -1).all()


@pytest.mark.parametrize("match", ["any", "prune"])
def test_group_of_names_each_tokens_group(match):
    torch.manual_seed(1)
    base = torch.randn(1, 6, 16)
    tokens = base + 0.3 * torch.randn(4, 6, 16)  # similar frames: some tokens fold
    positions = torch.arange(6).expand(4, 6)
    merged = merge_frames(tokens, threshold=0.9, match=match, positions=positions)
    group_of = merged.group_of
    assert group_of.shape == (4, 6) and 0 < len(merged.tokens) < 24
    assert torch.bincount(group_of.flatten()).tolist() == merged.size.tolist()
    for g in range(len(merged.tokens)):
        frames, slots = (group_of == g).nonzero(as_tuple=True)
        assert frames.min() == merged.frame[g]
        assert frames[0] * 6 + slots[0] == merged.first[g]
        expected = tokens[frames[0], slots[0]] if match == "prune" else tokens[frames, slots].mean(0)
        torch.testing.assert_close(merged.tokens[g], expected)


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("show_kept") / "clip.mp4", 30, width=160, height=120)


def tiny_overrides(tiny_dir) -> list[str]:
    return ["model=tiny", f"model.path={tiny_dir}", "model.build_tiny=false", "model.device=cpu",
            "compression=visionzip_temporal", "decode.num_frames=4"]


def test_show_kept_writes_the_picture_of_what_encode_keeps(tiny_dir, clip, tmp_path, capsys):
    out = tmp_path / "pics" / "kept.png"
    main([str(clip), str(out), *tiny_overrides(tiny_dir)])
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == (4 * 224 + 3 * 4, 224)  # 4 frames of 224 px (16 x 16 patches of 14), 4 px gaps
    job = compose_job("data.manifest=m.jsonl", "output.path=o.jsonl", *tiny_overrides(tiny_dir))
    decoded = read_frames(clip, **DecodeStage(job.decode).options)
    assert decoded.indices.tolist() == [0, 9, 19, 29]  # Video-LLaVA's sampling of 4 of 30 frames
    encoded = EncodeStage(job.model, compression=job.compression).encode([decoded.frames])[0]
    assert capsys.readouterr().out.strip() == (
        f"{out}: 908x224 px, frames [0, 9, 19, 29]; visual tokens 1028 -> 68 (VisionZip) -> "
        f"{encoded.visual_tokens_kept} (read by the LLM)")
    drawn = show_kept(clip, tmp_path / "scaled.png", tiny_overrides(tiny_dir), scale=2)
    assert (drawn.width, drawn.height) == (4 * 448 + 3 * 4, 448)


def test_show_kept_draws_visionzip_only_and_names_an_unreadable_video(tiny_dir, clip, tmp_path, capsys):
    with pytest.raises(ConfigError, match="compression.method='none': the picture shows VisionZip's"):
        show_kept(clip, tmp_path / "x.png", [*tiny_overrides(tiny_dir), "compression=none"])
    missing = tmp_path / "missing.mp4"
    with pytest.raises(SystemExit) as stopped:
        main([str(missing), str(tmp_path / "x.png"), *tiny_overrides(tiny_dir)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read the video: {missing}: no such file\n")
    assert not (tmp_path / "x.png").exists()
