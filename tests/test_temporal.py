"""Temporal merging: `merge_frames` against a plain-loop reading of its rules, and each rule on its own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.encode import CompressionConfig, EncodeStage, TemporalConfig
from visionzip import MergeResult, merge_frames, zip_clip
from visionzip.baselines import random_patch_index

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


def reference_merge(tokens, threshold, protect_first, max_tokens=None, match="any", positions=None, radius=1,
                    grid_width=None):
    """The rules token by token: parent links to frame t-1, then roots by following the links."""
    frames, k, _ = tokens.shape
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    first = 1 if protect_first else 0

    def allowed(t, i, j):  # may token i of frame t fold into token j of frame t-1?
        if match == "any":
            return True
        p, q = int(positions[t, i]), int(positions[t - 1, j])
        if p == -1 or q == -1:  # no position: never
            return False
        if p <= -2 or q <= -2:  # a slot: only the same slot
            return p == q
        if match == "radius":
            (pr, pc), (qr, qc) = divmod(p, grid_width), divmod(q, grid_width)
            return abs(pr - qr) <= radius and abs(pc - qc) <= radius
        return p == q

    parent, below = {}, []
    for t in range(1, frames):
        for i in range(first, k):
            candidates = [j for j in range(first, k) if allowed(t, i, j)]
            if not candidates:
                continue
            sims = [min(1.0, float(torch.dot(unit[t, i], unit[t - 1, j]))) for j in candidates]
            best = max(sims)
            j = candidates[sims.index(best)]
            if best >= threshold:
                parent[(t, i)] = (t - 1, j)
            else:
                below.append((-best, t, i, j))
    if max_tokens is not None:
        for _, t, i, j in sorted(below)[: max(0, frames * k - len(parent) - max_tokens)]:
            parent[(t, i)] = (t - 1, j)

    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for t in range(frames):
        for i in range(k):
            root = (t, i)
            while root in parent:
                root = parent[root]
            groups.setdefault(root, []).append(tokens[t, i])
    roots = sorted(groups)
    return MergeResult(
        torch.stack([tokens[r] if match == "prune" else torch.stack(groups[r]).mean(dim=0) for r in roots]),
        torch.tensor([r[0] for r in roots]),
        torch.tensor([len(groups[r]) for r in roots]),
        torch.tensor([t * k + i for t, i in roots]),
    )


def video_tokens(frames=6, k=9, dim=16, dtype=torch.float32, seed=0):
    """Frames that drift: each is the previous plus noise of a per-token scale, with tokens shuffled."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(k, dim, generator=g, dtype=dtype)]
    scale = torch.rand(k, 1, generator=g, dtype=dtype) * 0.8
    for _ in range(1, frames):
        step = out[-1] + scale * torch.randn(k, dim, generator=g, dtype=dtype)
        moved = torch.randperm(k - 1, generator=g) + 1
        out.append(torch.cat([step[:1], step[moved]]))
    return torch.stack(out)


def assert_same(result: MergeResult, expected: MergeResult, atol=1e-6):
    assert torch.equal(result.frame, expected.frame)
    assert torch.equal(result.first, expected.first)
    assert torch.equal(result.size, expected.size)
    torch.testing.assert_close(result.tokens, expected.tokens, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [0.85, 0.9, 0.97])
@pytest.mark.parametrize("protect_first", [True, False])
def test_matches_reference(dtype, threshold, protect_first):
    tokens = video_tokens(dtype=dtype, seed=int(threshold * 100) + protect_first)
    result = merge_frames(tokens, threshold=threshold, protect_first=protect_first)
    assert result.tokens.dtype == dtype
    assert result.frame.dtype == result.size.dtype == torch.long
    assert int(result.size.sum()) == tokens.shape[0] * tokens.shape[1]
    assert_same(result, reference_merge(tokens, threshold, protect_first))


