"""Output writers (COCO panoptic PNG + JSON, COCO instance RLE results, semantic PNGs) and overlay pictures."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from m2f.labels import DatasetLabels, dataset_labels, generated_colors
from m2f.outputs import (
    id_to_rgb,
    instance_annotations,
    rgb_to_id,
    semantic_id_map,
    write_instances,
    write_panoptic,
    write_png,
    write_semantic,
)
from m2f.postprocess import InstanceResult, PanopticResult, Segment, SemanticResult, instance, mask_boxes
from m2f.visualize import draw_instances, draw_panoptic, draw_semantic




def _panoptic_case() -> PanopticResult:
    # 12 x 16 image: id 1 thing "person" (top-left block), id 2 stuff "road" (bottom), id 300 a thing far past 255
    seg = torch.zeros(12, 16, dtype=torch.int32)
    seg[1:5, 2:7] = 1
    seg[8:, :] = 2
    seg[2:4, 10:15] = 300
    segments = [
        Segment(id=1, label=0, score=0.91, is_thing=True, area=20),
        Segment(id=2, label=100, score=0.85, is_thing=False, area=64),
        Segment(id=300, label=2, score=0.88, is_thing=True, area=10),
    ]
    return PanopticResult(segmentation=seg, segments=segments)


def test_id_rgb_roundtrip(rng):
    ids = torch.randint(0, 256**3, (9, 11), generator=rng).numpy()
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids), f"seed {rng.seed_value}"
    assert id_to_rgb(np.array([[1 + 2 * 256 + 3 * 65536]]))[0, 0].tolist() == [1, 2, 3]


def test_write_panoptic_png_matches_json(tmp_path):
    labels = dataset_labels("coco-panoptic")
    result = _panoptic_case()
    annotation = write_panoptic(tmp_path / "a_panoptic.png", tmp_path / "a_panoptic.json", result, labels, 139)
    on_disk = json.loads((tmp_path / "a_panoptic.json").read_text())
    assert on_disk == annotation
    assert on_disk["image_id"] == 139 and on_disk["file_name"] == "a_panoptic.png"
    png = np.asarray(Image.open(tmp_path / "a_panoptic.png"))
    assert png.dtype == np.uint8 and png.shape == (12, 16, 3)
    ids = rgb_to_id(png)
    assert np.array_equal(ids, result.segmentation.numpy())
    infos = on_disk["segments_info"]
    assert sorted(int(i) for i in np.unique(ids) if i) == [s["id"] for s in infos]
    by_id = {s["id"]: s for s in infos}
    assert by_id[1] == {"id": 1, "category_id": 1, "category_name": "person", "isthing": True, "score": pytest.approx(0.91), "area": 20,
                        "bbox": [2, 1, 5, 4]}
    assert by_id[2]["category_id"] == labels.dataset_ids[100] and by_id[2]["isthing"] is False
    assert by_id[2]["bbox"] == [0, 8, 16, 4]
    assert by_id[300]["category_id"] == 3 and by_id[300]["bbox"] == [10, 2, 5, 2]
    assert by_id[300]["category_name"] == "car" and by_id[2]["category_name"] == labels.names[100]
    for s in infos:
        assert s["area"] == int((ids == s["id"]).sum())
    assert sorted(os.listdir(tmp_path)) == ["a_panoptic.json", "a_panoptic.png"], "no temporary files left"


def test_write_panoptic_failure_leaves_no_file(tmp_path):
    result = _panoptic_case()
    short = DatasetLabels(names=("a",), thing_classes=(0,), dataset_ids=(1,), colors=((1, 2, 3),))
    with pytest.raises(IndexError):
        write_panoptic(tmp_path / "x.png", tmp_path / "x.json", result, short, 1)
    assert os.listdir(tmp_path) == []


def test_instance_rle_results(tmp_path, rng):
    cls = torch.randn(1, 6, 4, generator=rng)
    masks = torch.randn(1, 6, 9, 13, generator=rng) * 3
    masks[0, 4] = -3.0  # one empty mask
    (result,) = instance(cls, masks, [(9, 13)], [(9, 13)], (9, 13), topk=10)
    labels = DatasetLabels(names=("a", "b", "c"), thing_classes=(0, 1, 2), dataset_ids=(5, 7, 90),
                           colors=generated_colors(3))
    written = write_instances(tmp_path / "i.json", result, labels, "img")
    assert json.loads((tmp_path / "i.json").read_text()) == written
    assert len(written) == len(result) == 10
    for ann, mask, score, label in zip(written, result.masks, result.scores, result.labels):
        assert ann["image_id"] == "img"
        assert ann["category_id"] == labels.dataset_ids[int(label)]
        assert isinstance(ann["segmentation"]["counts"], str) and ann["segmentation"]["size"] == [9, 13]
        rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_util.decode(rle).astype(bool), mask.numpy()), f"seed {rng.seed_value}"
        assert ann["bbox"] == pytest.approx(mask_util.toBbox(rle).tolist()), f"seed {rng.seed_value}"
        assert ann["score"] == pytest.approx(float(score))
    assert [a["score"] for a in written] == sorted((a["score"] for a in written), reverse=True)


def test_instance_annotations_empty():
    empty = InstanceResult(masks=torch.zeros(0, 4, 4, dtype=torch.bool), scores=torch.zeros(0),
                           labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4),
                           query_indices=torch.zeros(0, dtype=torch.long))
    assert instance_annotations(empty, dataset_labels("coco-instance"), 1) == []


def test_semantic_png_uint8_and_uint16(tmp_path, rng):
    city = dataset_labels("cityscapes-semantic")
    classes = torch.randint(0, 19, (7, 10), generator=rng)
    result = SemanticResult(probabilities=torch.zeros(19, 7, 10), labels=classes)
    write_semantic(tmp_path / "s.png", result, city)
    back = np.asarray(Image.open(tmp_path / "s.png"))
    assert back.dtype == np.uint8
    assert np.array_equal(back, np.asarray(city.dataset_ids)[classes.numpy()]), f"seed {rng.seed_value}"

    many = DatasetLabels(names=tuple(f"c{i}" for i in range(300)), thing_classes=(), dataset_ids=tuple(range(300)),
                         colors=generated_colors(300))
    classes = torch.randint(0, 300, (7, 10), generator=rng)
    classes[0, 0] = 299
    ids = semantic_id_map(SemanticResult(torch.zeros(1), classes), many)
    assert ids.dtype == np.uint16
    write_semantic(tmp_path / "s16.png", SemanticResult(torch.zeros(1), classes), many)
    back16 = np.asarray(Image.open(tmp_path / "s16.png")).astype(np.int64)
    assert np.array_equal(back16, classes.numpy()), f"seed {rng.seed_value}"


# ---------------------------------------------------------------------------------------------------------------
# overlays
# ---------------------------------------------------------------------------------------------------------------


def _image(rng, h, w):
    return torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()


def test_panoptic_overlay_is_deterministic_and_paints_segments(tmp_path, rng):
    labels = dataset_labels("coco-panoptic")
    seg = torch.zeros(60, 80, dtype=torch.int32)
    seg[:, :40] = 1  # stuff, class 100
    seg[10:30, 50:75] = 2  # thing, class 0
    result = PanopticResult(seg, [Segment(1, 100, 0.9, False, 2400), Segment(2, 0, 0.95, True, 500)])
    image = _image(rng, 60, 80)
    a = np.asarray(draw_panoptic(image, result, labels))
    b = np.asarray(draw_panoptic(image, result, labels))
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, b), "overlays must be deterministic"
    # void far from any text stays the original image
    assert np.array_equal(a[45:, 45:], image[45:, 45:])
    # a stuff pixel away from contours and text: 50/50 blend with the class colour
    expected = np.rint(0.5 * image[2, 2].astype(np.float32) + 0.5 * np.array(labels.colors[100], np.float32))
    assert np.array_equal(a[2, 2], expected.astype(np.uint8))
    # contours: the stuff segment's right edge column is white
    assert (a[5:55:7, 39] == 255).all()
    write_png(tmp_path / "o.png", draw_panoptic(image, result, labels))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), a)


def test_panoptic_overlay_draws_class_names(rng):
    labels = dataset_labels("coco-panoptic")
    seg = torch.ones(60, 200, dtype=torch.int32)
    result = PanopticResult(seg, [Segment(1, 100, 0.9, False, 12000)])
    image = np.full((60, 200, 3), 128, np.uint8)
    drawn = np.asarray(draw_panoptic(image, result, labels))
    plain = np.asarray(draw_panoptic(image, PanopticResult(seg, []), labels))
    blended = np.rint(0.5 * 128 + 0.5 * np.array(labels.colors[100], np.float32)).astype(np.uint8)
    interior = drawn[1:-1, 1:-1]
    # the label box is black with white text somewhere near the centre
    assert (interior == 0).all(axis=-1).sum() > 20
    assert (interior > 200).all(axis=-1).sum() > 5  # antialiased white glyphs
    assert not np.array_equal(drawn, plain)
    assert (interior == blended).all(axis=-1).mean() > 0.5


def test_semantic_overlay_colours(rng):
    labels = dataset_labels("ade20k-semantic")
    classes = torch.zeros(40, 120, dtype=torch.long)
    classes[:, 60:] = 2
    result = SemanticResult(torch.zeros(150, 40, 120), classes)
    image = _image(rng, 40, 120)
    out = np.asarray(draw_semantic(image, result, labels))
    expected = np.rint(0.5 * image[1, 100].astype(np.float32) + 0.5 * np.array(labels.colors[2], np.float32))
    assert np.array_equal(out[1, 100], expected.astype(np.uint8))
    rows = [0, 1, 2, 37, 38, 39]  # away from the two labels
    assert (out[rows, 59] == 255).all() and (out[rows, 60] == 255).all()


def test_instance_overlay_skips_low_scores(rng):
    labels = dataset_labels("coco-instance")
    masks = torch.zeros(2, 30, 30, dtype=torch.bool)
    masks[0, 2:12, 2:12] = True
    masks[1, 18:28, 18:28] = True
    result = InstanceResult(masks=masks, scores=torch.tensor([0.9, 0.2]), labels=torch.tensor([0, 1]),
                            boxes=mask_boxes(masks), query_indices=torch.tensor([0, 1]))
    image = _image(rng, 30, 30)
    out = np.asarray(draw_instances(image, result, labels, min_score=0.5))
    assert np.array_equal(out[15:, 15:], image[15:, 15:]), "the 0.2 instance must not be drawn"
    assert not np.array_equal(out[2:12, 2:12], image[2:12, 2:12])
    assert np.array_equal(out, np.asarray(draw_instances(image, result, labels, min_score=0.5)))
