"""Hungarian matcher and point sampling against float64 loops and brute-force assignment."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from m2f.train.matcher import HungarianMatcher, pairwise_dice, pairwise_sigmoid_bce
from m2f.train.point_sampling import point_sample, uncertain_point_coords
from tests.utils import cost_ref, rel_err, sample_ref


def test_point_sample_matches_loop(rng):
    masks = torch.randn(3, 5, 7, generator=rng)
    coords = torch.rand(11, 2, generator=rng)
    coords[0] = torch.tensor([0.0, 0.0])  # corner: half the taps fall in the zero padding
    coords[1] = torch.tensor([0.999, 0.5])
    out = point_sample(masks[:, None], coords[None].expand(3, -1, -1))[:, 0]
    assert rel_err(out, sample_ref(masks, coords)) < 1e-6, f"seed {rng.seed_value}"


def test_pairwise_costs_match_loop(rng):
    logits = torch.randn(5, 37, generator=rng, dtype=torch.float64) * 3
    targets = (torch.rand(4, 37, generator=rng, dtype=torch.float64) > 0.5).double()
    bce, dice = pairwise_sigmoid_bce(logits, targets), pairwise_dice(logits, targets)
    for i in range(5):
        for j in range(4):
            x, t = logits[i], targets[j]
            p = torch.sigmoid(x)
            ref_bce = (-(t * torch.log(p) + (1 - t) * torch.log1p(-p))).mean()
            ref_dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            assert abs(float(bce[i, j] - ref_bce)) < 1e-12, f"seed {rng.seed_value}"
            assert abs(float(dice[i, j] - ref_dice)) < 1e-12, f"seed {rng.seed_value}"


def test_cost_matrix_hand_case():
    """One query, one target, 2 points: every term computed by hand."""
    matcher = HungarianMatcher(num_points=2)
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0]])  # softmax = (0.6, 0.2, 0.2)
    masks = torch.zeros(1, 2, 2)  # logit 0 everywhere -> p = 0.5
    tgt = torch.ones(1, 2, 2, dtype=torch.bool)
    coords = torch.tensor([[0.25, 0.25], [0.75, 0.75]])  # pixel centres: exact reads, no padding
    cost = matcher.cost_matrix(logits, masks, torch.tensor([0]), tgt, coords)
    bce = math.log(2.0)  # -log(0.5) at each point
    dice = 1 - (2 * 1.0 + 1) / (1.0 + 2.0 + 1)  # sum p = 1, sum t = 2, sum pt = 1
    expected = 2.0 * -0.6 + 5.0 * bce + 5.0 * dice
    assert abs(float(cost[0, 0]) - expected) < 1e-6


def test_cost_matrix_matches_float64_loop(rng):
    matcher = HungarianMatcher(num_points=13)
    logits = torch.randn(6, 4, generator=rng)
    masks = torch.randn(6, 5, 6, generator=rng) * 2
    tgt = torch.rand(3, 20, 24, generator=rng) > 0.5  # targets at 4x the mask resolution, as in training
    labels = torch.tensor([2, 0, 2])
    coords = torch.rand(13, 2, generator=rng)
    cost = matcher.cost_matrix(logits, masks, labels, tgt, coords)
    ref = cost_ref(logits, masks, labels, tgt, coords)
    assert rel_err(cost, ref) < 1e-5, f"seed {rng.seed_value}"


def test_assignment_is_optimal_against_brute_force(rng):
    matcher = HungarianMatcher(num_points=17)
    b, q, k = 2, 5, 3
    logits = torch.randn(b, q, k + 1, generator=rng)
    masks = torch.randn(b, q, 4, 4, generator=rng)
    targets = [
        {"labels": torch.tensor([1, 0, 2]), "masks": torch.rand(3, 16, 16, generator=rng) > 0.4},
        {"labels": torch.tensor([2, 2]), "masks": torch.rand(2, 16, 16, generator=rng) > 0.6},
    ]
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    indices = matcher(logits, masks, targets, generator=torch.Generator().manual_seed(seed))
    replay = torch.Generator().manual_seed(seed)  # the matcher draws one set of points per image, in order
    for i, (rows, cols) in enumerate(indices):
        coords = torch.rand(17, 2, generator=replay)
        cost = cost_ref(logits[i], masks[i], targets[i]["labels"], targets[i]["masks"], coords)
        n = len(targets[i]["labels"])
        assert sorted(cols.tolist()) == list(range(n)) and len(set(rows.tolist())) == n
        best = min(sum(float(cost[p[j], j]) for j in range(n)) for p in itertools.permutations(range(q), n))
        got = sum(float(cost[r, c]) for r, c in zip(rows, cols))
        assert abs(got - best) < 1e-4, f"seed {rng.seed_value}: matched cost {got} vs optimum {best}"


def test_matcher_recovers_obvious_assignment(rng):
    """Queries that predict a permutation of the targets exactly are matched to them."""
    n, q, k = 4, 7, 5
    tgt_masks = torch.zeros(n, 32, 32, dtype=torch.bool)
    for j in range(n):
        tgt_masks[j, 8 * j:8 * j + 8, :] = True
    labels = torch.randint(0, k, (n,), generator=rng)
    perm = torch.randperm(q, generator=rng)[:n]  # query perm[j] predicts target j
    logits = torch.full((1, q, k + 1), -4.0)
    logits[0, :, k] = 4.0
    masks = torch.full((1, q, 8, 8), -8.0)
    for j in range(n):
        logits[0, perm[j], labels[j]] = 6.0
        masks[0, perm[j], 2 * j:2 * j + 2, :] = 8.0
    rows, cols = HungarianMatcher(num_points=400)(logits, masks, [{"labels": labels, "masks": tgt_masks}])[0]
    assert dict(zip(cols.tolist(), rows.tolist())) == {j: int(perm[j]) for j in range(n)}, f"seed {rng.seed_value}"


def test_empty_targets_give_empty_match():
    out = HungarianMatcher(num_points=8)(torch.randn(1, 3, 4), torch.randn(1, 3, 4, 4),
                                         [{"labels": torch.zeros(0, dtype=torch.long),
                                           "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}])
    assert out[0][0].numel() == 0 and out[0][1].numel() == 0


def test_uncertain_points_pick_most_uncertain(rng):
    logits = torch.randn(3, 1, 9, 11, generator=rng) * 4
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    coords = uncertain_point_coords(logits, 20, 3.0, 0.75, generator=torch.Generator().manual_seed(seed))
    assert coords.shape == (3, 20, 2) and coords.min() >= 0 and coords.max() <= 1
    replay = torch.Generator().manual_seed(seed)
    oversampled = torch.rand(3, 60, 2, generator=replay)
    unc = -point_sample(logits, oversampled)[:, 0].abs()  # (3, 60)
    for i in range(3):
        picked = unc[i].topk(15).indices
        as_set = lambda pts: sorted(map(tuple, pts.tolist()))  # noqa: E731 - the order of the points is free
        assert as_set(coords[i, :15]) == as_set(oversampled[i, picked]), f"seed {rng.seed_value}"
        # the 15 importance points are the 15 most uncertain of the 60 candidates
        rest = torch.ones(60, dtype=torch.bool)
        rest[picked] = False
        assert unc[i, picked].min() >= unc[i, rest].max()
    assert torch.equal(coords[:, 15:], torch.rand(3, 5, 2, generator=replay))


@pytest.mark.parametrize("bad", ["nan"])
def test_nan_predictions_raise(bad):
    logits = torch.full((1, 2, 3), float(bad))
    with pytest.raises(FloatingPointError):
        HungarianMatcher(num_points=4)(logits, torch.randn(1, 2, 4, 4),
                                       [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}])
