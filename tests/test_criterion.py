"""SetCriterion against hand-computed values and a float64 loop reference (values and gradients)."""
from __future__ import annotations

import itertools
import math

import torch

from m2f.train.criterion import LossConfig, SetCriterion, dice_loss, sigmoid_bce_loss
from m2f.train.point_sampling import uncertain_point_coords
from tests.utils import cost_ref, rel_err, sample_ref


def test_bce_and_dice_hand_values():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = 0.5, 0.75
    targets = torch.tensor([[1.0, 0.0]])
    bce = (-math.log(0.5) - math.log(0.25)) / 2
    dice = 1 - (2 * 0.5 + 1) / (1.25 + 1 + 1)
    assert abs(float(sigmoid_bce_loss(logits, targets, 2.0)) - bce / 2) < 1e-6
    assert abs(float(dice_loss(logits, targets, 1.0)) - dice) < 1e-6


def test_ce_hand_case():
    """Q=2, K=2, one target of class 1 matched to query 0; query 1 is "no object" with weight 0.1."""
    crit = SetCriterion(2, LossConfig(num_points=4, deep_supervision=False))
    logits = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 0.5]]])
    masks = torch.full((1, 2, 4, 4), -5.0)
    masks[0, 0] = 5.0  # query 0 covers the whole target mask: it is the cheaper match
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 16, 16, dtype=torch.bool)}]
    losses = crit({"pred_logits": logits, "pred_masks": masks}, targets)
    nll0 = -math.log(math.exp(2) / (2 + math.exp(2)))
    nll1 = -math.log(math.exp(0.5) / (math.exp(1) + 1 + math.exp(0.5)))
    expected = (1.0 * nll0 + 0.1 * nll1) / (1.0 + 0.1)
    assert abs(float(losses["loss_ce"]) - expected) < 1e-6


def test_no_targets_gives_only_no_object_ce():
    crit = SetCriterion(3, LossConfig(num_points=8))
    logits = torch.randn(2, 4, 4, requires_grad=True)
    masks = torch.randn(2, 4, 8, 8, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}
    losses = crit({"pred_logits": logits, "pred_masks": masks}, [empty, empty])
    ref = torch.nn.functional.cross_entropy(logits.detach().reshape(-1, 4), torch.full((8,), 3))
    assert abs(losses["loss_ce"].item() - ref.item()) < 1e-6
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    losses["loss"].backward()  # still one graph through the masks (what DDP needs)
    assert masks.grad is not None and torch.all(masks.grad == 0)


def reference_loss(preds, targets, num_classes, cfg: LossConfig, seed: int):
    """The whole criterion in float64 loops (brute-force matching, loop bilinear sampling), replaying the RNG."""
    g = torch.Generator().manual_seed(seed)
    num_masks = max(sum(len(t["labels"]) for t in targets), 1)
    total = 0.0
    for logits, masks in preds:
        matches = []
        for b, t in enumerate(targets):
            n = len(t["labels"])
            if n == 0:
                matches.append([])
                continue
            coords = torch.rand(cfg.num_points, 2, generator=g)
            cost = cost_ref(logits[b].detach(), masks[b].detach(), t["labels"], t["masks"], coords,
                            cfg.class_weight, cfg.mask_weight, cfg.dice_weight)
            q = cost.shape[0]
            best = min(itertools.permutations(range(q), n), key=lambda p: sum(float(cost[p[j], j]) for j in range(n)))
            matches.append(sorted((best[j], j) for j in range(n)))  # ordered by query, as scipy returns them
        # classification
        weights = torch.ones(num_classes + 1, dtype=torch.float64)
        weights[-1] = cfg.no_object_weight
        num, den = 0.0, 0.0
        for b in range(logits.shape[0]):
            target_of = {qi: int(targets[b]["labels"][j]) for qi, j in matches[b]}
            logp = logits[b].double().log_softmax(-1)
            for qi in range(logits.shape[1]):
                c = target_of.get(qi, num_classes)
                num = num - weights[c] * logp[qi, c]
                den = den + weights[c]
        ce = num / den
        # masks on importance-sampled points (the selection itself is no-grad; reuse the tested function)
        rows = [(b, qi, j) for b in range(len(targets)) for qi, j in matches[b]]
        bce = dice = torch.zeros((), dtype=torch.float64)
        if rows:
            chosen = torch.stack([masks[b, qi].detach().float() for b, qi, _ in rows])[:, None]
            coords = uncertain_point_coords(chosen, cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio,
                                            generator=g)
            for (b, qi, j), c in zip(rows, coords):
                x = sample_ref(masks[b, qi][None], c)[0]
                t = sample_ref(targets[b]["masks"][j][None].double(), c)[0]
                p = torch.sigmoid(x)
                bce = bce + (-(t * torch.log(p) + (1 - t) * torch.log1p(-p))).mean()
                dice = dice + 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
        total = total + cfg.class_weight * ce + cfg.mask_weight * bce / num_masks + cfg.dice_weight * dice / num_masks
    return total


def test_criterion_matches_float64_reference_values_and_grads(rng):
    num_classes, q = 3, 4
    cfg = LossConfig(num_points=9)
    targets = [
        {"labels": torch.tensor([2, 0]), "masks": torch.rand(2, 24, 20, generator=rng) > 0.5},
        {"labels": torch.tensor([1, 1, 0]), "masks": torch.rand(3, 24, 20, generator=rng) > 0.3},
    ]
    layers = [(torch.randn(2, q, num_classes + 1, generator=rng), torch.randn(2, q, 6, 5, generator=rng) * 2)
              for _ in range(3)]  # final + 2 auxiliary
    ours = [(lg.clone().requires_grad_(), mk.clone().requires_grad_()) for lg, mk in layers]
    ref = [(lg.double().requires_grad_(), mk.double().requires_grad_()) for lg, mk in layers]
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))

    crit = SetCriterion(num_classes, cfg)
    crit.generator = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": ours[0][0], "pred_masks": ours[0][1], "aux_outputs": tuple(ours[1:])}
    losses = crit(outputs, targets)
    expected = reference_loss(ref, targets, num_classes, cfg, seed)
    assert set(losses) == {"loss", "loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0",
                           "loss_ce_1", "loss_mask_1", "loss_dice_1"}
    assert rel_err(losses["loss"], expected) < 1e-5, f"seed {rng.seed_value}"

    losses["loss"].backward()
    expected.backward()
    for (lg, mk), (rlg, rmk) in zip(ours, ref):
        assert rel_err(lg.grad, rlg.grad) < 1e-4, f"seed {rng.seed_value}"
        assert rel_err(mk.grad, rmk.grad) < 1e-4, f"seed {rng.seed_value}"


def test_num_masks_counts_targets_and_clamps_to_one():
    crit = SetCriterion(2, LossConfig())
    t = lambda n: {"labels": torch.zeros(n, dtype=torch.long), "masks": torch.zeros(n, 4, 4, dtype=torch.bool)}
    assert crit.num_masks([t(2), t(3)], torch.device("cpu")) == 5.0
    assert crit.num_masks([t(0), t(0)], torch.device("cpu")) == 1.0
