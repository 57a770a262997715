"""Semantic, instance and panoptic inference on Mask2Former outputs, with the official semantics.

Follows facebookresearch/Mask2Former ``MaskFormer.forward`` (eval branch) and its ``semantic_inference``,
``instance_inference`` and ``panoptic_inference``, plus detectron2's ``sem_seg_postprocess``:

1. mask logits (Q, Hp/4, Wp/4) are upsampled bilinearly (align_corners=False) to the padded input size (Hp, Wp),
2. cropped to the image's network input size ``image_size`` (h, w) and resized bilinearly to its original size,
3. then inferred on. (Official semantic-only models infer first and resize the class probabilities instead:
   ``postprocess_before_inference=False`` in :func:`semantic`.)

Differences from the official code, all deliberate:

- Only the queries a task needs are upsampled (panoptic: the kept queries; instance: the top-k queries); upsampling
  is per channel, so the values are identical and memory drops by ~Q/kept.
- Panoptic inference is vectorised: no per-query Python loop; a constant number of host syncs per image. The output
  is identical to the official loop (segment ids, pixels, stuff merging) - tests compare against a loop.
- Instance results are sorted by score, descending (the official ``topk(sorted=False)`` order is unspecified), and
  carry real boxes computed from the masks (the official code writes zeros; its commented-out alternative is
  ``BitMasks.get_bounding_boxes``, which is what we compute: XYXY, x2 / y2 exclusive).
- Post-processing always runs in float32 (the official model runs in float32; half-precision outputs are upcast).
- Panoptic segments also report a score (the query's, the first query's for merged stuff) and their pixel area.

:func:`run` takes every setting (thresholds, top-k, thing classes, the per-task rules) from a model's config; the
task functions take them as arguments. Results stay on the device of the inputs. Images of one batch are processed one by one on their own crop, so an
image's result does not depend on the other images of its batch (given the same network outputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import TASKS, Mask2FormerConfig, PixelDecoderConfig, PostProcessConfig
from .errors import InputError

Size = tuple[int, int]

_DEFAULTS = PostProcessConfig()
_MASK_STRIDE = PixelDecoderConfig().common_stride  # the stride of pred_masks when no config says otherwise


@dataclass
class SemanticResult:
    """probabilities: (K, H, W) float32 class scores at the original size; labels: (H, W) int64 argmax class."""

    probabilities: torch.Tensor
    labels: torch.Tensor


@dataclass
class InstanceResult:
    """N instances sorted by score, descending.

    masks: (N, H, W) bool at the original size (mask logit > 0).
    scores: (N,) float32, class probability x mean mask probability inside the mask.
    labels: (N,) int64 contiguous class ids.
    boxes: (N, 4) float32 XYXY pixel boxes of the masks (x2, y2 exclusive); zeros for an empty mask.
    query_indices: (N,) int64, which query each instance came from.
    """

    masks: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    query_indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass(frozen=True)
class Segment:
    """One panoptic segment: pixels ``segmentation == id``. ``score`` is its query's class probability (the first
    query's when several stuff queries of one class merged); ``area`` its number of pixels."""

    id: int
    label: int
    score: float
    is_thing: bool
    area: int


@dataclass
class PanopticResult:
    """segmentation: (H, W) int32 segment ids, 0 = void; segments: in id order (ids 1, 2, ...)."""

    segmentation: torch.Tensor
    segments: list[Segment]


# ---------------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------------


def _check_inputs(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    image_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    padded_size: Size | None,
    mask_stride: int,
) -> Size:
    if pred_logits.ndim != 3 or pred_masks.ndim != 4:
        raise InputError(
            f"expected pred_logits (B, Q, K+1) and pred_masks (B, Q, h, w), got {tuple(pred_logits.shape)} and "
            f"{tuple(pred_masks.shape)}"
        )
    batch, queries = pred_logits.shape[:2]
    if tuple(pred_masks.shape[:2]) != (batch, queries):
        raise InputError(
            f"pred_logits {tuple(pred_logits.shape)} and pred_masks {tuple(pred_masks.shape)} disagree on (B, Q)"
        )
    if pred_logits.shape[-1] < 2:
        raise InputError("pred_logits needs at least one class plus the no-object class")
    if len(image_sizes) != batch or len(original_sizes) != batch:
        raise InputError(
            f"got {len(image_sizes)} image sizes and {len(original_sizes)} original sizes for a batch of {batch}"
        )
    implied = padded_size is None
    if padded_size is None:  # the mask head runs at the pixel decoder's common_stride of the padded input
        padded_size = (int(pred_masks.shape[-2]) * mask_stride, int(pred_masks.shape[-1]) * mask_stride)
    padded_size = (int(padded_size[0]), int(padded_size[1]))
    for (h, w), (oh, ow) in zip(image_sizes, original_sizes):
        if not (0 < h <= padded_size[0] and 0 < w <= padded_size[1]) or oh < 1 or ow < 1:
            how = f" ({mask_stride} x the mask size; pass padded_size or mask_stride)" if implied else ""
            raise InputError(f"image size {(h, w)} (original {(oh, ow)}) does not fit the padded size {padded_size}{how}")
    return padded_size


