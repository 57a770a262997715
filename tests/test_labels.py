"""Label sets: counts, uniqueness, the official id orders, and that every preset builds from them."""
from __future__ import annotations

import pytest

from m2f.config import DATASET_PRESETS, preset, preset_names
from m2f.errors import M2FError
from m2f.config import Mask2FormerConfig
from m2f.labels import dataset_labels, dataset_names, generated_colors, labels_for_config


@pytest.mark.parametrize("name", dataset_names())
def test_label_set_is_consistent(name):
    labels = dataset_labels(name)
    num_classes = DATASET_PRESETS[name][0]
    assert labels.num_classes == num_classes
    assert len(labels.names) == len(labels.dataset_ids) == len(labels.colors) == num_classes
    assert len(set(labels.names)) == num_classes, "class names must be unique"
    assert len(set(labels.dataset_ids)) == num_classes, "dataset ids must be unique"
    assert list(labels.thing_classes) == sorted(set(labels.thing_classes))
    assert all(0 <= i < num_classes for i in labels.thing_classes)
    for color in labels.colors:
        assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)


def test_coco_panoptic_facts():
    labels = dataset_labels("coco-panoptic")
    assert len(labels.thing_classes) == 80
    assert labels.thing_classes == tuple(range(80)), "detectron2 lists the 80 things first"
    assert labels.names[0] == "person" and labels.dataset_ids[0] == 1 and labels.colors[0] == (220, 20, 60)
    assert labels.names[79] == "toothbrush" and labels.dataset_ids[79] == 90
    assert labels.names[80] == "banner" and labels.dataset_ids[80] == 92
    assert labels.names[132] == "rug-merged" and labels.dataset_ids[132] == 200
    assert list(labels.dataset_ids) == sorted(labels.dataset_ids)
    assert all(1 <= i <= 200 for i in labels.dataset_ids)


def test_coco_instance_is_the_things_of_panoptic():
    panoptic, instance = dataset_labels("coco-panoptic"), dataset_labels("coco-instance")
    assert instance.names == panoptic.names[:80]
    assert instance.dataset_ids == panoptic.dataset_ids[:80]
    assert instance.thing_classes == tuple(range(80))
    assert max(instance.dataset_ids) == 90 and 12 not in instance.dataset_ids  # COCO's gaps


def test_ade20k_and_cityscapes_facts():
    ade = dataset_labels("ade20k-semantic")
    assert ade.dataset_ids == tuple(range(150))
    assert ade.names[:3] == ("wall", "building", "sky") and ade.names[-1] == "flag"
    assert ade.colors[0] == (120, 120, 120)
    city = dataset_labels("cityscapes-semantic")
    assert city.dataset_ids == (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
    assert city.names[0] == "road" and city.names[-1] == "bicycle"
    assert city.thing_classes == tuple(range(11, 19))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(M2FError, match="coco-panoptic.*cityscapes-semantic"):
        dataset_labels("pascal-voc")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_with_labels(name):
    cfg = preset(name)
    dataset = next(d for d in DATASET_PRESETS if name.endswith(d))
    labels = dataset_labels(dataset)
    assert cfg.class_names == labels.names and cfg.num_classes == labels.num_classes
    assert cfg.dataset_id(cfg.num_classes - 1) == labels.dataset_ids[-1]


def test_labels_for_config_uses_known_colours_or_generates_them():
    cfg = preset("r50-coco-panoptic")
    labels = labels_for_config(cfg)
    assert labels == dataset_labels("coco-panoptic")
    custom = Mask2FormerConfig(num_classes=5, thing_classes=(3, 1))
    labels = labels_for_config(custom)
    assert labels.names == ("class_0", "class_1", "class_2", "class_3", "class_4")
    assert labels.thing_classes == (1, 3) and labels.dataset_ids == (0, 1, 2, 3, 4)
    assert labels.colors == generated_colors(5) and len(set(labels.colors)) == 5
    assert len(set(generated_colors(300))) == 300
