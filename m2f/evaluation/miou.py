"""Semantic segmentation metrics as detectron2's ``SemSegEvaluator``.

A (K+1)² confusion matrix over (prediction, ground truth) pixels where ground-truth ``ignore_label`` maps to the
extra row / column and is left out. IoU_c = TP / (TP + FP + FN) over classes present in the ground truth
(with a non-empty union); mIoU is their mean; also fwIoU, mACC, pACC. Results in percent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class SemanticIoU:
    num_classes: int
    ignore_label: int = 255
    class_names: Sequence[str] = ()
    confusion: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        k = self.num_classes + 1
        self.confusion = np.zeros((k, k), dtype=np.int64)  # [prediction, ground truth]

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """pred, gt: (H, W) class ids; gt == ignore_label is ignored."""
        pred = np.asarray(pred, dtype=np.int64)
        gt = np.asarray(gt, dtype=np.int64).copy()
        if pred.shape != gt.shape:
            raise ValueError(f"prediction is {pred.shape} but the ground truth is {gt.shape}")
        k = self.num_classes
        gt[gt == self.ignore_label] = k
        if gt.min() < 0 or gt.max() > k:
            raise ValueError(f"ground-truth class ids must be in 0..{k - 1} or {self.ignore_label}")
        if pred.min() < 0 or pred.max() >= k:
            raise ValueError(f"predicted class ids must be in 0..{k - 1}")
        self.confusion += np.bincount((k + 1) * pred.reshape(-1) + gt.reshape(-1),
                                      minlength=(k + 1) ** 2).reshape(k + 1, k + 1)

    def summary(self) -> dict:
        conf = self.confusion[:-1, :-1].astype(np.float64)
        tp = np.diag(conf)
        pos_gt = conf.sum(axis=0)
        pos_pred = conf.sum(axis=1)
        acc_valid = pos_gt > 0
        union = pos_gt + pos_pred - tp
        iou_valid = acc_valid & (union > 0)
        iou = np.full(self.num_classes, np.nan)
        acc = np.full(self.num_classes, np.nan)
        iou[iou_valid] = tp[iou_valid] / union[iou_valid]
        acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
        total = pos_gt.sum()
        weights = pos_gt / total if total else pos_gt
        names = list(self.class_names) or [f"class_{i}" for i in range(self.num_classes)]
        nan = float("nan")
        return {
            "mIoU": 100.0 * float(iou[iou_valid].mean()) if iou_valid.any() else nan,
            "fwIoU": 100.0 * float((iou[iou_valid] * weights[iou_valid]).sum()) if iou_valid.any() else nan,
            "mACC": 100.0 * float(acc[acc_valid].mean()) if acc_valid.any() else nan,
            "pACC": 100.0 * float(tp.sum() / total) if total else nan,
            "per_class": {names[i]: {"IoU": 100.0 * float(iou[i]), "ACC": 100.0 * float(acc[i])}
                          for i in range(self.num_classes) if iou_valid[i]},
        }