def resize_mask_logits(
    mask_logits: torch.Tensor, padded_size: Size, image_size: Size, original_size: Size
) -> torch.Tensor:
    """(N, h', w') stride-4 logits -> (N, H, W) at the original size, as the official eval path does.

    Upsample to the padded input size, crop the image's region, resize to the original size (detectron2
    ``sem_seg_postprocess``); bilinear, align_corners=False, float32. A resize to the same size is the identity
    and is skipped.
    """
    x = mask_logits.float()
    if x.shape[0] == 0:
        return x.new_zeros((0, *original_size))
    x = F.interpolate(x[None], size=padded_size, mode="bilinear", align_corners=False)[0]
    x = x[:, : image_size[0], : image_size[1]]
    if tuple(image_size) != tuple(original_size):
        x = F.interpolate(x[None], size=tuple(original_size), mode="bilinear", align_corners=False)[0]
    return x


def _thing_table(thing_classes: Sequence[int], num_classes: int, device: torch.device) -> torch.Tensor:
    """(K + 1,) bool, True for thing classes (the no-object slot is False)."""
    table = torch.zeros(num_classes + 1, dtype=torch.bool, device=device)
    ids = [int(c) for c in thing_classes]
    if ids:
        if min(ids) < 0 or max(ids) >= num_classes:
            raise InputError(f"thing_classes {ids} contains ids outside 0..{num_classes - 1}")
        table[torch.tensor(ids, device=device)] = True
    return table


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) float32 XYXY boxes, x2 / y2 exclusive (detectron2 ``BitMasks.get_bounding_boxes``);
    an empty mask gets a zero box."""
    n, height, width = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
    # first / last True: argmax of a 0/1 tensor finds the first maximum
    y1 = rows.to(torch.uint8).argmax(dim=1)
    y2 = height - rows.flip(1).to(torch.uint8).argmax(dim=1)
    x1 = cols.to(torch.uint8).argmax(dim=1)
    x2 = width - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return boxes * rows.any(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# semantic
# ---------------------------------------------------------------------------------------------------------------


def semantic(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    image_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    padded_size: Size | None = None,
    *,
    postprocess_before_inference: bool = True,
    mask_stride: int = _MASK_STRIDE,
) -> list[SemanticResult]:
    """Per-pixel class probabilities ``einsum("qc,qhw->chw", softmax(cls)[:, :-1], sigmoid(mask))`` and their argmax.

    pred_logits: (B, Q, K+1); pred_masks: (B, Q, Hp/4, Wp/4) logits; image_sizes / original_sizes: per image (h, w);
    padded_size: (Hp, Wp) of the network input (default: ``mask_stride`` x the mask size; ``mask_stride`` is the
        model's ``config.pixel_decoder.common_stride``).
    postprocess_before_inference: True (official panoptic / instance models): resize the mask logits to the
        original size, then infer. False (official semantic-only models, ``SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE``
        False): infer at the padded size, then crop and resize the probabilities.
    """
    padded_size = _check_inputs(pred_logits, pred_masks, image_sizes, original_sizes, padded_size, mask_stride)
    results = []
    for logits, masks, image_size, original_size in zip(pred_logits, pred_masks, image_sizes, original_sizes):
        class_probs = logits.float().softmax(-1)[:, :-1]  # (Q, K)
        if postprocess_before_inference:
            mask_probs = resize_mask_logits(masks, padded_size, image_size, original_size).sigmoid()  # (Q, H, W)
            probs = torch.einsum("qc,qhw->chw", class_probs, mask_probs)  # (K, H, W)
        else:
            up = F.interpolate(masks.float()[None], size=padded_size, mode="bilinear", align_corners=False)[0]
            # inference is per pixel, so cropping before it equals the official crop after it
            up = up[:, : image_size[0], : image_size[1]].sigmoid()  # (Q, h, w)
            probs = torch.einsum("qc,qhw->chw", class_probs, up)  # (K, h, w)
            if tuple(image_size) != tuple(original_size):
                probs = F.interpolate(probs[None], size=tuple(original_size), mode="bilinear", align_corners=False)[0]
        results.append(SemanticResult(probabilities=probs, labels=probs.argmax(0)))
    return results


# ---------------------------------------------------------------------------------------------------------------
# instance
# ---------------------------------------------------------------------------------------------------------------


def instance(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    image_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    padded_size: Size | None = None,
    *,
    topk: int = _DEFAULTS.instance_topk,
    thing_classes: Sequence[int] | None = None,
    mask_stride: int = _MASK_STRIDE,
) -> list[InstanceResult]:
    """Official ``instance_inference``: the top-k (query, class) pairs of ``softmax(cls)[:, :-1]`` over all Q x K.

    Each pair gives mask = logit > 0 and score = class prob x (sum(sigmoid(logit) * mask) / (sum(mask) + 1e-6)).
    thing_classes: when given (the official rule for models trained on panoptic data, ``panoptic_on``), pairs whose
    class is not a thing are dropped after the top-k, so fewer than ``topk`` may remain.
    """
    padded_size = _check_inputs(pred_logits, pred_masks, image_sizes, original_sizes, padded_size, mask_stride)
    if topk < 1:
        raise InputError(f"topk must be >= 1, got {topk}")
    num_classes = pred_logits.shape[-1] - 1
    results = []
    for logits, masks, image_size, original_size in zip(pred_logits, pred_masks, image_sizes, original_sizes):
        class_probs = logits.float().softmax(-1)[:, :-1]  # (Q, K)
        k = min(topk, class_probs.numel())
        # sorted=True only fixes the order of the pairs; the chosen set is the official one
        pair_scores, pair_index = class_probs.flatten().topk(k, sorted=True)  # (k,)
        labels = pair_index % num_classes
        query_index = pair_index // num_classes
        if thing_classes is not None:
            keep = _thing_table(thing_classes, num_classes, labels.device)[labels]
            pair_scores, labels, query_index = pair_scores[keep], labels[keep], query_index[keep]

        # upsample each needed query once, even when several of its classes made the top-k
        unique_queries, inverse = torch.unique(query_index, return_inverse=True)
        mask_logits = resize_mask_logits(masks[unique_queries], padded_size, image_size, original_size)[inverse]
        binary = mask_logits > 0  # (N, H, W)
        binary_f = binary.flatten(1).float()
        mask_scores = (mask_logits.sigmoid().flatten(1) * binary_f).sum(1) / (binary_f.sum(1) + 1e-6)
        scores = pair_scores * mask_scores

        order = torch.argsort(scores, descending=True, stable=True)
        binary = binary[order]
        results.append(
            InstanceResult(
                masks=binary,
                scores=scores[order],
                labels=labels[order],
                boxes=mask_boxes(binary),
                query_indices=query_index[order],
            )
        )
    return results


# ---------------------------------------------------------------------------------------------------------------
# panoptic
# ---------------------------------------------------------------------------------------------------------------


def panoptic(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    image_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    padded_size: Size | None = None,
    *,
    thing_classes: Sequence[int] = (),
    object_mask_threshold: float = _DEFAULTS.object_mask_threshold,
    overlap_threshold: float = _DEFAULTS.overlap_threshold,
    mask_stride: int = _MASK_STRIDE,
) -> list[PanopticResult]:
    """Official ``panoptic_inference``, vectorised.

    Keep queries whose argmax class is not no-object and whose probability > ``object_mask_threshold``; assign each
    pixel to the kept query maximising score x mask prob; a query becomes a segment if its assigned area, its
    prob >= 0.5 area and their intersection are all > 0 and assigned / (prob >= 0.5) area >= ``overlap_threshold``.
    A segment's pixels are its assigned pixels with prob >= 0.5 (others stay void). Stuff segments of one class
    share the id of the first; ids count up from 1 in query order.
    """
    padded_size = _check_inputs(pred_logits, pred_masks, image_sizes, original_sizes, padded_size, mask_stride)
    num_classes = pred_logits.shape[-1] - 1
    is_thing_class = _thing_table(thing_classes, num_classes, pred_logits.device)
    return [
        _panoptic_one(logits, masks, padded_size, image_size, original_size, num_classes, is_thing_class,
                      object_mask_threshold, overlap_threshold)
        for logits, masks, image_size, original_size in zip(pred_logits, pred_masks, image_sizes, original_sizes)
    ]


def _panoptic_one(
    logits: torch.Tensor,  # (Q, K+1)
    masks: torch.Tensor,  # (Q, h', w')
    padded_size: Size,
    image_size: Size,
    original_size: Size,
    num_classes: int,
    is_thing_class: torch.Tensor,  # (K+1,) bool
    object_mask_threshold: float,
    overlap_threshold: float,
) -> PanopticResult:
    device = logits.device
    height, width = original_size
    scores, labels = logits.float().softmax(-1).max(-1)  # (Q,)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    kept = keep.nonzero()[:, 0]  # host sync 1: the number of kept queries
    n = int(kept.numel())
    if n == 0:
        return PanopticResult(torch.zeros((height, width), dtype=torch.int32, device=device), [])

    scores, labels = scores[kept], labels[kept]  # (N,)
    mask_probs = resize_mask_logits(masks[kept], padded_size, image_size, original_size).sigmoid()  # (N, H, W)
    assigned = (scores.view(-1, 1, 1) * mask_probs).argmax(0)  # (H, W) index of the winning kept query
    assigned_prob = mask_probs.gather(0, assigned[None])[0]  # (H, W) that query's mask prob
    assigned_strong = assigned_prob >= 0.5

    flat = assigned.flatten()
    mask_area = torch.bincount(flat, minlength=n)  # (N,) pixels assigned to the query
    original_area = (mask_probs >= 0.5).flatten(1).sum(1)  # (N,) pixels where the query's prob >= 0.5
    both_area = torch.bincount(flat[assigned_strong.flatten()], minlength=n)  # (N,) assigned and prob >= 0.5
    # the official test is the Python float `mask_area / original_area < overlap_threshold`: same float64 division
    ratio = mask_area.double() / original_area.double().clamp_min(1)
    valid = (mask_area > 0) & (original_area > 0) & (both_area > 0) & ~(ratio < overlap_threshold)

    # stuff merging: every valid stuff query maps to the first valid query of its class; things map to themselves
    query = torch.arange(n, device=device)
    is_thing = is_thing_class[labels]
    first_of_class = torch.full((num_classes,), n, dtype=torch.long, device=device)
    first_of_class.scatter_reduce_(0, labels, torch.where(valid & ~is_thing, query, n), reduce="amin")
    owner = torch.where(is_thing, query, first_of_class[labels])  # (N,)
    starts_segment = valid & (owner == query)
    segment_of_query = torch.cumsum(starts_segment.long(), 0)  # segment id of the segment a query starts
    query_segment_id = torch.where(valid, segment_of_query[owner.clamp_max(n - 1)], 0)  # (N,) 0 = dropped

    segmentation = torch.where(assigned_strong, query_segment_id[assigned], 0).to(torch.int32)  # (H, W)
    area_by_owner = torch.zeros(n + 1, dtype=torch.long, device=device)
    area_by_owner.index_add_(0, torch.where(valid, owner, n), both_area)

    # host sync 2: one small table for the segment list
    table = torch.stack(
        [starts_segment.double(), segment_of_query.double(), labels.double(), scores.double(), is_thing.double(),
         area_by_owner[:n].double()]
    ).cpu()
    segments = [
        Segment(id=int(seg_id), label=int(label), score=float(score), is_thing=bool(thing), area=int(area))
        for starts, seg_id, label, score, thing, area in table.T.tolist()
        if starts
    ]
    return PanopticResult(segmentation=segmentation, segments=segments)


def postprocess_task(
    task: str,
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    image_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    padded_size: Size | None,
    config: Mask2FormerConfig,
) -> list[SemanticResult] | list[InstanceResult] | list[PanopticResult]:
    """``task``'s results for a batch, with the model's rules and thresholds from ``config``: the one dispatcher
    of ``m2f predict``, ``m2f eval``, ``m2f bench model`` and the exported-model runners, whatever ran the network.

    Official rules: semantic-only models infer before resizing to the original size; models trained for panoptic
    report only thing classes as instances."""
    args = (pred_logits, pred_masks, image_sizes, original_sizes, padded_size)
    thresholds, stride = config.postprocess, config.pixel_decoder.common_stride
    if task == "panoptic":
        return panoptic(*args, thing_classes=config.thing_classes,
                        object_mask_threshold=thresholds.object_mask_threshold,
                        overlap_threshold=thresholds.overlap_threshold, mask_stride=stride)
    if task == "instance":
        things = config.thing_classes if config.default_task == "panoptic" else None
        return instance(*args, topk=thresholds.instance_topk, thing_classes=things, mask_stride=stride)
    if task == "semantic":
        return semantic(*args, postprocess_before_inference=config.default_task != "semantic", mask_stride=stride)
    raise InputError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def run(outputs, batch, config, task: str | None = None) -> list[SemanticResult] | list[InstanceResult] | list[PanopticResult]:
    """Post-process ``outputs`` (a :class:`m2f.Mask2FormerOutput`) of ``batch`` (from :func:`m2f.preprocess.preprocess`)
    for ``task`` (default: ``config.default_task``) with every setting taken from ``config`` (a
    :class:`m2f.Mask2FormerConfig`, e.g. ``model.config``), by :func:`postprocess_task`.
    ``model.post_process(outputs, batch)`` is the same call.
    """
    return postprocess_task(task or config.default_task, outputs.pred_logits, outputs.pred_masks, batch.image_sizes,
                            batch.original_sizes, batch.padded_size, config)
