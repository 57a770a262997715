"""PQ (panopticapi rules), mIoU (detectron2 rules) and mask AP (pycocotools) on hand-computed cases, and PQ
against an independent mask-based computation on random maps."""
from __future__ import annotations

import numpy as np
import pytest

from m2f.evaluation import MaskAP, PanopticQuality, SemanticIoU

CATS = {1: True, 2: False}  # category 1 is a thing, 2 is stuff


def seg(i, c, crowd=0):
    return {"id": i, "category_id": c, "iscrowd": crowd}


def image_a():
    """Matches with void excluded from the union; an unmatched prediction that is mostly void is ignored."""
    gt = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
    pred = np.array([[5, 5, 5, 6, 6, 6, 6, 6, 6, 7]])
    return gt, [seg(1, 1), seg(2, 2)], pred, [seg(5, 1), seg(6, 2), seg(7, 1)]


def image_b():
    """IoU exactly 0.5 does not match; a prediction on a crowd region of its class is ignored; class mismatch."""
    gt = np.array([[1, 1, 1, 1, 3, 3, 3, 2, 2, 2]])
    pred = np.array([[5, 5, 0, 0, 8, 8, 8, 9, 9, 9]])
    return gt, [seg(1, 1), seg(2, 1), seg(3, 1, crowd=1)], pred, [seg(5, 1), seg(8, 1), seg(9, 2)]


def test_pq_hand_case_void():
    pq = PanopticQuality(CATS)
    pq.update(*image_a())
    # gt1/pred5: inter 3, union 3 + 4 - 3 - 0 = 4 -> 0.75; gt2/pred6: inter 4, union 6 + 4 - 4 - 1 (void) = 5 -> 0.8
    s = pq.summary()
    assert s["PQ"] == pytest.approx(77.5) and s["PQ_th"] == pytest.approx(75.0) and s["PQ_st"] == pytest.approx(80)
    assert s["SQ"] == pytest.approx(77.5) and s["RQ"] == pytest.approx(100.0)
    assert (pq.stats[1].tp, pq.stats[1].fp, pq.stats[1].fn) == (1, 0, 0)  # pred 7 lies on void: not an FP


def test_pq_hand_case_unmatched_crowd_and_two_images():
    pq = PanopticQuality(CATS)
    pq.update(*image_b())
    assert (pq.stats[1].tp, pq.stats[1].fp, pq.stats[1].fn) == (0, 1, 2)  # pred 8 on the crowd: ignored
    assert (pq.stats[2].tp, pq.stats[2].fp, pq.stats[2].fn) == (0, 1, 0)
    pq.update(*image_a())
    s = pq.summary()
    pq1 = 0.75 / (1 + 0.5 * 1 + 0.5 * 2)  # class 1: TP 1 (IoU .75), FP 1, FN 2
    pq2 = 0.8 / (1 + 0.5 * 1)  # class 2: TP 1 (IoU 0.8), FP 1
    assert s["PQ"] == pytest.approx(100 * (pq1 + pq2) / 2)
    assert s["SQ"] == pytest.approx(100 * (0.75 + 0.8) / 2)
    assert s["RQ"] == pytest.approx(100 * (1 / 2.5 + 1 / 1.5) / 2)
    assert s["PQ_th"] == pytest.approx(100 * pq1) and s["PQ_st"] == pytest.approx(100 * pq2)
    assert s["N"] == 2 and s["num_images"] == 2


def test_pq_gt_area_comes_from_json_as_panopticapi():
    gt = np.array([[1, 1, 1, 1]])
    pred = np.array([[4, 4, 4, 0]])
    pq = PanopticQuality(CATS)
    pq.update(gt, [{"id": 1, "category_id": 1, "area": 8}], pred, [seg(4, 1)])  # union 3 + 8 - 3 -> IoU 3/8
    assert pq.stats[1].tp == 0 and pq.stats[1].fn == 1


def test_pq_rejects_inconsistent_predictions():
    gt, gs, pred, ps = image_a()
    with pytest.raises(ValueError, match="not in segments_info"):
        PanopticQuality(CATS).update(gt, gs, pred, ps[:2])
    with pytest.raises(ValueError, match="not in the map"):
        PanopticQuality(CATS).update(gt, gs, pred, ps + [seg(99, 1)])


