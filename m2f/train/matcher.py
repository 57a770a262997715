"""Hungarian matching of predicted queries to target segments (Mask2Former's ``HungarianMatcher``).

Cost of assigning query q to target t::

    cost_class · (−p_q(class_t)) + cost_mask · BCE(q, t) + cost_dice · dice(q, t)

with BCE and dice over ``num_points`` points drawn uniformly once per image, the same for every query and
target (targets read with the same bilinear ``point_sample``). The assignment is scipy's
``linear_sum_assignment`` on the (Q, N) cost; each image is matched on its own.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .point_sampling import point_sample


def pairwise_sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over points of BCE-with-logits for every (query, target) pair: (Q, P), (N, P) -> (Q, N)."""
    num_points = logits.shape[1]
    loss_if_one = F.softplus(-logits)  # BCE against target 1: log(1 + e^-x)
    loss_if_zero = F.softplus(logits)  # BCE against target 0: log(1 + e^x)
    cost = loss_if_one @ targets.T + loss_if_zero @ (1.0 - targets).T  # (Q, N)
    return cost / num_points


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 − (2 |p ∩ t| + 1) / (|p| + |t| + 1) for every pair, p = sigmoid(logits): (Q, P), (N, P) -> (Q, N)."""
    probs = logits.sigmoid()
    numerator = 2.0 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


class HungarianMatcher:
    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544):
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    def cost_matrix(self, logits: torch.Tensor, masks: torch.Tensor, target_labels: torch.Tensor,
                    target_masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Cost (Q, N) for one image. logits (Q, K+1); masks (Q, h, w) logits; target_masks (N, H, W);
        coords (P, 2) in [0, 1] shared by predictions and targets."""
        probs = logits.float().softmax(-1)  # (Q, K+1)
        cost_class = -probs[:, target_labels]  # (Q, N)
        q, n = masks.shape[0], target_masks.shape[0]
        pred_points = point_sample(masks[:, None].float(), coords[None].expand(q, -1, -1))[:, 0]  # (Q, P)
        tgt_points = point_sample(target_masks[:, None].float(), coords[None].expand(n, -1, -1))[:, 0]  # (N, P)
        cost_mask = pairwise_sigmoid_bce(pred_points, tgt_points)
        cost_dice = pairwise_dice(pred_points, tgt_points)
        return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice

    @torch.no_grad()
    def __call__(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, targets: Sequence[dict],
                 generator: torch.Generator | Sequence[torch.Generator] | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """pred_logits (B, Q, K+1), pred_masks (B, Q, h, w); targets[b] = {"labels": (N,), "masks": (N, H, W)};
        ``generator``: one for all images, or one per image.

        Returns per image (query indices, target indices), int64 on the CPU, sorted by query index.
        """
        indices = []
        per_image = generator if isinstance(generator, (list, tuple)) else [generator] * len(targets)
        for b, target in enumerate(targets):
            labels = target["labels"]
            if labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            coords = torch.rand(self.num_points, 2, device=pred_masks.device, generator=per_image[b])
            with torch.autocast(device_type=pred_masks.device.type, enabled=False):
                cost = self.cost_matrix(pred_logits[b], pred_masks[b], labels, target["masks"].to(pred_masks.device),
                                        coords)
            cost = cost.cpu().numpy()
            if not np.isfinite(cost).all():
                raise FloatingPointError("matching cost has NaN / inf: the predictions diverged")
            rows, cols = linear_sum_assignment(cost)
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
