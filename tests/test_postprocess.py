"""Semantic / instance / panoptic inference: hand-made cases with known answers, padded batches, and the vectorised
panoptic against a plain loop of the official algorithm on random outputs."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from m2f.errors import InputError
from m2f.postprocess import instance, mask_boxes, panoptic, resize_mask_logits, semantic
from tests.utils import rel_err




def _logit_for(prob: float) -> float:
    return math.log(prob / (1 - prob))


def _class_logits(rows: list[tuple[int, float]], num_classes: int) -> torch.Tensor:
    """(Q, K+1) logits: query q puts logit L on class c, 0 elsewhere. softmax prob of c = e^L / (e^L + K)."""
    out = torch.zeros(len(rows), num_classes + 1)
    for q, (c, logit) in enumerate(rows):
        out[q, c] = logit
    return out


def _softmax_score(logit: float, num_classes: int) -> float:
    return math.exp(logit) / (math.exp(logit) + num_classes)


# ---------------------------------------------------------------------------------------------------------------
# reference: the official algorithm, written as a plain loop over queries (what maskformer_model.py does)
# ---------------------------------------------------------------------------------------------------------------


def _official_upsample(pred_masks, padded_size, image_sizes, original_sizes):
    """Whole batch to the padded size, then per image crop + resize (sem_seg_postprocess always resizes)."""
    up = F.interpolate(pred_masks.float(), size=padded_size, mode="bilinear", align_corners=False)
    out = []
    for i, ((h, w), (oh, ow)) in enumerate(zip(image_sizes, original_sizes)):
        crop = up[i, :, :h, :w].expand(1, -1, -1, -1)
        out.append(F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=False)[0])
    return out


def _official_panoptic(mask_cls, mask_logits, thing_ids, object_mask_threshold, overlap_threshold):
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    mask_pred = mask_logits.sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
    cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks
    h, w = mask_pred.shape[-2:]
    seg = torch.zeros((h, w), dtype=torch.int32, device=mask_logits.device)
    infos = []
    if cur_masks.shape[0] == 0:
        return seg, infos
    cur_mask_ids = cur_prob_masks.argmax(0)
    stuff_ids: dict[int, int] = {}
    next_id = 0
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k])
        isthing = pred_class in thing_ids
        mask_area = int((cur_mask_ids == k).sum())
        original_area = int((cur_masks[k] >= 0.5).sum())
        mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and int(mask.sum()) > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not isthing:
                if pred_class in stuff_ids:
                    seg[mask] = stuff_ids[pred_class]
                    continue
                stuff_ids[pred_class] = next_id + 1
            next_id += 1
            seg[mask] = next_id
            infos.append({"id": next_id, "isthing": isthing, "category_id": pred_class, "score": float(cur_scores[k])})
    return seg, infos


def _random_outputs(rng, batch, queries, num_classes, mask_hw, confident=0.6):
    """Logits where ~``confident`` of the queries are sure of one class (often a repeated one, so stuff merges),
    and masks where each query mostly owns a random blob of cells, with noise (so some overlaps fail the test)."""
    cls = torch.randn(batch, queries, num_classes + 1, generator=rng)
    sure = torch.rand(batch, queries, generator=rng) < confident
    chosen = torch.randint(0, num_classes + 1, (batch, queries), generator=rng)
    boost = 4.0 + 6.0 * torch.rand(batch, queries, generator=rng)
    cls.scatter_add_(2, chosen[..., None], (boost * sure)[..., None])
    coarse_hw = ((mask_hw[0] + 1) // 2, (mask_hw[1] + 1) // 2)
    owner = torch.randint(0, queries, (batch, 1, *coarse_hw), generator=rng)
    coarse = torch.where(owner == torch.arange(queries).view(1, -1, 1, 1), 3.0, -3.0)
    coarse = coarse + 1.5 * torch.randn(batch, queries, *coarse_hw, generator=rng)
    masks = F.interpolate(coarse, size=mask_hw, mode="bilinear", align_corners=False)
    masks = masks + 0.5 * torch.randn(batch, queries, *mask_hw, generator=rng)
    return cls, masks


# ---------------------------------------------------------------------------------------------------------------
# panoptic
# ---------------------------------------------------------------------------------------------------------------


def test_panoptic_nothing_above_threshold_is_all_void(rng):
    num_classes = 5
    cls = 0.1 * torch.randn(1, 4, num_classes + 1, generator=rng)  # every score ~ 1/6, far below 0.8
    masks = torch.randn(1, 4, 8, 8, generator=rng)
    (result,) = panoptic(cls, masks, [(30, 29)], [(30, 29)], (32, 32), thing_classes=(0, 1))
    assert result.segments == []
    assert result.segmentation.shape == (30, 29) and result.segmentation.dtype == torch.int32
    assert int(result.segmentation.abs().sum()) == 0


def test_panoptic_no_object_queries_are_dropped_even_when_confident():
    num_classes = 3
    cls = _class_logits([(num_classes, 9.0), (num_classes, 9.0)], num_classes)[None]
    masks = torch.full((1, 2, 4, 4), 5.0)
    (result,) = panoptic(cls, masks, [(4, 4)], [(4, 4)], (4, 4))
    assert result.segments == [] and int(result.segmentation.abs().sum()) == 0


def test_panoptic_stuff_of_one_class_merges_into_the_first_id():
    # 3 stuff classes (no things). Query 0: class 1 on the left half; query 1: class 2 on the top-right quarter;
    # query 2: class 1 again on the bottom-right quarter -> merges into query 0's segment (id 1).
    num_classes = 3
    cls = _class_logits([(1, 6.0), (2, 5.0), (1, 7.0)], num_classes)[None]
    h, w = 6, 8
    strong, weak = _logit_for(0.9), -8.0
    masks = torch.full((1, 3, h, w), weak)
    masks[0, 0, :, :4] = strong
    masks[0, 1, :3, 4:] = strong
    masks[0, 2, 3:, 4:] = strong
    (result,) = panoptic(cls, masks, [(h, w)], [(h, w)], (h, w), thing_classes=())
    expected = torch.zeros(h, w, dtype=torch.int32)
    expected[:, :4] = 1
    expected[:3, 4:] = 2
    expected[3:, 4:] = 1
    assert torch.equal(result.segmentation, expected)
    assert [(s.id, s.label, s.is_thing, s.area) for s in result.segments] == [(1, 1, False, 36), (2, 2, False, 12)]
    assert result.segments[0].score == pytest.approx(_softmax_score(6.0, num_classes), rel=1e-6)
    assert result.segments[1].score == pytest.approx(_softmax_score(5.0, num_classes), rel=1e-6)


def test_panoptic_overlapping_things_argmax_and_overlap_threshold():
    # Things 0 and 1 (classes 0, 1 are things). Query A (score ~0.97) covers rows 0..5; query B (score ~0.9)
    # rows 3..9 with the same mask prob, so A wins rows 3..5. B keeps 4 of its 7 rows: 4/7 < 0.8 -> dropped, and
    # its rows 6..9 become void. Query C (class 1, score ~0.9) covers rows 5..9 of other columns, query D (0.97)
    # rows 0..5 there: C keeps rows 6..9 = 4/5 = 0.8, not < 0.8 -> survives.
    num_classes = 4
    la, lb = 5.0, 3.6
    cls = _class_logits([(0, la), (1, lb), (0, la), (1, lb)], num_classes)[None]
    h, w = 10, 6
    p = _logit_for(0.9)
    masks = torch.full((1, 4, h, w), -9.0)
    masks[0, 0, 0:6, :3] = p  # A
    masks[0, 1, 3:10, :3] = p  # B
    masks[0, 2, 0:6, 3:] = p  # D
    masks[0, 3, 5:10, 3:] = p  # C
    assert _softmax_score(la, num_classes) > _softmax_score(lb, num_classes) > 0.8
    (result,) = panoptic(cls, masks, [(h, w)], [(h, w)], (h, w), thing_classes=(0, 1))
    expected = torch.zeros(h, w, dtype=torch.int32)
    expected[0:6, :3] = 1  # A; B's leftover rows 6..9 stay void
    expected[0:6, 3:] = 2  # D
    expected[6:10, 3:] = 3  # C
    assert torch.equal(result.segmentation, expected), result.segmentation
    assert [(s.id, s.label, s.is_thing, s.area) for s in result.segments] == [
        (1, 0, True, 18), (2, 0, True, 18), (3, 1, True, 12)
    ]
    # things of one class are never merged: A and D keep separate ids although both are class 0

    # with a lower overlap threshold B survives too and takes id 2 (ids follow query order)
    (loose,) = panoptic(cls, masks, [(h, w)], [(h, w)], (h, w), thing_classes=(0, 1), overlap_threshold=0.5)
    assert [s.id for s in loose.segments] == [1, 2, 3, 4]
    assert int((loose.segmentation == 2).sum()) == 12 and bool((loose.segmentation[6:, :3] == 2).all())


def test_panoptic_low_mask_prob_pixels_stay_void():
    # one confident stuff query whose mask prob is 0.9 on the left and 0.4 on the right: it wins every pixel by
    # argmax, but only prob >= 0.5 pixels are painted; ratio = 16 / 8 >= 0.8 keeps it.
    num_classes = 2
    cls = _class_logits([(1, 6.0)], num_classes)[None]
    masks = torch.full((1, 1, 4, 4), _logit_for(0.4))
    masks[0, 0, :, :2] = _logit_for(0.9)
    (result,) = panoptic(cls, masks, [(4, 4)], [(4, 4)], (4, 4))
    assert result.segmentation[:, :2].eq(1).all() and result.segmentation[:, 2:].eq(0).all()
    assert [(s.id, s.area) for s in result.segments] == [(1, 8)]


@pytest.mark.parametrize("trial", range(4))
def test_panoptic_vectorised_equals_official_loop(rng, trial):
    num_classes, queries = 7, 24
    thing_ids = (0, 2, 3)
    image_sizes = [(37, 50), (64, 31), (20, 64)]
    original_sizes = [(37, 50), (100, 47), (13, 40)]  # same size, upscaled, downscaled
    padded = (64, 64)
    cls, masks = _random_outputs(rng, 3, queries, num_classes, (16, 16))
    threshold = [0.8, 0.6, 0.5, 0.9][trial]
    results = panoptic(cls, masks, image_sizes, original_sizes, padded, thing_classes=thing_ids,
                       object_mask_threshold=threshold, overlap_threshold=0.8)
    upsampled = _official_upsample(masks, padded, image_sizes, original_sizes)
    total_segments = 0
    for i, result in enumerate(results):
        ref_seg, ref_infos = _official_panoptic(cls[i], upsampled[i], thing_ids, threshold, 0.8)
        msg = f"seed {rng.seed_value}, image {i}"
        assert torch.equal(result.segmentation, ref_seg), msg
        assert [(s.id, s.label, s.is_thing) for s in result.segments] == [
            (d["id"], d["category_id"], d["isthing"]) for d in ref_infos
        ], msg
        assert [s.score for s in result.segments] == [d["score"] for d in ref_infos], msg
        assert [s.area for s in result.segments] == [int((ref_seg == d["id"]).sum()) for d in ref_infos], msg
        total_segments += len(ref_infos)
    assert total_segments > 0, f"seed {rng.seed_value}: the random case produced no segment to compare"


def test_panoptic_padded_batch_equals_each_image_alone(rng):
    num_classes = 6
    cls, masks = _random_outputs(rng, 3, 16, num_classes, (12, 20))
    image_sizes = [(48, 80), (33, 47), (20, 70)]
    original_sizes = [(48, 80), (66, 94), (10, 35)]
    batched = panoptic(cls, masks, image_sizes, original_sizes, (48, 80), thing_classes=(0, 1),
                       object_mask_threshold=0.6)
    for i in range(3):
        (alone,) = panoptic(cls[i : i + 1], masks[i : i + 1], image_sizes[i : i + 1], original_sizes[i : i + 1],
                            (48, 80), thing_classes=(0, 1), object_mask_threshold=0.6)
        assert batched[i].segmentation.shape == original_sizes[i]
        assert torch.equal(batched[i].segmentation, alone.segmentation), f"seed {rng.seed_value}"
        assert [dataclasses.replace(s, score=0.0) for s in batched[i].segments] == \
            [dataclasses.replace(s, score=0.0) for s in alone.segments], f"seed {rng.seed_value}"
        # scores are float32 reductions over the batch: equal up to summation order
        torch.testing.assert_close(torch.tensor([s.score for s in batched[i].segments]),
                                   torch.tensor([s.score for s in alone.segments]), msg=f"seed {rng.seed_value}")


# ---------------------------------------------------------------------------------------------------------------
# instance
# ---------------------------------------------------------------------------------------------------------------


def test_instance_topk_order_and_score_formula(rng):
    num_classes, queries, h, w = 3, 4, 5, 6
    cls = torch.randn(1, queries, num_classes + 1, generator=rng) * 2
    masks = torch.randn(1, queries, h, w, generator=rng) * 3
    masks[0, 2] = -5.0  # an empty mask: score 0, zero box
    (result,) = instance(cls, masks, [(h, w)], [(h, w)], (h, w), topk=5)
    assert len(result) == 5

    probs = cls[0].double().softmax(-1)[:, :-1]  # (Q, K)
    top = probs.flatten().topk(5).indices
    expected = []
    for flat in top.tolist():
        q, c = divmod(flat, num_classes)
        binary = masks[0, q] > 0
        mask_score = (masks[0, q].double().sigmoid() * binary).sum() / (binary.sum() + 1e-6)
        expected.append((float(probs[q, c] * mask_score), q, c))
    expected.sort(key=lambda t: -t[0])
    assert result.scores.tolist() == pytest.approx([e[0] for e in expected], rel=1e-5), f"seed {rng.seed_value}"
    assert result.query_indices.tolist() == [e[1] for e in expected]
    assert result.labels.tolist() == [e[2] for e in expected]
    assert bool((result.scores[:-1] >= result.scores[1:]).all())
    for i, q in enumerate(result.query_indices.tolist()):
        assert torch.equal(result.masks[i], masks[0, q] > 0)
        if q == 2:
            assert result.scores[i] == 0 and result.boxes[i].abs().sum() == 0


def test_instance_keeps_only_things_when_asked():
    num_classes = 4
    # query 0 is sure of stuff class 3, query 1 of thing class 0
    cls = _class_logits([(3, 6.0), (0, 5.0)], num_classes)[None]
    masks = torch.full((1, 2, 4, 4), 3.0)
    (everything,) = instance(cls, masks, [(4, 4)], [(4, 4)], (4, 4), topk=8)
    assert len(everything) == 8 and everything.labels[0] == 3
    (things,) = instance(cls, masks, [(4, 4)], [(4, 4)], (4, 4), topk=8, thing_classes=(0, 1))
    assert set(things.labels.tolist()) <= {0, 1} and len(things) == 4  # 8 pairs, 4 of them thing classes
    assert things.labels[0] == 0 and things.query_indices[0] == 1


def test_instance_boxes_from_masks():
    masks = torch.zeros(3, 7, 9, dtype=torch.bool)
    masks[0, 2:5, 1:4] = True
    masks[1, 6, 8] = True
    boxes = mask_boxes(masks)
    assert boxes.tolist() == [[1.0, 2.0, 4.0, 5.0], [8.0, 6.0, 9.0, 7.0], [0.0, 0.0, 0.0, 0.0]]


def test_instance_padded_batch_equals_each_image_alone(rng):
    cls = torch.randn(2, 10, 5, generator=rng)
    masks = torch.randn(2, 10, 8, 12, generator=rng) * 3
    sizes, originals = [(32, 48), (17, 30)], [(32, 48), (40, 61)]
    batched = instance(cls, masks, sizes, originals, (32, 48), topk=7)
    for i in range(2):
        (alone,) = instance(cls[i : i + 1], masks[i : i + 1], sizes[i : i + 1], originals[i : i + 1], (32, 48), topk=7)
        assert batched[i].masks.shape == (7, *originals[i])
        for name in ("masks", "labels", "boxes", "query_indices"):
            assert torch.equal(getattr(batched[i], name), getattr(alone, name)), f"{name}, seed {rng.seed_value}"
        # float32 reductions over the batch: equal up to summation order (seen: 1e-7 apart)
        torch.testing.assert_close(batched[i].scores, alone.scores, msg=f"scores, seed {rng.seed_value}")


def test_instance_masks_use_the_official_resize(rng):
    cls = torch.randn(1, 6, 4, generator=rng)
    masks = torch.randn(1, 6, 8, 8, generator=rng) * 3
    (result,) = instance(cls, masks, [(27, 30)], [(54, 45)], (32, 32), topk=6)
    upsampled = _official_upsample(masks, (32, 32), [(27, 30)], [(54, 45)])[0]
    for i, q in enumerate(result.query_indices.tolist()):
        assert torch.equal(result.masks[i], upsampled[q] > 0), f"seed {rng.seed_value}"


# ---------------------------------------------------------------------------------------------------------------
# semantic
# ---------------------------------------------------------------------------------------------------------------


def test_semantic_argmax_on_a_hand_made_case():
    # two queries: class 0 on the top half, class 2 on the bottom half; class 1 never wins
    num_classes = 3
    cls = _class_logits([(0, 6.0), (2, 6.0)], num_classes)[None]
    masks = torch.full((1, 2, 4, 6), -6.0)
    masks[0, 0, :2] = 6.0
    masks[0, 1, 2:] = 6.0
    (result,) = semantic(cls, masks, [(4, 6)], [(4, 6)], (4, 6))
    expected = torch.zeros(4, 6, dtype=torch.long)
    expected[2:] = 2
    assert torch.equal(result.labels, expected)
    assert result.probabilities.shape == (3, 4, 6)


@pytest.mark.parametrize("before", [True, False])
def test_semantic_matches_float64_reference(rng, before):
    num_classes = 5
    cls = torch.randn(2, 7, num_classes + 1, generator=rng)
    masks = torch.randn(2, 7, 8, 16, generator=rng) * 2
    sizes, originals = [(32, 64), (25, 40)], [(32, 64), (50, 33)]
    results = semantic(cls, masks, sizes, originals, (32, 64), postprocess_before_inference=before)
    up = F.interpolate(masks.double(), size=(32, 64), mode="bilinear", align_corners=False)
    for i, r in enumerate(results):
        class_probs = cls[i].double().softmax(-1)[:, :-1]
        (h, w), (oh, ow) = sizes[i], originals[i]
        if before:
            m = F.interpolate(up[i : i + 1, :, :h, :w], size=(oh, ow), mode="bilinear", align_corners=False)[0]
            ref = torch.einsum("qc,qhw->chw", class_probs, m.sigmoid())
        else:  # official semantic-only order: infer on the padded size, then crop and resize the probabilities
            full = torch.einsum("qc,qhw->chw", class_probs, up[i].sigmoid())
            ref = F.interpolate(full[None, :, :h, :w], size=(oh, ow), mode="bilinear", align_corners=False)[0]
        assert r.probabilities.shape == (num_classes, oh, ow)
        assert rel_err(r.probabilities, ref) < 1e-5, f"seed {rng.seed_value}"
        assert torch.equal(r.labels, r.probabilities.argmax(0))
        agree = (r.labels == ref.argmax(0)).float().mean()
        assert agree > 0.999, f"seed {rng.seed_value}"


def test_semantic_padded_batch_equals_each_image_alone(rng):
    cls = torch.randn(2, 5, 4, generator=rng)
    masks = torch.randn(2, 5, 8, 8, generator=rng)
    sizes, originals = [(32, 32), (19, 23)], [(32, 32), (38, 46)]
    batched = semantic(cls, masks, sizes, originals, (32, 32))
    for i in range(2):
        (alone,) = semantic(cls[i : i + 1], masks[i : i + 1], sizes[i : i + 1], originals[i : i + 1], (32, 32))
        torch.testing.assert_close(batched[i].probabilities, alone.probabilities, msg=f"seed {rng.seed_value}")


# ---------------------------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------------------------


def test_resize_mask_logits_equals_official_path(rng):
    masks = torch.randn(5, 9, 13, generator=rng)
    ours = resize_mask_logits(masks, (36, 52), (30, 41), (61, 20))
    ref = _official_upsample(masks[None], (36, 52), [(30, 41)], [(61, 20)])[0]
    assert torch.equal(ours, ref), f"seed {rng.seed_value}"
    same = resize_mask_logits(masks, (36, 52), (30, 41), (30, 41))
    ref_same = _official_upsample(masks[None], (36, 52), [(30, 41)], [(30, 41)])[0]
    assert torch.equal(same, ref_same), "the skipped same-size resize must be an exact identity"


def test_bad_shapes_raise_input_error():
    cls, masks = torch.zeros(1, 3, 4), torch.zeros(1, 3, 8, 8)
    with pytest.raises(InputError, match="disagree"):
        panoptic(cls, torch.zeros(1, 2, 8, 8), [(8, 8)], [(8, 8)])
    with pytest.raises(InputError, match="does not fit"):
        semantic(cls, masks, [(40, 8)], [(40, 8)], (32, 32))
    with pytest.raises(InputError, match="image sizes"):
        instance(cls, masks, [(8, 8), (8, 8)], [(8, 8)], (32, 32))
    with pytest.raises(InputError, match="thing_classes"):
        panoptic(cls, masks, [(8, 8)], [(8, 8)], (32, 32), thing_classes=(7,))


def test_implied_padded_size_follows_the_configs_mask_stride(rng):
    """Without padded_size the padded input is mask_stride x the mask size: the pixel decoder's common_stride,
    which postprocess_task reads from the config (4 by default, 8 in a coarser model)."""
    from m2f.config import Mask2FormerConfig, PixelDecoderConfig
    from m2f.postprocess import postprocess_task

    cls, masks = torch.randn(1, 3, 4, generator=rng), torch.randn(1, 3, 8, 8, generator=rng)
    with pytest.raises(InputError, match=r"^image size \(40, 40\) .* padded size \(32, 32\) \(4 x the mask size; "):
        semantic(cls, masks, [(40, 40)], [(40, 40)])
    coarse = Mask2FormerConfig(num_classes=2, pixel_decoder=PixelDecoderConfig(common_stride=8))
    for task in ("semantic", "instance", "panoptic"):
        with pytest.raises(InputError, match=r"padded size \(32, 32\) \(4 x the mask size"):
            postprocess_task(task, cls, masks, [(40, 40)], [(40, 40)], None, Mask2FormerConfig(num_classes=2))
        (result,) = postprocess_task(task, cls, masks, [(40, 40)], [(50, 60)], None, coarse)
        assert result is not None, f"{task} (seed {rng.seed_value})"
    (probs,) = semantic(cls, masks, [(40, 40)], [(40, 40)], mask_stride=8)
    assert probs.labels.shape == (40, 40), f"seed {rng.seed_value}"


@pytest.mark.gpu
def test_panoptic_on_gpu_equals_official_loop_on_gpu(rng):
    num_classes, thing_ids = 7, (0, 2, 3)
    cls, masks = _random_outputs(rng, 2, 24, num_classes, (16, 16))
    cls, masks = cls.cuda(), masks.cuda()
    sizes, originals = [(64, 60), (50, 64)], [(64, 60), (77, 90)]
    results = panoptic(cls, masks, sizes, originals, (64, 64), thing_classes=thing_ids, object_mask_threshold=0.6)
    upsampled = _official_upsample(masks, (64, 64), sizes, originals)
    for i, result in enumerate(results):
        assert result.segmentation.is_cuda
        ref_seg, ref_infos = _official_panoptic(cls[i], upsampled[i], thing_ids, 0.6, 0.8)
        assert torch.equal(result.segmentation.cpu(), ref_seg.cpu()), f"seed {rng.seed_value}"
        assert [(s.id, s.label) for s in result.segments] == [(d["id"], d["category_id"]) for d in ref_infos]