def brute_force_pq(images, categories):
    """PQ from boolean masks, written independently of the histogram-based implementation."""
    stats = {c: [0.0, 0, 0, 0] for c in categories}  # iou, tp, fp, fn
    for gt, gsegs, pred, psegs in images:
        void = gt == 0
        crowd = {s["category_id"]: gt == s["id"] for s in gsegs if s["iscrowd"]}
        matched_g, matched_p = set(), set()
        for g in gsegs:
            for p in psegs:
                if g["iscrowd"] or g["category_id"] != p["category_id"]:
                    continue
                gm, pm = gt == g["id"], pred == p["id"]
                iou = (gm & pm).sum() / (gm | (pm & ~void)).sum()
                if iou > 0.5:
                    stats[g["category_id"]][0] += iou
                    stats[g["category_id"]][1] += 1
                    matched_g.add(g["id"])
                    matched_p.add(p["id"])
        for g in gsegs:
            if g["id"] not in matched_g and not g["iscrowd"]:
                stats[g["category_id"]][3] += 1
        for p in psegs:
            if p["id"] in matched_p:
                continue
            pm = pred == p["id"]
            ignore = void | crowd.get(p["category_id"], np.zeros_like(void))
            if (pm & ignore).sum() / pm.sum() <= 0.5:
                stats[p["category_id"]][2] += 1
    per = {c: (iou / (tp + fp / 2 + fn / 2), tp / (tp + fp / 2 + fn / 2)) for c, (iou, tp, fp, fn) in stats.items()
           if tp + fp + fn}
    return 100 * np.mean([v[0] for v in per.values()]), 100 * np.mean([v[1] for v in per.values()])


def random_image(rs: np.random.RandomState, categories):
    h, w = 12, 14
    n = rs.randint(3, 7)
    gt = np.zeros((h, w), dtype=np.int64)
    gsegs = []
    crowd_cats = set()
    for k in range(1, n + 1):  # random rectangles painted in order; id 0 remains where nothing is painted
        y0, x0 = rs.randint(0, h - 2), rs.randint(0, w - 2)
        gt[y0:y0 + rs.randint(2, 8), x0:x0 + rs.randint(2, 9)] = k
    for k in np.unique(gt):
        if k == 0:
            continue
        c = int(rs.choice(categories))
        crowd = int(c not in crowd_cats and rs.rand() < 0.2)
        crowd_cats |= {c} if crowd else set()
        gsegs.append(seg(int(k), c, crowd))
    # prediction: the ground truth with noise: pixels reassigned, some segments relabelled or split
    pred = gt * 10
    noise = rs.rand(h, w) < 0.15
    pred[noise] = rs.choice(np.unique(pred), size=noise.sum())
    if rs.rand() < 0.5:
        pred[rs.randint(0, h), :] = 777
    psegs = []
    for k in np.unique(pred):
        if k == 0:
            continue
        source = next((s for s in gsegs if s["id"] * 10 == k), None)
        c = source["category_id"] if source and rs.rand() < 0.8 else int(rs.choice(categories))
        psegs.append(seg(int(k), c))
    return gt, gsegs, pred, psegs


def test_pq_matches_independent_computation():
    seed = int.from_bytes(np.random.bytes(4), "little")
    rs = np.random.RandomState(seed)
    categories = {1: True, 2: True, 3: False, 4: False}
    images = [random_image(rs, list(categories)) for _ in range(25)]
    pq = PanopticQuality(categories)
    for im in images:
        pq.update(*im)
    ref_pq, ref_rq = brute_force_pq(images, categories)
    s = pq.summary()
    assert s["PQ"] == pytest.approx(ref_pq, abs=1e-9), f"seed {seed}"
    assert s["RQ"] == pytest.approx(ref_rq, abs=1e-9), f"seed {seed}"
    assert 0 < s["PQ"] < 100, f"seed {seed}: degenerate random case"


def test_miou_hand_case():
    m = SemanticIoU(3)
    m.update(np.array([[0, 1, 1, 1, 2]]), np.array([[0, 0, 1, 1, 255]]))
    s = m.summary()
    # class 0: TP 1, union 2; class 1: TP 2, union 3; class 2 absent from GT (its pixel is on ignore)
    assert s["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert s["pACC"] == pytest.approx(75.0)
    assert s["mACC"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert set(s["per_class"]) == {"class_0", "class_1"}


def test_mask_ap_perfect_and_half_recall():
    masks = [np.zeros((40, 40), dtype=bool) for _ in range(2)]
    masks[0][2:20, 2:20] = True
    masks[1][22:38, 20:39] = True

    def evaluator():
        ap = MaskAP([(1, "thing")])
        ap.add_image(7, 40, 40)
        for m in masks:
            ap.add_ground_truth(7, m, 1)
        return ap

    perfect = evaluator()
    for m in masks:
        perfect.add_detection(7, m, 1, 0.9)
    assert perfect.summary()["AP"] == pytest.approx(100.0)
    half = evaluator()
    half.add_detection(7, masks[0], 1, 0.9)
    # precision 1 up to recall 0.5, then nothing: 51 of COCO's 101 recall points, at every IoU threshold
    assert half.summary()["AP"] == pytest.approx(100 * 51 / 101)