@pytest.mark.parametrize("protect_first", [True, False])
@pytest.mark.parametrize("max_tokens", [15, 20, 33, 54])
def test_max_tokens_folds_the_most_similar_pairs_next(protect_first, max_tokens):
    tokens = video_tokens(seed=max_tokens)  # 6 frames x 9 tokens = 54
    plain = merge_frames(tokens, threshold=0.97, protect_first=protect_first)
    result = merge_frames(tokens, threshold=0.97, protect_first=protect_first, max_tokens=max_tokens)
    assert len(result.size) == min(max_tokens, len(plain.size))
    assert_same(result, reference_merge(tokens, 0.97, protect_first, max_tokens))


def test_max_tokens_at_the_floor_leaves_frame_zero_and_protected_tokens():
    tokens = video_tokens(frames=5, k=7, seed=3)
    result = merge_frames(tokens, threshold=2.0, max_tokens=7 + 4)
    assert result.frame.tolist() == [0] * 7 + [1, 2, 3, 4]
    assert result.size[7:].tolist() == [1, 1, 1, 1]


def test_max_tokens_below_floor():
    tokens = video_tokens(frames=5, k=7)
    with pytest.raises(ValueError, match="max_tokens=10 is below the 11 tokens.*T=5 frames of K=7"):
        merge_frames(tokens, max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens=6 is below the 7 tokens"):
        merge_frames(tokens, protect_first=False, max_tokens=6)


def test_threshold_above_one_changes_nothing():
    tokens = video_tokens(frames=4, k=5)
    tokens[2] = tokens[1]  # even identical frames stay apart
    result = merge_frames(tokens, threshold=1.0 + 1e-6)
    assert torch.equal(result.tokens, tokens.reshape(20, -1))
    assert result.frame.tolist() == [t for t in range(4) for _ in range(5)]
    assert result.size.tolist() == [1] * 20


@pytest.mark.parametrize("protect_first", [True, False])
def test_identical_frames_collapse_to_frame_zero(protect_first):
    frame = video_tokens(frames=1, k=6)[0]
    tokens = frame.expand(8, 6, 16).clone()
    result = merge_frames(tokens, threshold=0.999, protect_first=protect_first)
    if protect_first:
        assert result.frame.tolist() == [0] * 6 + list(range(1, 8))
        assert result.size.tolist() == [1] + [8] * 5 + [1] * 7
        torch.testing.assert_close(result.tokens, torch.cat([frame, frame[:1].expand(7, -1)]))
    else:
        assert result.frame.tolist() == [0] * 6
        assert result.size.tolist() == [8] * 6
        torch.testing.assert_close(result.tokens, frame)


def test_chain_collapses_a_drifting_token_into_its_first_appearance():
    # Token 1 turns 10 degrees per frame: adjacent frames match (cos 0.985), frames 0 and 7 do not (0.34).
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(8, 4, 64, generator=g)
    angles = torch.arange(8) * math.radians(10)
    tokens[:, 1] = 0
    tokens[:, 1, 0], tokens[:, 1, 1] = angles.cos(), angles.sin()
    result = merge_frames(tokens, threshold=0.95)
    assert result.size.tolist().count(8) == 1  # random 64-d tokens never reach 0.95
    assert result.size.sum() == 32 and len(result.size) == 32 - 7
    group = result.size.tolist().index(8)
    assert group == 1 and result.frame[group] == 0
    torch.testing.assert_close(result.tokens[group], tokens[:, 1].mean(dim=0))


def test_fold_joins_the_group_of_the_match_as_size_weighted_mean():
    # Frame 2's token 2 matches frame 1's token 1, which folded into frame 0's token 1: one group of 3.
    a, b, c, x = torch.eye(4)
    a_b, a_c = a + 0.05 * b, a + 0.05 * c  # cosine 0.9988 with a, 0.9975 with each other
    tokens = torch.stack(
        [torch.stack([x, a, c]), torch.stack([x, a_b, b + c]), torch.stack([x, b + c - a, a_c])]
    )
    result = merge_frames(tokens, threshold=0.99)
    # groups: CLS0, a-group, c, CLS1, b+c, CLS2, b+c-a (best cosine 0.816 with b+c: stays)
    assert result.frame.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert result.size.tolist() == [1, 3, 1, 1, 1, 1, 1]
    torch.testing.assert_close(result.tokens[1], (a + a_b + a_c) / 3)


def test_protected_tokens_are_neither_folded_nor_fold_targets():
    a, b, c, x = torch.eye(4)
    tokens = torch.stack([torch.stack([x, a, b]), torch.stack([a, x, b])])  # CLS and token 1 swap roles
    protected = merge_frames(tokens, threshold=0.99)
    assert protected.frame.tolist() == [0, 0, 0, 1, 1]  # only b folds
    assert protected.size.tolist() == [1, 1, 2, 1, 1]
    unprotected = merge_frames(tokens, threshold=0.99, protect_first=False)
    assert unprotected.frame.tolist() == [0, 0, 0]
    assert unprotected.size.tolist() == [2, 2, 2]


def test_single_frame_is_identity():
    tokens = video_tokens(frames=1, k=5)
    result = merge_frames(tokens, threshold=-1.0)
    assert torch.equal(result.tokens, tokens[0])
    assert result.size.tolist() == [1] * 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compare_in_float32(dtype):
    tokens = video_tokens(frames=6, k=9, seed=5).to(dtype)
    result = merge_frames(tokens, threshold=0.9, max_tokens=30)
    wide = merge_frames(tokens.float(), threshold=0.9, max_tokens=30)
    assert result.tokens.dtype == dtype
    assert torch.equal(result.frame, wide.frame) and torch.equal(result.size, wide.size)
    assert torch.equal(result.tokens, wide.tokens.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_stay_on_device(device):
    tokens = video_tokens(seed=7)
    result = merge_frames(tokens.to(device), threshold=0.9, max_tokens=40)
    assert {result.tokens.device.type, result.frame.device.type, result.size.device.type} == {device}
    assert result.first.device.type == device
    assert_same(
        MergeResult(result.tokens.cpu(), result.frame.cpu(), result.size.cpu(), result.first.cpu()),
        reference_merge(tokens, 0.9, True, 40),
        atol=1e-5,
    )


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"non-empty \[T, K, D\] tensor, got shape \(9, 16\)"):
        merge_frames(torch.randn(9, 16))
    with pytest.raises(ValueError, match=r"got shape \(0, 9, 16\)"):
        merge_frames(torch.randn(0, 9, 16))
    with pytest.raises(ValueError, match="tokens must be a floating tensor, got torch.int64"):
        merge_frames(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="threshold must be a finite number, got nan"):
        merge_frames(torch.randn(2, 3, 4), threshold=float("nan"))


# ---------------------------------------------------------------- position-aware folding


def placed_tokens(frames=6, k=10, contextual=2, width=4, dim=16, dtype=torch.float32, seed=0, slots=False):
    """Tokens that carry a patch position on a width x width grid, as VisionZip's are: token 0 is CLS and
    the last `contextual` have none (-1; with `slots` contextual token j is slot -2 - j and drifts
    slowly); the others sit at distinct patches. A patch's content is fixed (plus noise of a per-patch
    scale), so a token repeats the previous frame's at its own patch; some patches move their content
    one patch right each frame, as an object does."""
    g = torch.Generator().manual_seed(seed)
    patches = width * width
    content = torch.randn(frames + width, patches, dim, generator=g, dtype=dtype)
    scale = torch.rand(patches, 1, generator=g, dtype=dtype) * 0.6
    moving = torch.rand(patches, generator=g) < 0.3
    placed = k - 1 - contextual
    positions = torch.full((frames, k), -1, dtype=torch.long)
    tokens = torch.randn(frames, k, dim, generator=g, dtype=dtype)  # CLS and contextual: random
    for t in range(frames):
        pos = torch.randperm(patches, generator=g)[:placed].sort().values
        positions[t, 1 : 1 + placed] = pos
        row, col = pos // width, pos % width
        source = torch.where(moving[pos], row * width + (col - t) % width, pos)  # moving content shifts right
        noise = scale[pos] * torch.randn(placed, dim, generator=g, dtype=dtype)
        tokens[t, 1 : 1 + placed] = content[0, source] + noise
    if slots:
        positions[:, k - contextual :] = -2 - torch.arange(contextual)
        drift = 0.3 * torch.randn(frames, contextual, dim, generator=g, dtype=dtype)
        tokens[:, k - contextual :] = tokens[0, k - contextual :] + drift.cumsum(0)
    return tokens, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "match, radius", [("same", 1), ("radius", 0), ("radius", 1), ("radius", 2), ("prune", 1)]
)
@pytest.mark.parametrize("threshold", [0.5, 0.9])
@pytest.mark.parametrize("protect_first", [True, False])
@pytest.mark.parametrize("slots", [False, True])
def test_position_modes_match_reference(dtype, match, radius, threshold, protect_first, slots):
    seed = radius + int(threshold * 10) + 7 * protect_first
    tokens, positions = placed_tokens(dtype=dtype, seed=seed, slots=slots)
    kwargs = dict(match=match, positions=positions, radius=radius, grid_width=4)
    result = merge_frames(tokens, threshold=threshold, protect_first=protect_first, **kwargs)
    assert result.tokens.dtype == dtype
    assert int(result.size.sum()) == tokens.shape[0] * tokens.shape[1]
    expected = reference_merge(tokens, threshold, protect_first, **kwargs)
    assert len(expected.size) < 60  # the case folds something
    assert_same(result, expected)


