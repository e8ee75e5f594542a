"""Equal-token-count controls for VisionZip: random patches, pooled grid, dominant only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.config import compose_job
from stages.encode import CompressionConfig, EncodeStage
from visionzip import clip_selection_layer_outputs
from visionzip.baselines import pool_grid, pool_tokens, random_patch_index, random_tokens
from visionzip.video_llava import COMPRESSION_METHODS, frame_tokens


def test_random_keeps_cls_and_distinct_patches_in_raster_order():
    features = torch.randn(5, 65, 8)
    tokens = random_tokens(features, 17, seed=3)
    index = random_patch_index(5, 65, 17, seed=3)
    assert tokens.shape == (5, 17, 8)
    assert (index[:, 0] == 0).all() and (index[:, 1:] > 0).all()
    assert (index.diff(dim=1) > 0).all()  # distinct, ascending
    assert torch.equal(tokens, features[torch.arange(5)[:, None], index])
    assert torch.equal(random_tokens(features, 17, seed=3), tokens)  # seeded
    assert not torch.equal(random_patch_index(5, 65, 17, seed=4), index)
    assert not torch.equal(index[0], index[1])  # each frame its own draw
    assert torch.equal(random_tokens(features, 65), features)  # keep everything = identity


@pytest.mark.parametrize(("count", "side", "grid"), [(4, 8, (2, 2)), (16, 16, (4, 4)), (12, 8, (3, 4)),
                                                     (13, 16, (1, 13)), (1, 8, (1, 1))])
def test_pool_grid_is_as_square_as_possible(count, side, grid):
    assert pool_grid(count, side) == grid


def test_pool_grid_that_does_not_fit_is_an_error():
    with pytest.raises(ValueError, match="11 pooled tokens need a 1 x 11 grid, wider than the 8 x 8"):
        pool_grid(11, 8)


def test_pool_averages_grid_cells():
    features = torch.randn(2, 1 + 16, 3, dtype=torch.float64)
    tokens = pool_tokens(features, 5)  # 4 x 4 grid -> 2 x 2 cells of 2 x 2 patches
    grid = features[:, 1:].reshape(2, 4, 4, 3)
    expected = torch.stack([grid[:, r : r + 2, c : c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], 1)
    assert torch.equal(tokens[:, 0], features[:, 0])
    torch.testing.assert_close(tokens[:, 1:], expected)
    assert torch.equal(pool_tokens(features, 1), features[:, :1])


def test_baselines_reject_bad_inputs():
    with pytest.raises(ValueError, match="keep must be in 1..17"):
        random_tokens(torch.randn(1, 17, 4), 18)
    with pytest.raises(ValueError, match="square patch grid, got 15 patches"):
        pool_tokens(torch.randn(1, 16, 4), 5)
    with pytest.raises(ValueError, match=r"features must be \[B, N, D\]"):
        pool_tokens(torch.randn(16, 4), 5)


def test_frame_tokens_baselines_use_the_selection_layer(tiny):
    model = tiny[0]
    pixels = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        features = clip_selection_layer_outputs(model.model.video_tower, pixels, -2)[0]
        rand = frame_tokens(model, pixels, method="random", dominant=10, contextual=6, seed=1)
        pool = frame_tokens(model, pixels, method="pool", dominant=14, contextual=3)
        full = frame_tokens(model, pixels, method="none")
    torch.testing.assert_close(features, full)
    assert torch.equal(rand, random_tokens(features, 16, seed=1))
    assert torch.equal(pool, pool_tokens(features, 17))
    with pytest.raises(ValueError, match="method must be one of"):
        frame_tokens(model, pixels, method="tome")


def test_encode_stage_runs_baselines_and_checks_the_pool_grid(tiny):
    video = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    for method in ("random", "pool"):
        encode = EncodeStage(tiny[0], compression=CompressionConfig(method=method, dominant=14, contextual=3))
        encoded = encode.encode([video])[0]
        assert encoded.visual_tokens_kept == encoded.visual_tokens_after_zip == 2 * 17
    with pytest.raises(ValueError, match="wider than the 16 x 16 patch grid"):
        EncodeStage(tiny[0], compression=CompressionConfig(method="pool", dominant=18, contextual=0))  # 1x17


@pytest.mark.parametrize("group", ["random", "pool", "dominant_only"])
def test_compression_groups_compose_and_validate(group, tmp_path):
    job = compose_job(f"compression={group}", f"data.manifest={tmp_path}/m.jsonl",
                      f"output.path={tmp_path}/o.jsonl")
    assert job.compression.method in COMPRESSION_METHODS
    assert job.compression.dominant + job.compression.contextual == 17


def test_random_control_draws_each_frame_from_its_own_pixels(tiny):
    # a video's random patches must not depend on its slot in a batch or on how frames are chunked
    # (nor, so, on runner=local vs ray): each frame is drawn from a seed of its own pixels
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8) for _ in range(3)]
    random_control = CompressionConfig(method="random", dominant=4, contextual=1)
    alone = EncodeStage(tiny[0], compression=random_control).compressed_tokens([videos[2]])[0]
    batched = EncodeStage(tiny[0], compression=random_control, frame_batch_size=4)
    in_a_batch = batched.compressed_tokens(videos)[2]  # frames 6..8: split over two tower chunks
    torch.testing.assert_close(in_a_batch, alone, atol=1e-5, rtol=1e-5)
    # frames are drawn apart: the same pixels in two frames give the same draw, others another
    index = random_patch_index(3, 65, 5, seed=[7, 7, 8])
    assert torch.equal(index[0], index[1]) and not torch.equal(index[0], index[2])
    with pytest.raises(ValueError, match="got 2 seeds for 3 frames"):
        random_patch_index(3, 65, 5, seed=[1, 2])
