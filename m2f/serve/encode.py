"""One image's results as JSON: task, labels (contiguous), names, dataset category ids, scores and COCO RLE masks
(``counts`` a str), plus the overlay PNG in base64 when asked for."""
from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from m2f import postprocess as post
from m2f.labels import DatasetLabels


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _segment(label: int, score: float | None, mask: np.ndarray, labels: DatasetLabels) -> dict[str, Any]:
    return {"label": int(label), "name": labels.names[label], "category_id": int(labels.dataset_ids[label]),
            "score": None if score is None else float(score), "area": int(mask.sum()), "mask": _rle(mask)}


def segments_json(task: str, result: Any, labels: DatasetLabels) -> list[dict[str, Any]]:
    """The segments of a panoptic / instance / semantic result (on the CPU), one dict each."""
    if task == "panoptic":
        ids = result.segmentation.cpu().numpy()
        return [{**_segment(s.label, s.score, ids == s.id, labels), "id": int(s.id), "isthing": bool(s.is_thing)}
                for s in result.segments]
    if task == "instance":
        return [_segment(int(c), float(s), m.cpu().numpy() > 0.5, labels)
                for m, c, s in zip(result.masks, result.labels, result.scores)]
    classes = result.labels.cpu().numpy()
    return [_segment(int(c), None, classes == c, labels) for c in np.unique(classes)]


def overlay_png(task: str, image: np.ndarray, result: Any, labels: DatasetLabels) -> str:
    from m2f.visualize import draw_instances, draw_panoptic, draw_semantic

    draw = {"panoptic": draw_panoptic, "instance": draw_instances, "semantic": draw_semantic}[task]
    picture = draw(image, result, labels)
    from PIL import Image

    buffer = io.BytesIO()
    (picture if isinstance(picture, Image.Image) else Image.fromarray(picture)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def postprocess_batch(task: str, config, logits, masks, batch) -> list[Any]:
    """The official post-processing of a batch (the rules of `m2f predict`)."""
    args = (logits, masks, batch.image_sizes, batch.original_sizes, tuple(batch.pixel_values.shape[-2:]))
    thresholds = config.postprocess
    if task == "panoptic":
        return post.panoptic(*args, thing_classes=config.thing_classes,
                             object_mask_threshold=thresholds.object_mask_threshold,
                             overlap_threshold=thresholds.overlap_threshold)
    if task == "instance":
        things = config.thing_classes if config.default_task == "panoptic" else None
        return post.instance(*args, topk=thresholds.instance_topk, thing_classes=things)
    return post.semantic(*args, postprocess_before_inference=config.default_task != "semantic")