@pytest.mark.parametrize("match", ["same", "radius", "prune"])
@pytest.mark.parametrize("max_tokens", [16, 40, 50])
def test_position_modes_max_tokens_fold_only_allowed_pairs(match, max_tokens):
    tokens, positions = placed_tokens(seed=max_tokens)  # 6 frames x 10 tokens = 60
    slotted = placed_tokens(seed=max_tokens, slots=True)[1]
    kwargs = dict(match=match, positions=slotted, radius=1, grid_width=4)
    result = merge_frames(tokens, threshold=0.97, max_tokens=max_tokens, **kwargs)
    assert_same(result, reference_merge(tokens, 0.97, True, max_tokens, **kwargs))
    kwargs = dict(match=match, positions=positions, radius=1, grid_width=4)
    result = merge_frames(tokens, threshold=0.97, max_tokens=max_tokens, **kwargs)
    assert_same(result, reference_merge(tokens, 0.97, True, max_tokens, **kwargs))
    # only a token with an allowed match can fold: the floor is every such token folded
    floor = len(merge_frames(tokens, threshold=-1.0, **kwargs).size)
    assert floor >= 10 + 5 * 3  # frame 0, then each frame's CLS and 2 contextual tokens
    assert len(result.size) == max(max_tokens, floor)


def test_any_folds_a_moving_object_same_keeps_it_radius_follows_it():
    # an object (the same features every frame) moves one patch right per frame over a static background
    g = torch.Generator().manual_seed(0)
    cls, background, obj, context = torch.randn(4, 32, generator=g)
    frames = 4
    tokens = torch.stack([torch.stack([cls, background, obj, context + 0.1 * t]) for t in range(frames)])
    positions = torch.tensor([[-1, 15, t, -1] for t in range(frames)])  # background stays at patch 15
    kwargs = dict(positions=positions, grid_width=4)
    anywhere = merge_frames(tokens, threshold=0.9, match="any")
    same = merge_frames(tokens, threshold=0.9, match="same", **kwargs)
    near = merge_frames(tokens, threshold=0.9, match="radius", radius=1, **kwargs)
    # any: background, object and contextual token each fold into frame 0's: only the CLS remain
    assert anywhere.size.tolist() == [1, 4, 4, 4, 1, 1, 1]
    # same: the background folds; the object (a new patch each frame) and the contextual token stay
    assert same.frame.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert same.size.tolist() == [1, 4, 1, 1] + [1, 1, 1] * 3
    # radius 1: the object is within a patch of where it was, so it follows its own chain
    assert near.size.tolist() == [1, 4, 4, 1] + [1, 1] * 3


