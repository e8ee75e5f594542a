"""Temporal merging: `merge_frames` against a plain-loop reading of its rules, and each rule on its own."""

from __future__ import annotations

import math

import pytest
import torch

from visionzip import MergeResult, merge_frames

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


def reference_merge(tokens, threshold, protect_first, max_tokens=None):
    """The rules token by token: parent links to frame t-1, then roots by following the links."""
    frames, k, _ = tokens.shape
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    first = 1 if protect_first else 0
    parent, below = {}, []
    for t in range(1, frames):
        for i in range(first, k):
            sims = [min(1.0, float(torch.dot(unit[t, i], unit[t - 1, j]))) for j in range(first, k)]
            best = max(sims)
            j = first + sims.index(best)
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
        torch.stack([torch.stack(groups[r]).mean(dim=0) for r in roots]),
        torch.tensor([r[0] for r in roots]),
        torch.tensor([len(groups[r]) for r in roots]),
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
    assert_same(
        MergeResult(result.tokens.cpu(), result.frame.cpu(), result.size.cpu()),
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
