"""Mask2Former's training loss (the official ``SetCriterion``).

For the final prediction and every auxiliary one (each earlier decoder layer), queries are matched to targets
by :class:`~m2f.train.matcher.HungarianMatcher`, then

* ``loss_ce``: cross-entropy of every query's class logits against its matched class, "no object" (index K)
  for unmatched queries, with class weights 1 and ``no_object_weight`` for "no object" (weighted mean over the
  whole batch, all ranks together);
* ``loss_mask``: BCE-with-logits and ``loss_dice``: dice loss of each matched mask on ``num_points`` points
  chosen by uncertainty (:func:`~m2f.train.point_sampling.uncertain_point_coords`), summed over matched
  masks and divided by the number of target masks in the batch (all-reduced over ranks, at least 1).

The total is ``class_weight · ce + mask_weight · bce + dice_weight · dice`` summed over all predictions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .matcher import HungarianMatcher
from .point_sampling import point_sample, uncertain_point_coords


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Mean over points, sum over masks, / num_masks. logits, targets: (M, P)."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """1 − (2 |p ∩ t| + 1) / (|p| + |t| + 1) per mask, summed, / num_masks. logits, targets: (M, P)."""
    probs = logits.sigmoid()
    numerator = 2.0 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


@dataclass(frozen=True)
class LossConfig:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544  # 112 x 112, for matching and for the losses
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True  # losses on every decoder layer's prediction


def _predictions(outputs: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(logits, masks)] final first, then the auxiliary ones, from a Mask2FormerOutput (or a dict / tuple)."""
    if isinstance(outputs, dict):
        logits, masks, aux = outputs["pred_logits"], outputs["pred_masks"], outputs.get("aux_outputs") or ()
    elif isinstance(outputs, (tuple, list)):
        logits, masks, aux = outputs[0], outputs[1], (outputs[2] if len(outputs) > 2 else ())
    else:
        logits, masks, aux = outputs.pred_logits, outputs.pred_masks, outputs.aux_outputs or ()
    preds = [(logits, masks)]
    for item in aux:
        preds.append((item["pred_logits"], item["pred_masks"]) if isinstance(item, dict) else (item[0], item[1]))
    return preds


def _rank_mean(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the ranks under DDP; itself in one process."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, config: LossConfig = LossConfig()):
        super().__init__()
        self.num_classes = num_classes
        self.config = config
        self.matcher = HungarianMatcher(config.class_weight, config.mask_weight, config.dice_weight, config.num_points)
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = config.no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.generator: torch.Generator | None = None  # None: the global RNG (saved with checkpoints)

    def num_masks(self, targets: Sequence[dict], device: torch.device) -> float:
        """Target masks in the batch, averaged over ranks under DDP, at least 1."""
        count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        return max(float(_rank_mean(count)), 1.0)

    def loss_labels(self, logits: torch.Tensor, targets: Sequence[dict], indices) -> torch.Tensor:
        b, q, _ = logits.shape
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.int64, device=logits.device)
        for i, (target, (query_idx, target_idx)) in enumerate(zip(targets, indices)):
            target_classes[i, query_idx.to(logits.device)] = target["labels"][target_idx].to(logits.device)
        weights = self.class_weights.to(logits.device)
        per_query = F.cross_entropy(logits.float().transpose(1, 2), target_classes, weights, reduction="none")
        # the weighted mean over the whole batch: under DDP (which averages gradients over ranks) each rank divides
        # by the ranks' mean weight total, as num_masks does, so the loss does not depend on the number of processes
        return per_query.sum() / _rank_mean(weights[target_classes].sum().detach())

    def loss_masks(self, masks: torch.Tensor, targets: Sequence[dict], indices, num_masks: float,
                   generators: Sequence[torch.Generator] | None = None):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        if query_idx.numel() == 0:  # nothing to supervise; keep the graph connected for DDP
            zero = masks.sum() * 0.0
            return zero, zero
        pred = masks[batch_idx.to(masks.device), query_idx.to(masks.device)][:, None].float()  # (M, 1, h, w)
        tgt = torch.cat([t["masks"][j.to(t["masks"].device)] for t, (_, j) in zip(targets, indices)])
        tgt = tgt[:, None].to(device=masks.device, dtype=torch.float32)  # (M, 1, H, W)
        cfg = self.config
        with torch.no_grad():
            if generators is None:
                coords = uncertain_point_coords(pred, cfg.num_points, cfg.oversample_ratio,
                                                cfg.importance_sample_ratio, generator=self.generator)  # (M, P, 2)
            else:  # each image's points from its own stream, whatever else is in the batch
                counts = [len(src) for src, _ in indices]
                coords = torch.cat([uncertain_point_coords(part, cfg.num_points, cfg.oversample_ratio,
                                                           cfg.importance_sample_ratio, generator=g)
                                    for part, g, n in zip(pred.split(counts), generators, counts) if n])
            point_targets = point_sample(tgt, coords)[:, 0]  # (M, P)
        point_logits = point_sample(pred, coords)[:, 0]  # (M, P)
        return sigmoid_bce_loss(point_logits, point_targets, num_masks), dice_loss(point_logits, point_targets, num_masks)

    def forward(self, outputs: Any, targets: Sequence[dict],
                generators: Sequence[torch.Generator] | None = None) -> dict[str, torch.Tensor]:
        """Returns the weighted total under "loss" and each unweighted term (``loss_ce``, ``loss_mask``,
        ``loss_dice``, and ``loss_ce_<i>`` ... for auxiliary prediction i, in layer order).

        ``generators``: one per image for its random points (matching and losses), so an image's loss does not
        depend on which other images share its batch or process; None: ``self.generator`` for all."""
        if generators is not None and len(generators) != len(targets):
            raise ValueError(f"{len(generators)} generators for {len(targets)} images")
        preds = _predictions(outputs)
        if not self.config.deep_supervision:
            preds = preds[:1]
        device = preds[0][0].device
        num_masks = self.num_masks(targets, device)
        cfg = self.config
        losses: dict[str, torch.Tensor] = {}
        total = None
        for k, (logits, masks) in enumerate(preds):
            with torch.autocast(device_type=device.type, enabled=False):
                indices = self.matcher(logits.detach(), masks.detach(), targets,
                                       generator=self.generator if generators is None else generators)
                ce = self.loss_labels(logits, targets, indices)
                bce, dice = self.loss_masks(masks, targets, indices, num_masks, generators)
            suffix = "" if k == 0 else f"_{k - 1}"
            losses[f"loss_ce{suffix}"], losses[f"loss_mask{suffix}"], losses[f"loss_dice{suffix}"] = ce, bce, dice
            term = cfg.class_weight * ce + cfg.mask_weight * bce + cfg.dice_weight * dice
            total = term if total is None else total + term
        losses["loss"] = total
        return losses
