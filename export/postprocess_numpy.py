"""Mask2Former inference post-processing in NumPy, for engine runners that carry no PyTorch.

Same algorithm as the official ``MaskFormer`` inference (and ``m2f.postprocess``, which the tests compare this
module against): mask logits are upsampled bilinearly (align_corners=False) to the padded input size, cropped to
the image, resized to the original size, then

* semantic: ``einsum("qc,qhw->chw", softmax(cls)[:, :-1], sigmoid(mask))``;
* instance: top-k over the Q x K class scores; score = class prob x mean mask prob over the mask's pixels
  (mask = logit > 0);
* panoptic: keep queries whose label is not "no object" and whose score > ``object_mask_threshold``; each pixel
  goes to argmax of score x mask prob; a segment is dropped when its kept area / its area with prob >= 0.5 is
  below ``overlap_threshold``; stuff segments of one class merge.

Arrays are float32 throughout (as the PyTorch path computes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


# ---------------------------------------------------------------------------------------------------
# Elementwise helpers
# ---------------------------------------------------------------------------------------------------


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    # exp of -|x| never overflows; split by sign for accuracy on both tails.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and the weight of i1 for half-pixel bilinear resampling along one axis."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float32) + 0.5) * np.float32(scale) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes of ``x`` to ``size`` like ``F.interpolate(mode="bilinear", align_corners=False)``."""
    x = np.asarray(x, dtype=np.float32)
    in_h, in_w = x.shape[-2:]
    out_h, out_w = size
    if (in_h, in_w) == (out_h, out_w):
        return x.copy()
    y0, y1, wy = _axis_weights(in_h, out_h)
    x0, x1, wx = _axis_weights(in_w, out_w)
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]  # (..., out_h, in_w)
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx  # (..., out_h, out_w)


def postprocess_masks(
    mask_logits: np.ndarray,  # (Q, h, w) at stride 4 of the padded input
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    original_size: tuple[int, int],
) -> np.ndarray:  # (Q, H0, W0) mask logits at the original size
    """Upsample to the padded input size, crop the padding away, resize to the original size."""
    masks = resize_bilinear(mask_logits, padded_size)
    masks = masks[:, : image_size[0], : image_size[1]]
    return resize_bilinear(masks, original_size)


# ---------------------------------------------------------------------------------------------------
# The three tasks (one image)
# ---------------------------------------------------------------------------------------------------


def semantic_inference(class_logits: np.ndarray, mask_logits: np.ndarray) -> np.ndarray:
    """(Q, K+1), (Q, H, W) -> (K, H, W) per-class probabilities (argmax over axis 0 is the label map)."""
    probs = softmax(class_logits)[:, :-1]  # (Q, K)
    masks = sigmoid(mask_logits)  # (Q, H, W)
    q, h, w = masks.shape
    return (probs.T @ masks.reshape(q, h * w)).reshape(-1, h, w)


@dataclass
class InstanceResult:
    scores: np.ndarray  # (k,) float32: class prob x mean mask prob, sorted descending
    labels: np.ndarray  # (k,) int64 contiguous class ids
    masks: np.ndarray  # (k, H, W) bool
    query_indices: np.ndarray  # (k,) int64: which query each instance comes from


def instance_inference(
    class_logits: np.ndarray,  # (Q, K+1)
    mask_logits: np.ndarray,  # (Q, H, W)
    topk: int = 100,
    thing_classes: Sequence[int] | None = None,  # keep only these labels (panoptic models), None keeps all
) -> InstanceResult:
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    scores = softmax(class_logits)[:, :-1].reshape(-1)  # (Q*K,) query-major
    k = min(topk, scores.size)
    # Descending by score; ties broken by the lower flat index (torch.topk leaves tie order unspecified).
    order = np.argsort(-scores, kind="stable")[:k]
    labels = order % num_classes
    queries = order // num_classes
    top_scores = scores[order]
    if thing_classes is not None:
        keep = np.isin(labels, np.asarray(list(thing_classes), dtype=np.int64))
        order, labels, queries, top_scores = order[keep], labels[keep], queries[keep], top_scores[keep]
    masks = mask_logits[queries]  # (k, H, W)
    binary = masks > 0
    flat_bin = binary.reshape(len(queries), -1).astype(np.float32)
    mask_scores = (sigmoid(masks).reshape(len(queries), -1) * flat_bin).sum(1) / (flat_bin.sum(1) + 1e-6)
    final = (top_scores * mask_scores).astype(np.float32)
    by_score = np.argsort(-final, kind="stable")  # sorted by final score, as m2f.postprocess.instance
    return InstanceResult(
        scores=final[by_score],
        labels=labels[by_score].astype(np.int64),
        masks=binary[by_score],
        query_indices=queries[by_score].astype(np.int64),
    )


@dataclass
class PanopticResult:
    segmentation: np.ndarray  # (H, W) int32: 0 = void, else a segment id
    segments: list[dict] = field(default_factory=list)  # {"id", "category_id", "isthing", "score"}


def panoptic_inference(
    class_logits: np.ndarray,  # (Q, K+1)
    mask_logits: np.ndarray,  # (Q, H, W)
    thing_classes: Sequence[int],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> PanopticResult:
    num_classes = class_logits.shape[1] - 1
    probs = softmax(class_logits)
    scores, labels = probs.max(-1), probs.argmax(-1)
    mask_probs = sigmoid(mask_logits)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_probs[keep]
    height, width = mask_logits.shape[-2:]
    segmentation = np.zeros((height, width), dtype=np.int32)
    result = PanopticResult(segmentation)
    if cur_masks.shape[0] == 0:
        return result
    owner = (cur_scores[:, None, None] * cur_masks).argmax(0)  # (H, W): the query that owns each pixel
    things = set(int(c) for c in thing_classes)
    stuff_ids: dict[int, int] = {}
    segment_id = 0
    for k, pred_class in enumerate(cur_classes.tolist()):
        owned = owner == k
        confident = cur_masks[k] >= 0.5
        mask_area, original_area = int(owned.sum()), int(confident.sum())
        mask = owned & confident
        if mask_area == 0 or original_area == 0 or not mask.any():
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        is_thing = pred_class in things
        if not is_thing and pred_class in stuff_ids:
            segmentation[mask] = stuff_ids[pred_class]
            continue
        segment_id += 1
        if not is_thing:
            stuff_ids[pred_class] = segment_id
        segmentation[mask] = segment_id
        result.segments.append(
            {"id": segment_id, "category_id": int(pred_class), "isthing": is_thing, "score": float(cur_scores[k])}
        )
    return result
