"""Label sets of the datasets the official Mask2Former checkpoints were trained on.

Each :class:`DatasetLabels` maps the model's contiguous class ids (0..K-1, the order of its classifier) to names,
"thing" / "stuff", the dataset's own category ids (what COCO-format result files and evaluators expect) and
visualisation colours. Sources (factual data, checked against the official code):

- COCO panoptic / instance: detectron2 ``detectron2/data/datasets/builtin_meta.py`` ``COCO_CATEGORIES`` (itself
  panopticapi's ``panoptic_coco_categories.json``). Panoptic models use all 133 entries in that order
  (``coco_panoptic_standard``); instance models the 80 things in that order (``_get_coco_instances_meta``).
- ADE20K SceneParsing (150 classes): names from detectron2 ``ADE20K_SEM_SEG_CATEGORIES`` (kept verbatim, including
  the official trailing space in ``"window "``), colours and isthing from Mask2Former
  ``mask2former/data/datasets/register_ade20k_panoptic.py`` ``ADE20K_150_CATEGORIES``. The official semantic
  evaluation uses the contiguous ids, so ``dataset_ids`` are 0..149.
- Cityscapes (19 train ids): detectron2 ``CITYSCAPES_CATEGORIES`` (from cityscapesScripts ``labels.py``);
  ``dataset_ids`` are the Cityscapes label ids (7, 8, 11, ...), what the Cityscapes evaluation reads.

For the two semantic label sets ``thing_classes`` still records which classes are countable objects (Cityscapes
``hasInstances``, the ADE20K panoptic split); semantic inference ignores it.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import M2FError

if TYPE_CHECKING:
    from .config import Mask2FormerConfig

Color = tuple[int, int, int]


@dataclass(frozen=True)
class DatasetLabels:
    """Contiguous class id ``i`` is called ``names[i]``, is a thing iff ``i in thing_classes``, is written to result
    files as ``dataset_ids[i]`` and drawn in ``colors[i]`` (RGB)."""

    names: tuple[str, ...]
    thing_classes: tuple[int, ...]
    dataset_ids: tuple[int, ...]
    colors: tuple[Color, ...]

    def __post_init__(self) -> None:
        n = len(self.names)
        if len(self.dataset_ids) != n or len(self.colors) != n:
            raise ValueError("names, dataset_ids and colors must have one entry per class")

    @property
    def num_classes(self) -> int:
        return len(self.names)


# (dataset category id, isthing, name, colour). Row order = contiguous class id.
# fmt: off
_COCO_PANOPTIC = (
    (1, 1, "person", (220, 20, 60)),
    (2, 1, "bicycle", (119, 11, 32)),
    (3, 1, "car", (0, 0, 142)),
    (4, 1, "motorcycle", (0, 0, 230)),
    (5, 1, "airplane", (106, 0, 228)),
    (6, 1, "bus", (0, 60, 100)),
    (7, 1, "train", (0, 80, 100)),
    (8, 1, "truck", (0, 0, 70)),
    (9, 1, "boat", (0, 0, 192)),
    (10, 1, "traffic light", (250, 170, 30)),
    (11, 1, "fire hydrant", (100, 170, 30)),
    (13, 1, "stop sign", (220, 220, 0)),
    (14, 1, "parking meter", (175, 116, 175)),
    (15, 1, "bench", (250, 0, 30)),
    (16, 1, "bird", (165, 42, 42)),
    (17, 1, "cat", (255, 77, 255)),
    (18, 1, "dog", (0, 226, 252)),
    (19, 1, "horse", (182, 182, 255)),
    (20, 1, "sheep", (0, 82, 0)),
    (21, 1, "cow", (120, 166, 157)),
    (22, 1, "elephant", (110, 76, 0)),
    (23, 1, "bear", (174, 57, 255)),
    (24, 1, "zebra", (199, 100, 0)),
    (25, 1, "giraffe", (72, 0, 118)),
    (27, 1, "backpack", (255, 179, 240)),
    (28, 1, "umbrella", (0, 125, 92)),
    (31, 1, "handbag", (209, 0, 151)),
    (32, 1, "tie", (188, 208, 182)),
    (33, 1, "suitcase", (0, 220, 176)),
    (34, 1, "frisbee", (255, 99, 164)),
    (35, 1, "skis", (92, 0, 73)),
    (36, 1, "snowboard", (133, 129, 255)),
    (37, 1, "sports ball", (78, 180, 255)),
    (38, 1, "kite", (0, 228, 0)),
    (39, 1, "baseball bat", (174, 255, 243)),
    (40, 1, "baseball glove", (45, 89, 255)),
    (41, 1, "skateboard", (134, 134, 103)),
    (42, 1, "surfboard", (145, 148, 174)),
    (43, 1, "tennis racket", (255, 208, 186)),
    (44, 1, "bottle", (197, 226, 255)),
    (46, 1, "wine glass", (171, 134, 1)),
    (47, 1, "cup", (109, 63, 54)),
    (48, 1, "fork", (207, 138, 255)),
    (49, 1, "knife", (151, 0, 95)),
    (50, 1, "spoon", (9, 80, 61)),
    (51, 1, "bowl", (84, 105, 51)),
    (52, 1, "banana", (74, 65, 105)),
    (53, 1, "apple", (166, 196, 102)),
    (54, 1, "sandwich", (208, 195, 210)),
    (55, 1, "orange", (255, 109, 65)),
    (56, 1, "broccoli", (0, 143, 149)),
    (57, 1, "carrot", (179, 0, 194)),
    (58, 1, "hot dog", (209, 99, 106)),
    (59, 1, "pizza", (5, 121, 0)),
    (60, 1, "donut", (227, 255, 205)),
    (61, 1, "cake", (147, 186, 208)),
    (62, 1, "chair", (153, 69, 1)),
    (63, 1, "couch", (3, 95, 161)),
    (64, 1, "potted plant", (163, 255, 0)),
    (65, 1, "bed", (119, 0, 170)),
    (67, 1, "dining table", (0, 182, 199)),
    (70, 1, "toilet", (0, 165, 120)),
    (72, 1, "tv", (183, 130, 88)),
    (73, 1, "laptop", (95, 32, 0)),
    (74, 1, "mouse", (130, 114, 135)),
    (75, 1, "remote", (110, 129, 133)),
    (76, 1, "keyboard", (166, 74, 118)),
    (77, 1, "cell phone", (219, 142, 185)),
    (78, 1, "microwave", (79, 210, 114)),
    (79, 1, "oven", (178, 90, 62)),
    (80, 1, "toaster", (65, 70, 15)),
    (81, 1, "sink", (127, 167, 115)),
    (82, 1, "refrigerator", (59, 105, 106)),
    (84, 1, "book", (142, 108, 45)),
    (85, 1, "clock", (196, 172, 0)),
    (86, 1, "vase", (95, 54, 80)),
    (87, 1, "scissors", (128, 76, 255)),
    (88, 1, "teddy bear", (201, 57, 1)),
    (89, 1, "hair drier", (246, 0, 122)),
    (90, 1, "toothbrush", (191, 162, 208)),
    (92, 0, "banner", (255, 255, 128)),
    (93, 0, "blanket", (147, 211, 203)),
    (95, 0, "bridge", (150, 100, 100)),
    (100, 0, "cardboard", (168, 171, 172)),
    (107, 0, "counter", (146, 112, 198)),
    (109, 0, "curtain", (210, 170, 100)),
    (112, 0, "door-stuff", (92, 136, 89)),
    (118, 0, "floor-wood", (218, 88, 184)),
    (119, 0, "flower", (241, 129, 0)),
    (122, 0, "fruit", (217, 17, 255)),
    (125, 0, "gravel", (124, 74, 181)),
    (128, 0, "house", (70, 70, 70)),
    (130, 0, "light", (255, 228, 255)),
    (133, 0, "mirror-stuff", (154, 208, 0)),
    (138, 0, "net", (193, 0, 92)),
    (141, 0, "pillow", (76, 91, 113)),
    (144, 0, "platform", (255, 180, 195)),
    (145, 0, "playingfield", (106, 154, 176)),
    (147, 0, "railroad", (230, 150, 140)),
    (148, 0, "river", (60, 143, 255)),
    (149, 0, "road", (128, 64, 128)),
    (151, 0, "roof", (92, 82, 55)),
    (154, 0, "sand", (254, 212, 124)),
    (155, 0, "sea", (73, 77, 174)),
    (156, 0, "shelf", (255, 160, 98)),
    (159, 0, "snow", (255, 255, 255)),
    (161, 0, "stairs", (104, 84, 109)),
    (166, 0, "tent", (169, 164, 131)),
    (168, 0, "towel", (225, 199, 255)),
    (171, 0, "wall-brick", (137, 54, 74)),
    (175, 0, "wall-stone", (135, 158, 223)),
    (176, 0, "wall-tile", (7, 246, 231)),
    (177, 0, "wall-wood", (107, 255, 200)),
    (178, 0, "water-other", (58, 41, 149)),
    (180, 0, "window-blind", (183, 121, 142)),
    (181, 0, "window-other", (255, 73, 97)),
    (184, 0, "tree-merged", (107, 142, 35)),
    (185, 0, "fence-merged", (190, 153, 153)),
    (186, 0, "ceiling-merged", (146, 139, 141)),
    (187, 0, "sky-other-merged", (70, 130, 180)),
    (188, 0, "cabinet-merged", (134, 199, 156)),
    (189, 0, "table-merged", (209, 226, 140)),
    (190, 0, "floor-other-merged", (96, 36, 108)),
    (191, 0, "pavement-merged", (96, 96, 96)),
    (192, 0, "mountain-merged", (64, 170, 64)),
    (193, 0, "grass-merged", (152, 251, 152)),
    (194, 0, "dirt-merged", (208, 229, 228)),
    (195, 0, "paper-merged", (206, 186, 171)),
    (196, 0, "food-other-merged", (152, 161, 64)),
    (197, 0, "building-other-merged", (116, 112, 0)),
    (198, 0, "rock-merged", (0, 114, 143)),
    (199, 0, "wall-other-merged", (102, 102, 156)),
    (200, 0, "rug-merged", (250, 141, 255)),
)

_CITYSCAPES = (
    (7, 0, "road", (128, 64, 128)),
    (8, 0, "sidewalk", (244, 35, 232)),
    (11, 0, "building", (70, 70, 70)),
    (12, 0, "wall", (102, 102, 156)),
    (13, 0, "fence", (190, 153, 153)),
    (17, 0, "pole", (153, 153, 153)),
    (19, 0, "traffic light", (250, 170, 30)),
    (20, 0, "traffic sign", (220, 220, 0)),
    (21, 0, "vegetation", (107, 142, 35)),
    (22, 0, "terrain", (152, 251, 152)),
    (23, 0, "sky", (70, 130, 180)),
    (24, 1, "person", (220, 20, 60)),
    (25, 1, "rider", (255, 0, 0)),
    (26, 1, "car", (0, 0, 142)),
    (27, 1, "truck", (0, 0, 70)),
    (28, 1, "bus", (0, 60, 100)),
    (31, 1, "train", (0, 80, 100)),
    (32, 1, "motorcycle", (0, 0, 230)),
    (33, 1, "bicycle", (119, 11, 32)),
)

_ADE20K = (
    (0, 0, "wall", (120, 120, 120)),
    (1, 0, "building", (180, 120, 120)),
    (2, 0, "sky", (6, 230, 230)),
    (3, 0, "floor", (80, 50, 50)),
    (4, 0, "tree", (4, 200, 3)),
    (5, 0, "ceiling", (120, 120, 80)),
    (6, 0, "road, route", (140, 140, 140)),
    (7, 1, "bed", (204, 5, 255)),
    (8, 1, "window ", (230, 230, 230)),
    (9, 0, "grass", (4, 250, 7)),
    (10, 1, "cabinet", (224, 5, 255)),
    (11, 0, "sidewalk, pavement", (235, 255, 7)),
    (12, 1, "person", (150, 5, 61)),
    (13, 0, "earth, ground", (120, 120, 70)),
    (14, 1, "door", (8, 255, 51)),
    (15, 1, "table", (255, 6, 82)),
    (16, 0, "mountain, mount", (143, 255, 140)),
    (17, 0, "plant", (204, 255, 4)),
    (18, 1, "curtain", (255, 51, 7)),
    (19, 1, "chair", (204, 70, 3)),
    (20, 1, "car", (0, 102, 200)),
    (21, 0, "water", (61, 230, 250)),
    (22, 1, "painting, picture", (255, 6, 51)),
    (23, 1, "sofa", (11, 102, 255)),
    (24, 1, "shelf", (255, 7, 71)),
    (25, 0, "house", (255, 9, 224)),
    (26, 0, "sea", (9, 7, 230)),
    (27, 1, "mirror", (220, 220, 220)),
    (28, 0, "rug", (255, 9, 92)),
    (29, 0, "field", (112, 9, 255)),
    (30, 1, "armchair", (8, 255, 214)),
    (31, 1, "seat", (7, 255, 224)),
    (32, 1, "fence", (255, 184, 6)),
    (33, 1, "desk", (10, 255, 71)),
    (34, 0, "rock, stone", (255, 41, 10)),
    (35, 1, "wardrobe, closet, press", (7, 255, 255)),
    (36, 1, "lamp", (224, 255, 8)),
    (37, 1, "tub", (102, 8, 255)),
    (38, 1, "rail", (255, 61, 6)),
    (39, 1, "cushion", (255, 194, 7)),
    (40, 0, "base, pedestal, stand", (255, 122, 8)),
    (41, 1, "box", (0, 255, 20)),
    (42, 1, "column, pillar", (255, 8, 41)),
    (43, 1, "signboard, sign", (255, 5, 153)),
    (44, 1, "chest of drawers, chest, bureau, dresser", (6, 51, 255)),
    (45, 1, "counter", (235, 12, 255)),
    (46, 0, "sand", (160, 150, 20)),
    (47, 1, "sink", (0, 163, 255)),
    (48, 0, "skyscraper", (140, 140, 140)),
    (49, 1, "fireplace", (250, 10, 15)),
    (50, 1, "refrigerator, icebox", (20, 255, 0)),
    (51, 0, "grandstand, covered stand", (31, 255, 0)),
    (52, 0, "path", (255, 31, 0)),
    (53, 1, "stairs", (255, 224, 0)),
    (54, 0, "runway", (153, 255, 0)),
    (55, 1, "case, display case, showcase, vitrine", (0, 0, 255)),
    (56, 1, "pool table, billiard table, snooker table", (255, 71, 0)),
    (57, 1, "pillow", (0, 235, 255)),
    (58, 1, "screen door, screen", (0, 173, 255)),
    (59, 0, "stairway, staircase", (31, 0, 255)),
    (60, 0, "river", (11, 200, 200)),
    (61, 0, "bridge, span", (255, 82, 0)),
    (62, 1, "bookcase", (0, 255, 245)),
    (63, 0, "blind, screen", (0, 61, 255)),
    (64, 1, "coffee table", (0, 255, 112)),
    (65, 1, "toilet, can, commode, crapper, pot, potty, stool, throne", (0, 255, 133)),
    (66, 1, "flower", (255, 0, 0)),
    (67, 1, "book", (255, 163, 0)),
    (68, 0, "hill", (255, 102, 0)),
    (69, 1, "bench", (194, 255, 0)),
    (70, 1, "countertop", (0, 143, 255)),
    (71, 1, "stove", (51, 255, 0)),
    (72, 1, "palm, palm tree", (0, 82, 255)),
    (73, 1, "kitchen island", (0, 255, 41)),
    (74, 1, "computer", (0, 255, 173)),
    (75, 1, "swivel chair", (10, 0, 255)),
    (76, 1, "boat", (173, 255, 0)),
    (77, 0, "bar", (0, 255, 153)),
    (78, 1, "arcade machine", (255, 92, 0)),
    (79, 0, "hovel, hut, hutch, shack, shanty", (255, 0, 255)),
    (80, 1, "bus", (255, 0, 245)),
    (81, 1, "towel", (255, 0, 102)),
    (82, 1, "light", (255, 173, 0)),
    (83, 1, "truck", (255, 0, 20)),
    (84, 0, "tower", (255, 184, 184)),
    (85, 1, "chandelier", (0, 31, 255)),
    (86, 1, "awning, sunshade, sunblind", (0, 255, 61)),
    (87, 1, "street lamp", (0, 71, 255)),
    (88, 1, "booth", (255, 0, 204)),
    (89, 1, "tv", (0, 255, 194)),
    (90, 1, "plane", (0, 255, 82)),
    (91, 0, "dirt track", (0, 10, 255)),
    (92, 1, "clothes", (0, 112, 255)),
    (93, 1, "pole", (51, 0, 255)),
    (94, 0, "land, ground, soil", (0, 194, 255)),
    (95, 1, "bannister, banister, balustrade, balusters, handrail", (0, 122, 255)),
    (96, 0, "escalator, moving staircase, moving stairway", (0, 255, 163)),
    (97, 1, "ottoman, pouf, pouffe, puff, hassock", (255, 153, 0)),
    (98, 1, "bottle", (0, 255, 10)),
    (99, 0, "buffet, counter, sideboard", (255, 112, 0)),
    (100, 0, "poster, posting, placard, notice, bill, card", (143, 255, 0)),
    (101, 0, "stage", (82, 0, 255)),
    (102, 1, "van", (163, 255, 0)),
    (103, 1, "ship", (255, 235, 0)),
    (104, 1, "fountain", (8, 184, 170)),
    (105, 0, "conveyer belt, conveyor belt, conveyer, conveyor, transporter", (133, 0, 255)),
    (106, 0, "canopy", (0, 255, 92)),
    (107, 1, "washer, automatic washer, washing machine", (184, 0, 255)),
    (108, 1, "plaything, toy", (255, 0, 31)),
    (109, 0, "pool", (0, 184, 255)),
    (110, 1, "stool", (0, 214, 255)),
    (111, 1, "barrel, cask", (255, 0, 112)),
    (112, 1, "basket, handbasket", (92, 255, 0)),
    (113, 0, "falls", (0, 224, 255)),
    (114, 0, "tent", (112, 224, 255)),
    (115, 1, "bag", (70, 184, 160)),
    (116, 1, "minibike, motorbike", (163, 0, 255)),
    (117, 0, "cradle", (153, 0, 255)),
    (118, 1, "oven", (71, 255, 0)),
    (119, 1, "ball", (255, 0, 163)),
    (120, 1, "food, solid food", (255, 204, 0)),
    (121, 1, "step, stair", (255, 0, 143)),
    (122, 0, "tank, storage tank", (0, 255, 235)),
    (123, 1, "trade name", (133, 255, 0)),
    (124, 1, "microwave", (255, 0, 235)),
    (125, 1, "pot", (245, 0, 255)),
    (126, 1, "animal", (255, 0, 122)),
    (127, 1, "bicycle", (255, 245, 0)),
    (128, 0, "lake", (10, 190, 212)),
    (129, 1, "dishwasher", (214, 255, 0)),
    (130, 1, "screen", (0, 204, 255)),
    (131, 0, "blanket, cover", (20, 0, 255)),
    (132, 1, "sculpture", (255, 255, 0)),
    (133, 1, "hood, exhaust hood", (0, 153, 255)),
    (134, 1, "sconce", (0, 41, 255)),
    (135, 1, "vase", (0, 255, 204)),
    (136, 1, "traffic light", (41, 0, 255)),
    (137, 1, "tray", (41, 255, 0)),
    (138, 1, "trash can", (173, 0, 255)),
    (139, 1, "fan", (0, 245, 255)),
    (140, 0, "pier", (71, 0, 255)),
    (141, 0, "crt screen", (122, 0, 255)),
    (142, 1, "plate", (0, 255, 184)),
    (143, 1, "monitor", (0, 92, 255)),
    (144, 1, "bulletin board", (184, 255, 0)),
    (145, 0, "shower", (0, 133, 255)),
    (146, 1, "radiator", (255, 214, 0)),
    (147, 1, "glass, drinking glass", (25, 194, 194)),
    (148, 1, "clock", (102, 255, 0)),
    (149, 1, "flag", (92, 0, 255)),
)
# fmt: on

_Row = tuple[int, int, str, Color]


def _from_rows(rows: tuple[_Row, ...], dataset_ids: tuple[int, ...] | None = None) -> DatasetLabels:
    return DatasetLabels(
        names=tuple(name for _, _, name, _ in rows),
        thing_classes=tuple(i for i, (_, isthing, _, _) in enumerate(rows) if isthing),
        dataset_ids=tuple(cid for cid, _, _, _ in rows) if dataset_ids is None else dataset_ids,
        colors=tuple(color for _, _, _, color in rows),
    )


def _coco_panoptic() -> DatasetLabels:
    return _from_rows(_COCO_PANOPTIC)


def _coco_instance() -> DatasetLabels:
    return _from_rows(tuple(row for row in _COCO_PANOPTIC if row[1]))


def _ade20k_semantic() -> DatasetLabels:
    return _from_rows(_ADE20K)


def _cityscapes_semantic() -> DatasetLabels:
    return _from_rows(_CITYSCAPES)


_DATASETS = {
    "coco-panoptic": _coco_panoptic,
    "coco-instance": _coco_instance,
    "ade20k-semantic": _ade20k_semantic,
    "cityscapes-semantic": _cityscapes_semantic,
}


def dataset_names() -> list[str]:
    return list(_DATASETS)


def dataset_labels(name: str) -> DatasetLabels:
    """The label set of dataset ``name`` (one of :func:`dataset_names`)."""
    try:
        build = _DATASETS[name]
    except KeyError:
        raise M2FError(f"unknown dataset {name!r}; choose one of: {', '.join(_DATASETS)}") from None
    return build()


def generated_colors(count: int) -> tuple[Color, ...]:
    """``count`` distinct, deterministic colours (golden-ratio hue steps) for label sets without their own."""
    colors = []
    for i in range(count):
        hue = (i * 0.618033988749895) % 1.0
        saturation = 0.65 + 0.35 * ((i * 7) % 3) / 2
        value = 0.95 - 0.3 * ((i * 5) % 4) / 3
        r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
        colors.append((int(round(r * 255)), int(round(g * 255)), int(round(b * 255))))
    return tuple(colors)


def labels_for_config(config: "Mask2FormerConfig") -> DatasetLabels:
    """The label set a model config describes. Names, things and dataset ids come from the config; colours from
    the known dataset with the same class names, else :func:`generated_colors`."""
    names = tuple(config.class_name(i) for i in range(config.num_classes))
    colors = None
    for build in _DATASETS.values():
        known = build()
        if known.names == names:
            colors = known.colors
            break
    return DatasetLabels(
        names=names,
        thing_classes=tuple(sorted(set(int(i) for i in config.thing_classes))),
        dataset_ids=tuple(config.dataset_id(i) for i in range(config.num_classes)),
        colors=colors if colors is not None else generated_colors(config.num_classes),
    )