def test_same_and_prune_keep_the_same_tokens_prune_does_not_average():
    tokens, positions = placed_tokens(seed=11)
    kwargs = dict(positions=positions, threshold=0.6)
    same = merge_frames(tokens, match="same", **kwargs)
    pruned = merge_frames(tokens, match="prune", **kwargs)
    radius_zero = merge_frames(tokens, match="radius", radius=0, grid_width=4, **kwargs)
    assert_same(radius_zero, same)
    assert torch.equal(same.frame, pruned.frame) and torch.equal(same.size, pruned.size)  # equal counts
    folded = same.size > 1
    assert folded.any()
    # prune: each kept token is an input token as it came in (its group's first member)
    flat = tokens.flatten(0, 1)
    assert all((flat == token).all(dim=1).any() for token in pruned.tokens)
    torch.testing.assert_close(pruned.tokens[~folded], same.tokens[~folded])
    assert not torch.isclose(pruned.tokens[folded], same.tokens[folded]).all(dim=1).any()


def test_tokens_without_position_never_fold_nor_are_targets():
    frame = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    tokens = frame.expand(3, 5, 8).clone()  # three identical frames
    positions = torch.tensor([-1, 0, 1, -1, -1]).expand(3, 5)
    for match in ("same", "radius", "prune"):
        result = merge_frames(tokens, threshold=0.5, protect_first=False, match=match, positions=positions,
                              grid_width=2)
        assert result.size.tolist() == [1, 3, 3, 1, 1] + [1, 1, 1] * 2, match
        # slots: token 3 folds into its own slot; token 4's slot differs each frame, so it never does
        slotted = torch.tensor([[-1, 0, 1, -2, -3], [-1, 0, 1, -2, -4], [-1, 0, 1, -2, -5]])
        result = merge_frames(tokens, threshold=0.5, protect_first=False, match=match, positions=slotted,
                              grid_width=2, radius=5)
        assert result.size.tolist() == [1, 3, 3, 3, 1] + [1, 1] * 2, match
    # positions are ignored by `any`
    assert merge_frames(tokens, threshold=0.5, positions=positions).size.tolist() == [1, 3, 3, 3, 3, 1, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_position_modes_stay_on_device(device):
    tokens, positions = placed_tokens(seed=5)
    result = merge_frames(tokens.to(device), threshold=0.6, max_tokens=30, match="radius",
                          positions=positions.to(device), radius=1, grid_width=4)
    assert {result.tokens.device.type, result.frame.device.type, result.size.device.type} == {device}
    assert_same(
        MergeResult(result.tokens.cpu(), result.frame.cpu(), result.size.cpu(), result.first.cpu()),
        reference_merge(tokens, 0.6, True, 30, match="radius", positions=positions, radius=1, grid_width=4),
        atol=1e-5,
    )


def test_bad_position_inputs():
    tokens, positions = placed_tokens(frames=2, k=5, contextual=1)
    with pytest.raises(ValueError, match="match must be one of any, same, radius, prune, got 'near'"):
        merge_frames(tokens, match="near", positions=positions)
    with pytest.raises(ValueError, match=r"match='same' needs the tokens' positions"):
        merge_frames(tokens, match="same")
    with pytest.raises(ValueError, match=r"integer \[T=2, K=5\] tensor, got torch.int64 of shape \(2, 4\)"):
        merge_frames(tokens, match="same", positions=positions[:, :4])
    with pytest.raises(ValueError, match="got torch.float32 of shape"):
        merge_frames(tokens, match="same", positions=positions.float())
    with pytest.raises(ValueError, match="match='radius' needs grid_width"):
        merge_frames(tokens, match="radius", positions=positions)
    with pytest.raises(ValueError, match="radius must be an int >= 0"):
        merge_frames(tokens, match="radius", positions=positions, radius=-1, grid_width=4)


# ---------------------------------------------------------------- the encode stage's positions


def temporal_config(method="visionzip", dominant=14, contextual=3, **temporal):
    return CompressionConfig(method, dominant, contextual, TemporalConfig(enabled=True, **temporal))


def video(frames=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("method", ["visionzip", "none", "random", "pool"])
def test_encode_stage_positions_of_each_method(tiny, method):
    model = tiny[0]
    match = "any" if method == "pool" else "same"
    stage = EncodeStage(model, compression=temporal_config(method, 4, 1, match=match))
    pixels = stage.preprocess(video(), model.device, model.dtype)
    seeds = [11, 12, 13]
    tokens, positions, _ = stage._frame_tokens(pixels, seeds)
    plain = EncodeStage(model, compression=CompressionConfig(method, 4, 1))._frame_tokens(pixels, seeds)
    assert plain[1] is None and torch.equal(tokens, plain[0])  # positions change nothing about the tokens
    if method == "pool":
        assert positions is None  # `any` needs none
        return
    if method == "visionzip":
        index = zip_clip(model.model.video_tower, pixels, dominant=4, contextual=1, layer=-2).dominant_index
        expected = torch.cat([index - 1, torch.full((3, 1), -1)], dim=1)
        slotted = temporal_config(method, 3, 2, match=match, fold_contextual=True)
        slots = EncodeStage(model, compression=slotted)._frame_tokens(pixels, seeds)[1]
        assert slots[:, 3:].tolist() == [[-2, -3]] * 3
    elif method == "none":
        expected = torch.arange(-1, 256).expand(3, 257)
    else:
        expected = random_patch_index(3, 257, 5, seeds) - 1
    assert torch.equal(positions, expected)
    assert positions[:, 0].tolist() == [-1, -1, -1]  # CLS has none


def test_encode_stage_same_folds_the_dominant_patches_of_a_static_video(tiny):
    model = tiny[0]
    static = np.repeat(video(1, seed=3), 8, axis=0)
    kept = {match: EncodeStage(model, compression=temporal_config(match=match, threshold=0.9))
            .compressed_tokens([static])[0] for match in ("any", "same", "radius", "prune")}  # fmt: skip
    assert len(kept["any"]) == 17 + 7  # every frame but its CLS folds into frame 0
    # position modes: each later frame keeps its CLS and 3 contextual tokens; its 13 patches fold
    assert {match: len(tokens) for match, tokens in kept.items() if match != "any"} == dict.fromkeys(
        ("same", "radius", "prune"), 17 + 7 * 4)
    slots = EncodeStage(model, compression=temporal_config(match="same", threshold=0.9, fold_contextual=True))
    assert len(slots.compressed_tokens([static])[0]) == 17 + 7  # the contextual tokens fold into their slot
    full = EncodeStage(model, compression=temporal_config("none", match="same", threshold=0.9))
    assert len(full.compressed_tokens([static])[0]) == 257 + 7
    mixed = EncodeStage(model, compression=temporal_config(match="same", threshold=0.9), frame_batch_size=3)
    alone = mixed.compressed_tokens([static])[0]
    together = mixed.compressed_tokens([video(5, seed=4), static])[1]  # positions split per video
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_compression_config_checks_the_temporal_keys():
    assert CompressionConfig(temporal=TemporalConfig(match="radius", radius=2)).problems() == []
    assert CompressionConfig(temporal=TemporalConfig(match="x")).problems() == [
        "temporal.match='x' is not one of any, same, radius, prune"
    ]
    assert CompressionConfig(temporal=TemporalConfig(radius=-1)).problems() == [
        "temporal.radius=-1 must be an integer >= 0 (patches)"
    ]
    pool = CompressionConfig("pool", temporal=TemporalConfig(enabled=True, match="same"))
    assert pool.problems() == [
        "temporal.match='same' folds tokens by patch position and method=pool has no positions (its tokens "
        "are pooled cells): use temporal.match=any"
    ]
    assert CompressionConfig("pool", temporal=TemporalConfig(enabled=True, match="any")).problems() == []
