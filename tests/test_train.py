"""Training the synthetic-QA model: both phases learn, the shared-prefix trick is exact, checkpoints load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from stages.answer import AnswerConfig, AnswerStage, GenerateConfig
from stages.encode import CompressionConfig, EncodeStage
from stages.model import load_video_llava
from synthqa.clips import COLORS, DIRECTIONS, frame_labels, synth_sample
from synthqa.lm import MotionProbe, motion_labels, shared_prefix_logits, train_lm
from synthqa.model import answer_token_ids, new_model, pixels_of, save_checkpoint, selection_features
from synthqa.optim import optimizer_and_schedule, optimizer_step
from synthqa.subsets import TokenSubsets, subset_index, token_subsets
from synthqa.tower import TowerHeads, cls_attention_loss, frame_label_batch, pretrain_tower
from visionzip import clip_selection_layer_outputs
from visionzip.video_llava import frame_tokens, project

SMALL = {"width": 32, "lm_width": 64, "lm_layers": 1}


def test_tower_pretraining_reduces_loss_deterministically():
    model, _ = new_model(0, **SMALL)
    losses = pretrain_tower(model, steps=16, clips=2, lr=3e-3, seed=0, log_every=0)
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4])  # seeded: the same losses on every run
    again, _ = new_model(0, **SMALL)
    assert pretrain_tower(again, steps=16, clips=2, lr=3e-3, seed=0, log_every=0) == losses


def test_cls_attention_loss_is_the_cross_entropy_of_the_head_mean_patch_attention():
    cls_attn = torch.tensor([[[0.5, 0.25, 0.25, 0.0], [0.2, 0.0, 0.4, 0.4]]])  # [1 frame, 2 heads, CLS + 3]
    share = torch.tensor([[0.0, 1.0, 0.0]])
    # head mean over the patches: 0.125, 0.325, 0.2 -> renormalised 0.325 / 0.65 = 0.5 on the target
    assert torch.isclose(cls_attention_loss(cls_attn, share), torch.tensor(np.log(2.0), dtype=torch.float32))


def test_tower_attention_loss_moves_the_cls_attention_onto_the_objects():
    samples = [synth_sample(6, i) for i in range(4)]
    objects = frame_label_batch(samples)["patch_color"] > 0

    def object_mass(model) -> float:
        with torch.no_grad():
            cls_attn = clip_selection_layer_outputs(model.model.video_tower, pixels_of(samples))[1]
        attn = cls_attn[:, :, 1:].mean(1)
        return float((attn * objects).sum() / attn.sum())

    plain, _ = new_model(0, **SMALL)
    pretrain_tower(plain, steps=16, clips=2, lr=3e-3, seed=0, log_every=0)
    taught, _ = new_model(0, **SMALL)
    pretrain_tower(taught, steps=16, clips=2, lr=3e-3, seed=0, log_every=0, attention_weight=1.0)
    assert object_mass(taught) > object_mass(plain) + 0.1


def test_lm_training_reduces_loss_and_leaves_the_tower_bit_identical():
    model, tokenizer = new_model(1, **SMALL)
    tower = {k: v.clone() for k, v in model.model.video_tower.state_dict().items()}
    losses = train_lm(model, tokenizer, steps=16, clips=2, lr=3e-3, seed=1, log_every=0)
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert all(torch.equal(v, model.model.video_tower.state_dict()[k]) for k, v in tower.items())


def test_shared_prefix_logits_equal_one_prompt_at_a_time():
    model, tokenizer = new_model(2, **SMALL)
    model.eval()
    samples = [synth_sample(4, i) for i in range(2)]
    questions = [q for s in samples for q in s.questions]
    targets = answer_token_ids(tokenizer, [q.answer for q in questions])
    answer = AnswerStage(model, tokenizer)
    with torch.no_grad():
        shared, _ = shared_prefix_logits(model, tokenizer, samples, targets)
        visual = project(model, selection_features(model, pixels_of(samples))).unflatten(0, (2, -1))
        embeds = [v.flatten(0, 1) for v in visual for _ in range(5)]
        inputs = answer.build_inputs(embeds, [q.question for q in questions])  # left-padded batch
        alone = model(**inputs, logits_to_keep=1).logits[:, -1]
    assert shared.shape == (10, 2, len(tokenizer))
    torch.testing.assert_close(shared[:, 0], alone, atol=1e-5, rtol=1e-5)


def test_checkpoint_is_fp16_and_answers_through_the_stages(tmp_path):
    model, tokenizer = new_model(3, **SMALL)
    folder = save_checkpoint(model, tokenizer, tmp_path / "synth")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    loaded, tok = load_video_llava(folder, dtype="float32", device="cpu")
    encoder = EncodeStage(loaded, compression=CompressionConfig("visionzip", dominant=4, contextual=1,
                                                                positions="compact"))  # in zip order
    assert (encoder.preprocess.shortest_edge, encoder.full_per_frame) == (112, 65)
    sample = synth_sample(0, 0)
    encoded = encoder.encode([sample.clip.frames])[0]
    assert (encoded.visual_tokens_full, encoded.visual_tokens_kept) == (8 * 65, 8 * 5)
    # the stage's embeddings are VisionZip's tokens of the training code's own pixels, projected
    with torch.no_grad():
        tokens = frame_tokens(loaded, pixels_of([sample]), method="visionzip", dominant=4, contextual=1)
        torch.testing.assert_close(encoded.embeds, project(loaded, tokens).flatten(0, 1))
    question = sample.questions[0].question
    answer = AnswerStage(loaded, tok, config=AnswerConfig(generation=GenerateConfig(max_new_tokens=2)))
    reply = answer.answer([encoded.embeds], [question])[0]
    # greedy: the reply's first token is the argmax of the model's next-token logits after the prompt
    with torch.no_grad():
        first = loaded(**answer.build_inputs([encoded.embeds], [question])).logits[0, -1].argmax()
    assert reply.token_ids[0] == int(first) and 1 <= reply.generated_tokens <= 2
    # fp16 storage: every weight within fp16 rounding of the trained float32 one
    trained = model.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, trained[name].half().float(), atol=0, rtol=0)


def test_answers_must_be_single_tokens():
    _, tokenizer = new_model(0, **SMALL)
    ids = answer_token_ids(tokenizer, ["red", "triangle"])
    assert ids.tolist() == tokenizer.convert_tokens_to_ids(["▁red", "▁triangle"])
    assert tokenizer.decode(ids[:1]) == "red"
    with pytest.raises(ValueError, match="single tokens"):
        answer_token_ids(tokenizer, ["purple"])


def test_token_subsets_keep_cls_and_raster_order_with_a_count_per_frame():
    frames, clips, n = 8, 3, 65
    # token (frame f, position p) holds the value f * 1000 + p, in every feature
    features = (torch.arange(clips * frames)[:, None] % frames * 1000 + torch.arange(n)).float()
    features = features[..., None].expand(-1, -1, 2)
    generator = torch.Generator().manual_seed(0)
    seen_full = seen_subset = 0
    for _ in range(20):
        out = token_subsets(features, clips, TokenSubsets(full=0.25), generator)
        values = out[..., 0].long()
        frame, position = values // 1000, values % 1000
        assert out.shape[0] == clips and torch.equal(out[..., 0], out[..., 1])
        if out.shape[1] == frames * n:
            seen_full += 1
            assert torch.equal(out, features.reshape(clips, -1, 2))
            continue
        seen_subset += 1
        for clip in range(clips):
            f, p = frame[clip].tolist(), position[clip].tolist()
            assert f == sorted(f) and set(f) == set(range(frames))  # frames in order, none left out
            for t in range(frames):
                kept = [q for g, q in zip(f, p, strict=True) if g == t]
                assert kept[0] == 0 and kept == sorted(set(kept))  # CLS first, then patches in raster order
                assert len(kept) == (frame[0] == t).sum()  # the same count per frame in every clip
        assert not torch.equal(position[0], position[1])  # each clip its own patches
    assert seen_full and seen_subset > seen_full


def test_object_subsets_keep_every_object_patch_then_random_background():
    frames, clips, patches = 8, 2, 64
    features = torch.arange(1 + patches).float().expand(clips * frames, -1)[..., None]  # value = position
    generator = torch.Generator().manual_seed(0)
    objects = torch.zeros(clips * frames, patches, dtype=torch.bool)
    objects[0, [5, 6, 13]] = True  # frame 0 of clip 0: 3 object patches
    objects[frames, 40] = True  # frame 0 of clip 1: 1
    objects[1::frames, 20] = True  # frame 1 of both clips: 1
    sizes = set()
    for _ in range(20):
        out = token_subsets(features, clips, TokenSubsets(full=0.0, objects=True), generator, objects)
        positions = out[..., 0].long()
        for clip in range(clips):
            kept = positions[clip].tolist()
            frame_starts = [i for i, p in enumerate(kept) if p == 0]
            assert len(frame_starts) == frames  # one CLS per frame
            first = kept[frame_starts[0] + 1 : frame_starts[1]]
            second = kept[frame_starts[1] + 1 : frame_starts[2]]
            wanted = {6, 7, 14} if clip == 0 else {41}  # token position = patch index + 1 (CLS first)
            assert wanted <= set(first) and 21 in second and first == sorted(first)
            assert len(first) >= 3  # the batch's most object patches in frame 0; clip 1 fills with background
        sizes.add(out.shape[1])
    assert len(sizes) > 5  # the amount of background varies
    two = token_subsets(features, clips, TokenSubsets(full=0.0, objects=True, patches=2), generator, objects)
    assert two.shape[1] == frames * 3  # CLS + 2 patches a frame
    assert set(two[0, 1:3, 0].long().tolist()) <= {6, 7, 14} and set(two[1, 1:3, 0].long().tolist()) >= {41}
    with pytest.raises(ValueError, match="object patch mask"):
        token_subsets(features, clips, TokenSubsets(full=0.0, objects=True), generator)


def test_tower_heads_read_only_the_chosen_cls_targets():
    count_only = TowerHeads(width=16, grid=8, cls_targets=("count",))
    assert count_only.cls[1].out_features == 3
    assert TowerHeads(width=16, grid=8).cls[1].out_features == 3 + 8 + 32  # count, colours present, columns
    every = ("count", "present", "shape", "x", "y")
    assert TowerHeads(width=16, grid=8, cls_targets=every).cls[1].out_features == 3 + 8 + 12 + 32 + 32
    with pytest.raises(ValueError, match="cls_targets"):
        TowerHeads(width=16, grid=8, cls_targets=("present",))


def test_lm_training_on_token_subsets_reduces_loss():
    model, tokenizer = new_model(4, **SMALL)
    losses = train_lm(model, tokenizer, steps=16, clips=2, lr=3e-3, seed=1, log_every=0,
                      augment=TokenSubsets(full=0.25))  # fmt: skip
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])


def test_motion_labels_mark_the_late_object_patches_with_their_direction():
    samples = [synth_sample(5, 2), synth_sample(5, 3)]
    index = subset_index(16, 65, 2, TokenSubsets(full=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(index[1], torch.arange(8 * 65))
    labels = motion_labels(frame_label_batch(samples)["patch_direction"], index).reshape(2, 8, 65)
    assert (labels[:, :4] == 0).all() and (labels[:, :, 0] == 0).all()  # early frames, CLS
    for clip, sample in enumerate(samples):
        color = torch.from_numpy(frame_labels(sample.clip)["patch_color"])
        for obj in sample.clip.objects:
            on = color[4:] == 1 + list(COLORS).index(obj.color)
            assert (labels[clip, 4:, 1:][on] == 1 + list(DIRECTIONS).index(obj.direction)).all()
        assert (labels[clip, 4:, 1:][color[4:] == 0] == 0).all()


def test_motion_probe_learns_from_the_llm_visual_tokens():
    model, tokenizer = new_model(5, **SMALL)
    samples = [synth_sample(8, i) for i in range(2)]
    targets = answer_token_ids(tokenizer, [q.answer for s in samples for q in s.questions])
    probe = MotionProbe(64, layer=1)
    opt = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=3e-3)
    losses = []
    for _ in range(12):
        _, loss = shared_prefix_logits(model, tokenizer, samples, targets, motion=probe)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = optimizer_and_schedule([weight], lr=1.0, steps=40)  # warm-up: 40 // 10 + 1 = 5
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer_step(optimizer, scheduler, [weight], (weight - 1).square().sum())
    assert rates[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    progress = (np.arange(5, 40) - 5) / 35
    assert rates[5:] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))
    assert weight.grad is None and weight.detach().tolist() != [0.0, 0.0]  # stepped, gradients cleared
