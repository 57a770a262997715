"""``m2f presets``: the named official configurations as a table, with the official config file each follows.

An official detectron2 checkpoint (``model_final_*.pkl`` from the Mask2Former MODEL_ZOO.md) does not record its
architecture: the preset whose config file it was trained with is what ``--preset`` names.
"""
from __future__ import annotations

import argparse

OFFICIAL_REPO = "facebookresearch/Mask2Former"

# dataset preset -> the folder of its configs in the official repository's configs/ tree
_CONFIG_DIRS = {
    "coco-panoptic": "coco/panoptic-segmentation",
    "coco-instance": "coco/instance-segmentation",
    "ade20k-semantic": "ade20k/semantic-segmentation",
    "cityscapes-semantic": "cityscapes/semantic-segmentation",
}
# (backbone, dataset schedule) -> config file name below that folder, as in the official configs/ tree. Swin-B lists
# its ImageNet-21k file; the ImageNet-1k ``swin_base_384`` files have the same architecture and take the same preset.
_COCO = {"r50": "maskformer2_R50_bs16_50ep", "r101": "maskformer2_R101_bs16_50ep",
         "swin-t": "swin/maskformer2_swin_tiny_bs16_50ep", "swin-s": "swin/maskformer2_swin_small_bs16_50ep",
         "swin-b": "swin/maskformer2_swin_base_IN21k_384_bs16_50ep",
         "swin-l": "swin/maskformer2_swin_large_IN21k_384_bs16_100ep"}
_CONFIG_FILES = {
    "coco-panoptic": _COCO,
    "coco-instance": _COCO,
    "ade20k-semantic": {"r50": "maskformer2_R50_bs16_160k", "r101": "maskformer2_R101_bs16_90k",
                        "swin-t": "swin/maskformer2_swin_tiny_bs16_160k", "swin-s": "swin/maskformer2_swin_small_bs16_160k",
                        "swin-b": "swin/maskformer2_swin_base_IN21k_384_bs16_160k_res640",
                        "swin-l": "swin/maskformer2_swin_large_IN21k_384_bs16_160k_res640"},
    "cityscapes-semantic": {"r50": "maskformer2_R50_bs16_90k", "r101": "maskformer2_R101_bs16_90k",
                            "swin-t": "swin/maskformer2_swin_tiny_bs16_90k", "swin-s": "swin/maskformer2_swin_small_bs16_90k",
                            "swin-b": "swin/maskformer2_swin_base_IN21k_384_bs16_90k",
                            "swin-l": "swin/maskformer2_swin_large_IN21k_384_bs16_90k"},
}
_HEADER = ("preset", "backbone", "dataset", "task", "queries", "classes", "test size", "official config")


def official_config_file(backbone: str, dataset: str) -> str:
    """The official config file (path in the official repository) of a preset's backbone and dataset."""
    return f"configs/{_CONFIG_DIRS[dataset]}/{_CONFIG_FILES[dataset][backbone]}.yaml"


def preset_rows() -> list[tuple[str, ...]]:
    """One row per preset, in ``m2f.preset_names()`` order, with the columns of ``_HEADER``."""
    from m2f.config import BACKBONE_PRESETS, DATASET_PRESETS, preset

    rows = []
    for backbone in BACKBONE_PRESETS:
        for dataset in DATASET_PRESETS:
            name = f"{backbone}-{dataset}"
            cfg = preset(name)
            short, longest = cfg.test_size
            rows.append((name, backbone, dataset.rsplit("-", 1)[0], cfg.default_task,
                         str(cfg.transformer_decoder.num_queries), str(cfg.num_classes), f"{short} / {longest}",
                         official_config_file(backbone, dataset)))
    return rows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "presets", help="list the named official configurations",
        description=f"The official configurations m2f names (--preset NAME), with the config file of {OFFICIAL_REPO} "
                    "each follows; an official model_final_*.pkl trained with that file takes that preset. Test size "
                    "is the shortest / longest side the images are resized to.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = [_HEADER, *preset_rows()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    for row in rows:  # plain aligned text: readable in a terminal, a log and a pipe alike
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"official config files: https://github.com/{OFFICIAL_REPO}/tree/main/ (checkpoints: its MODEL_ZOO.md)")
    return 0
