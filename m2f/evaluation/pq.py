"""Panoptic quality with panopticapi's exact rules (cocodataset/panopticapi ``evaluation.py``).

Per image, a ground-truth and a predicted segment of the same category match when IoU > 0.5, where the union
leaves out the predicted segment's pixels on ground-truth void (id 0). Crowd ground-truth segments never match;
an unmatched prediction is not a false positive when more than half of it lies on void or on a crowd region of
its category. Unmatched non-crowd ground truth is a false negative. Per category::

    PQ = Σ IoU / (TP + FP/2 + FN/2),  SQ = Σ IoU / TP (0 without TP),  RQ = TP / (TP + FP/2 + FN/2)

and PQ / SQ / RQ are means over the categories with any TP, FP or FN (all, things, stuff). As in panopticapi,
a ground-truth segment's area comes from its JSON ``area`` when given (else it is counted in the PNG), a
predicted segment's area is counted in its PNG, and a predicted id 0 is void.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

VOID = 0
OFFSET = 256 * 256 * 256


@dataclass
class CategoryStat:
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0


@dataclass
class PanopticQuality:
    """Accumulates PQ statistics image by image. ``categories``: dataset category id -> isthing."""

    categories: Mapping[int, bool]
    names: Mapping[int, str] = field(default_factory=dict)
    stats: dict[int, CategoryStat] = field(default_factory=dict)
    num_images: int = 0

    def update(self, gt_ids: np.ndarray, gt_segments: Iterable[dict], pred_ids: np.ndarray,
               pred_segments: Iterable[dict]) -> None:
        """Add one image. ``*_ids``: (H, W) segment-id maps; ``*_segments``: COCO ``segments_info`` lists
        (``id``, ``category_id``, ``iscrowd`` for ground truth, optional ``area``)."""
        gt_ids = np.asarray(gt_ids, dtype=np.uint64)
        pred_ids = np.asarray(pred_ids, dtype=np.uint64)
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"ground truth is {gt_ids.shape} but the prediction is {pred_ids.shape}")
        gt_segs = {int(s["id"]): dict(s) for s in gt_segments}
        pred_segs = {int(s["id"]): dict(s) for s in pred_segments}

        gt_present, gt_counts = np.unique(gt_ids, return_counts=True)
        for seg_id, count in zip(gt_present.tolist(), gt_counts.tolist()):
            if seg_id in gt_segs and "area" not in gt_segs[seg_id]:
                gt_segs[seg_id]["area"] = count
        for seg in gt_segs.values():
            seg.setdefault("area", 0)
        unused = set(pred_segs)
        pred_present, pred_counts = np.unique(pred_ids, return_counts=True)
        for seg_id, count in zip(pred_present.tolist(), pred_counts.tolist()):
            if seg_id not in pred_segs:
                if seg_id == VOID:
                    continue
                raise ValueError(f"predicted segment id {seg_id} is in the map but not in segments_info")
            pred_segs[seg_id]["area"] = count
            unused.discard(seg_id)
            if pred_segs[seg_id]["category_id"] not in self.categories:
                raise ValueError(f"predicted segment {seg_id} has unknown category {pred_segs[seg_id]['category_id']}")
        if unused:
            raise ValueError(f"predicted segment ids {sorted(unused)} are in segments_info but not in the map")

        pairs, inter = np.unique(gt_ids * np.uint64(OFFSET) + pred_ids, return_counts=True)
        overlap = {(int(p // OFFSET), int(p % OFFSET)): int(n) for p, n in zip(pairs, inter)}

        gt_matched, pred_matched = set(), set()
        for (gt_id, pred_id), intersection in overlap.items():
            if gt_id not in gt_segs or pred_id not in pred_segs:
                continue
            gt, pred = gt_segs[gt_id], pred_segs[pred_id]
            if gt.get("iscrowd", 0) == 1 or gt["category_id"] != pred["category_id"]:
                continue
            union = pred["area"] + gt["area"] - intersection - overlap.get((VOID, pred_id), 0)
            iou = intersection / union
            if iou > 0.5:
                stat = self._stat(gt["category_id"])
                stat.tp += 1
                stat.iou += iou
                gt_matched.add(gt_id)
                pred_matched.add(pred_id)

        crowd_of_category = {}
        for gt_id, gt in gt_segs.items():
            if gt_id in gt_matched:
                continue
            if gt.get("iscrowd", 0) == 1:
                crowd_of_category[gt["category_id"]] = gt_id
                continue
            self._stat(gt["category_id"]).fn += 1
        for pred_id, pred in pred_segs.items():
            if pred_id in pred_matched:
                continue
            ignored = overlap.get((VOID, pred_id), 0)
            if pred["category_id"] in crowd_of_category:
                ignored += overlap.get((crowd_of_category[pred["category_id"]], pred_id), 0)
            if ignored / pred["area"] > 0.5:
                continue
            self._stat(pred["category_id"]).fp += 1
        self.num_images += 1

    def _stat(self, category_id: int) -> CategoryStat:
        return self.stats.setdefault(int(category_id), CategoryStat())

    def merge(self, other: "PanopticQuality") -> None:
        for cid, s in other.stats.items():
            mine = self._stat(cid)
            mine.iou += s.iou
            mine.tp += s.tp
            mine.fp += s.fp
            mine.fn += s.fn
        self.num_images += other.num_images

    def per_class(self) -> dict[int, dict[str, float]]:
        """category id -> {"PQ", "SQ", "RQ", "TP", "FP", "FN"} (fractions, not percent) for present categories."""
        out = {}
        for cid in self.categories:
            s = self.stats.get(int(cid), CategoryStat())
            if s.tp + s.fp + s.fn == 0:
                continue
            denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
            out[int(cid)] = {"PQ": s.iou / denom, "SQ": s.iou / s.tp if s.tp else 0.0, "RQ": s.tp / denom,
                             "TP": s.tp, "FP": s.fp, "FN": s.fn}
        return out

    def summary(self) -> dict:
        """{"PQ", "SQ", "RQ", "PQ_th", ..., "RQ_st"} in percent, "N", "N_th", "N_st", and "per_class"."""
        per_class = self.per_class()
        result: dict = {}
        for suffix, want in (("", None), ("_th", True), ("_st", False)):
            rows = [v for cid, v in per_class.items() if want is None or bool(self.categories[cid]) == want]
            n = len(rows)
            for key in ("PQ", "SQ", "RQ"):
                result[key + suffix] = 100.0 * sum(r[key] for r in rows) / n if n else float("nan")
            result["N" + suffix] = n
        result["num_images"] = self.num_images
        result["per_class"] = {
            self.names.get(cid, str(cid)): {k: (100.0 * v if k in ("PQ", "SQ", "RQ") else v) for k, v in row.items()}
            for cid, row in per_class.items()
        }
        return result
