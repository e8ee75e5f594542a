"""VisionZip core: `zip_tokens` against a plain-loop reading of the official rules, and `zip_clip` against
`zip_tokens` on what an eager CLIP returns with `output_attentions`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, VideoLlavaConfig
from transformers import VideoLlavaForConditionalGeneration as VideoLlava

from visionzip import ZipResult, clip_selection_layer_outputs, zip_clip, zip_tokens

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


def reference_zip(features, cls_attn, metric, dominant, contextual):
    """The official rules one frame and one token at a time, in the inputs' own dtype."""
    tokens, dominant_rows, size_rows = [], [], []
    for b in range(features.shape[0]):
        n = features.shape[1]
        score = cls_attn[b, :, 1:].sum(dim=0).tolist()
        ranked = sorted(range(1, n), key=lambda i: -score[i - 1])
        kept = sorted([0, *ranked[: dominant - 1]])
        rest = [i for i in range(n) if i not in kept]
        out = [features[b, i] for i in kept]
        sizes = []
        if contextual:
            step = max(1, len(rest) // contextual)
            targets = list(range(0, len(rest), step))[:contextual]
            unit = [metric[b, i] / metric[b, i].norm() for i in rest]
            members = {t: [] for t in targets}
            for j in range(len(rest)):
                if j in targets:
                    continue
                sims = [float(torch.dot(unit[j], unit[t])) for t in targets]
                members[targets[sims.index(max(sims))]].append(j)
            for t in targets:
                token = features[b, rest[t]].clone()
                if members[t]:
                    token = token + torch.stack([features[b, rest[j]] for j in members[t]]).mean(dim=0)
                out.append(token)
                sizes.append(1 + len(members[t]))
        tokens.append(torch.stack(out))
        dominant_rows.append(kept)
        size_rows.append(sizes)
    return torch.stack(tokens), torch.tensor(dominant_rows), torch.tensor(size_rows, dtype=torch.long)


def random_inputs(batch=3, n=50, dim=16, heads=4, key_dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, dim, generator=g, dtype=dtype)
    cls_attn = torch.randn(batch, heads, n, generator=g, dtype=dtype).softmax(dim=-1)
    metric = torch.randn(batch, n, key_dim, generator=g, dtype=dtype)
    return features, cls_attn, metric


def assert_same(result: ZipResult, expected, atol=1e-5):
    tokens, dominant_index, contextual_size = expected
    assert torch.equal(result.dominant_index, dominant_index)
    assert torch.equal(result.contextual_size, contextual_size.view(result.contextual_size.shape))
    torch.testing.assert_close(result.tokens, tokens, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("n", "dominant", "contextual"),
    [
        (50, 14, 3),
        (50, 1, 7),
        (50, 40, 10),
        (50, 43, 7),
        (50, 50, 0),
        (50, 10, 0),
        (257, 54, 10),
        (17, 1, 16),
    ],
)
def test_matches_reference(dtype, n, dominant, contextual):
    features, cls_attn, metric = random_inputs(n=n, dtype=dtype, seed=n + dominant + contextual)
    result = zip_tokens(features, cls_attn, metric, dominant=dominant, contextual=contextual)
    assert result.tokens.shape == (3, dominant + contextual, 16)
    assert result.tokens.dtype == dtype
    assert_same(result, reference_zip(features, cls_attn, metric, dominant, contextual))
    assert result.contextual_size.sum(dim=1).tolist() == [n - dominant if contextual else 0] * 3


def test_dominant_counts_cls_and_is_raster_ordered():
    features, cls_attn, metric = random_inputs(batch=1, n=10)
    cls_attn = torch.zeros(1, 2, 10)
    cls_attn[0, :, 0] = 100.0  # CLS attending to itself is never ranked
    cls_attn[0, 0, 7], cls_attn[0, 1, 3], cls_attn[0, 1, 5] = 0.9, 0.5, 0.45
    cls_attn[0, 0, 5] = 0.1  # head sum: 7 -> 0.9, 3 -> 0.5, 5 -> 0.55
    result = zip_tokens(features, cls_attn, metric, dominant=3, contextual=0)
    assert result.dominant_index.tolist() == [[0, 5, 7]]
    assert torch.equal(result.tokens, features[:, [0, 5, 7]])


def test_contextual_is_target_plus_mean_of_members_first_on_ties():
    # 7 tokens, dominant 2 keeps CLS and token 6; the rest 1..5 -> targets at 0 and 2 (tokens 1 and 3).
    features = torch.arange(7.0).view(1, 7, 1) * torch.tensor([1.0, 10.0])
    cls_attn = torch.zeros(1, 1, 7)
    cls_attn[0, 0, 6] = 1.0
    # token:                 CLS      1 (A)   2         3 (B)   4         5 (tie)  6 (dominant)
    metric = torch.tensor([[[1, 1], [1, 0], [0.9, 0.1], [0, 1], [0.1, 1], [1, 1], [5, 5]]])
    # members: token 2 -> target 1, token 4 -> target 3, token 5 ties both (cosine 0.707) -> first (1)
    result = zip_tokens(features, cls_attn, metric, dominant=2, contextual=2)
    assert result.dominant_index.tolist() == [[0, 6]]
    assert result.contextual_size.tolist() == [[3, 2]]
    expected = torch.stack(
        [features[0, 1] + (features[0, 2] + features[0, 5]) / 2, features[0, 3] + features[0, 4]]
    )
    torch.testing.assert_close(result.tokens[0, 2:], expected)


def test_target_without_members_stands_alone():
    features, cls_attn, metric = random_inputs(batch=2, n=12)
    result = zip_tokens(features, cls_attn, metric, dominant=8, contextual=4)
    rest = [[i for i in range(12) if i not in row] for row in result.dominant_index.tolist()]
    assert result.contextual_size.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert torch.equal(result.tokens[:, 8:], torch.stack([features[b, rest[b]] for b in range(2)]))


def test_dominant_all_is_identity():
    features, cls_attn, metric = random_inputs(n=20)
    result = zip_tokens(features, cls_attn, metric, dominant=20, contextual=0)
    assert torch.equal(result.tokens, features)
    assert result.dominant_index.tolist() == [list(range(20))] * 3
    assert result.contextual_size.shape == (3, 0)


def test_batch_equals_frames_one_by_one():
    features, cls_attn, metric = random_inputs(batch=4, n=40)
    whole = zip_tokens(features, cls_attn, metric, dominant=9, contextual=5)
    for b in range(4):
        one = zip_tokens(
            features[b : b + 1], cls_attn[b : b + 1], metric[b : b + 1], dominant=9, contextual=5
        )
        assert torch.equal(one.dominant_index, whole.dominant_index[b : b + 1])
        assert torch.equal(one.contextual_size, whole.contextual_size[b : b + 1])
        torch.testing.assert_close(one.tokens, whole.tokens[b : b + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_rank_in_float32(dtype):
    features, cls_attn, metric = (t.to(dtype) for t in random_inputs(n=60))
    result = zip_tokens(features, cls_attn, metric, dominant=12, contextual=4)
    wide = zip_tokens(features.float(), cls_attn.float(), metric.float(), dominant=12, contextual=4)
    assert result.tokens.dtype == dtype
    assert torch.equal(result.dominant_index, wide.dominant_index)
    assert torch.equal(result.contextual_size, wide.contextual_size)
    assert torch.equal(result.tokens, wide.tokens.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_stay_on_device(device):
    features, cls_attn, metric = (t.to(device) for t in random_inputs(n=30))
    result = zip_tokens(features, cls_attn, metric, dominant=6, contextual=3)
    assert {
        result.tokens.device.type,
        result.dominant_index.device.type,
        result.contextual_size.device.type,
    } == {device}
    assert_same(
        result, [t.to(device) for t in reference_zip(features.cpu(), cls_attn.cpu(), metric.cpu(), 6, 3)]
    )


@pytest.mark.parametrize(
    ("dominant", "contextual", "message"),
    [
        (0, 3, "dominant must be >= 1.*got 0"),
        (4, -1, "contextual must be >= 0, got -1"),
        (8, 3, r"8 \+ 3 = 11 exceeds the 10 tokens"),
    ],
)
def test_bad_counts(dominant, contextual, message):
    features, cls_attn, metric = random_inputs(n=10)
    with pytest.raises(ValueError, match=message):
        zip_tokens(features, cls_attn, metric, dominant=dominant, contextual=contextual)


def test_bad_shapes():
    features, cls_attn, metric = random_inputs(batch=2, n=10)
    with pytest.raises(ValueError, match=r"features must be 3-D, got shape \(10, 16\)"):
        zip_tokens(features[0], cls_attn, metric)
    with pytest.raises(ValueError, match=r"cls_attn must be \[B=2, H, N=10\].*got \(2, 4, 9\)"):
        zip_tokens(features, cls_attn[:, :, :9], metric, dominant=2, contextual=1)
    with pytest.raises(ValueError, match=r"metric must be \[B=2, N=10, d\].*got \(1, 10, 8\)"):
        zip_tokens(features, cls_attn, metric[:1], dominant=2, contextual=1)
    with pytest.raises(ValueError, match="features must be a floating tensor"):
        zip_tokens(features.long(), cls_attn, metric, dominant=2, contextual=1)


# ---- zip_clip on a tiny random CLIP (224 px / patch 14 = 257 tokens, as in Video-LLaVA) ----

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=224)


@pytest.fixture(scope="module")
def clip() -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(patch_size=14, **TINY)).eval()


@pytest.fixture(scope="module")
def eager_reference(clip):
    """Per layer: zip_tokens' inputs taken from the eager model's own outputs (the official way)."""
    eager = copy.deepcopy(clip)
    eager.set_attn_implementation("eager")
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    keys = []
    hooks = [
        block.self_attn.k_proj.register_forward_hook(lambda m, i, o: keys.append(o))
        for block in eager.encoder.layers
    ]
    with torch.inference_mode():
        out = eager(pixels, output_hidden_states=True, output_attentions=True)
    for hook in hooks:
        hook.remove()
    heads, head_dim = 4, 16
    metrics = [k.view(3, 257, heads, head_dim).mean(dim=2) for k in keys]
    return pixels, out, metrics


@pytest.mark.parametrize(
    ("layer", "dominant", "contextual"), [(-2, 54, 10), (-1, 14, 3), (1, 30, 5), (2, 257, 0)]
)
def test_zip_clip_equals_official_eager_path(clip, eager_reference, layer, dominant, contextual):
    assert clip.config._attn_implementation == "sdpa"
    pixels, out, metrics = eager_reference
    block = layer - 1 if layer > 0 else 4 + layer  # attentions[block] belongs to hidden_states[layer]
    expected = zip_tokens(
        out.hidden_states[layer], out.attentions[block][:, :, 0], metrics[block], dominant, contextual
    )
    with torch.inference_mode():
        result = zip_clip(clip, pixels, dominant=dominant, contextual=contextual, layer=layer)
        inputs = clip_selection_layer_outputs(clip, pixels, layer=layer)
    wanted = (out.hidden_states[layer], out.attentions[block][:, :, 0], metrics[block])
    for got, want in zip(inputs, wanted, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(result.dominant_index, expected.dominant_index)
    assert torch.equal(result.contextual_size, expected.contextual_size)
    torch.testing.assert_close(result.tokens, expected.tokens, atol=1e-5, rtol=0)


def test_zip_clip_skips_layers_after_the_selection_layer(clip):
    ran = []
    hooks = [
        block.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
        for i, block in enumerate(clip.encoder.layers)
    ]
    try:
        with torch.inference_mode():
            zip_clip(clip, torch.randn(1, 3, 224, 224), layer=-2)
            zip_clip(clip, torch.randn(1, 3, 224, 224), layer=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == [0, 1, 2, 0]


def test_zip_clip_accepts_a_wrapper_with_vision_model(clip, eager_reference):
    pixels, out, _ = eager_reference
    wrapper = nn.Module()
    wrapper.vision_model = clip
    with torch.inference_mode():
        result = zip_clip(wrapper, pixels, dominant=257, contextual=0)
    torch.testing.assert_close(result.tokens, out.hidden_states[-2], atol=1e-5, rtol=0)


def test_zip_clip_on_video_llava_tower():
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(patch_size=14, **TINY),
        text_config=LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ),
        image_token_index=62,
        video_token_index=63,
    )
    torch.manual_seed(0)
    tower = VideoLlava(config).eval().model.video_tower
    pixels = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        full = tower(pixels, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        result = zip_clip(tower, pixels, dominant=257, contextual=0, layer=config.vision_feature_layer)
    assert torch.equal(result.tokens, full)


def test_zip_clip_keeps_model_dtype(clip):
    half = copy.deepcopy(clip).to(torch.bfloat16)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        hidden = half(pixels, output_hidden_states=True).hidden_states[-2]
        result = zip_clip(half, pixels, dominant=20, contextual=4)
    assert result.tokens.dtype == torch.bfloat16
    assert torch.equal(
        result.tokens[:, :20], hidden.gather(1, result.dominant_index.unsqueeze(-1).expand(-1, -1, 64))
    )


@pytest.mark.parametrize("layer", [0, -5, 5])
def test_zip_clip_bad_layer(clip, layer):
    with pytest.raises(ValueError, match=f"1..4 or -4..-1.*got {layer}"):
        zip_clip(clip, torch.randn(1, 3, 224, 224), layer=layer)


def test_zip_clip_bad_pixels(clip):
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, H, W\], got shape \(3, 224, 224\)"):
        zip_clip(clip, torch.randn(3, 224, 224))
