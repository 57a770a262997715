"""Instance segmentation mask AP through pycocotools (``COCOeval``, iouType "segm").

Ground truth and detections are gathered in memory as COCO dicts with RLE masks (pycocotools ``mask.encode``);
the result is COCO's AP, AP50, AP75, APs, APm, APl in percent, plus AP per category.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO RLE with a str ``counts`` (JSON-serialisable)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@dataclass
class MaskAP:
    """``categories``: [(dataset category id, name)]."""

    categories: Sequence[tuple[int, str]]
    images: list[dict] = field(default_factory=list)
    gt_annotations: list[dict] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)

    def add_image(self, image_id: int, height: int, width: int) -> None:
        self.images.append({"id": image_id, "height": height, "width": width})

    def add_ground_truth(self, image_id: int, mask: np.ndarray, category_id: int, iscrowd: bool = False) -> None:
        from pycocotools import mask as mask_utils

        rle = encode_mask(mask)
        self.gt_annotations.append({
            "id": len(self.gt_annotations) + 1, "image_id": image_id, "category_id": int(category_id),
            "segmentation": rle, "area": float(mask_utils.area(rle)), "bbox": list(mask_utils.toBbox(rle)),
            "iscrowd": int(iscrowd),
        })

    def add_detection(self, image_id: int, mask: np.ndarray, category_id: int, score: float) -> None:
        self.detections.append({"image_id": image_id, "category_id": int(category_id),
                                "segmentation": encode_mask(mask), "score": float(score)})

    def summary(self) -> dict:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        if not self.gt_annotations:
            return {k: float("nan") for k in keys} | {"per_class": {}}
        gt = COCO()
        gt.dataset = {"images": self.images, "annotations": self.gt_annotations,
                      "categories": [{"id": int(c), "name": n} for c, n in self.categories]}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            if not self.detections:
                return {k: 0.0 for k in keys} | {"per_class": {}}
            dt = gt.loadRes(list(self.detections))
            evaluator = COCOeval(gt, dt, iouType="segm")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        result = {k: 100.0 * float(v) for k, v in zip(keys, evaluator.stats[:6])}
        # precision: (iou thresholds, recall, category, area range, max dets); area "all", 100 detections
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        per_class = {}
        for k, cat_id in enumerate(evaluator.params.catIds):
            values = precision[:, :, k]
            values = values[values > -1]
            name = dict((int(c), n) for c, n in self.categories).get(int(cat_id), str(cat_id))
            per_class[name] = 100.0 * float(values.mean()) if values.size else float("nan")
        result["per_class"] = per_class
        return result
