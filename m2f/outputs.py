"""Machine-readable prediction files, in the formats the COCO / Cityscapes / ADE20K tools read. Every writer is
atomic (m2f.io): a reader never sees half a file, a failure leaves none.

- Panoptic: COCO panoptic PNG (RGB, segment id = R + 256 G + 256^2 B, 0 = void) and its ``segments_info`` JSON
  (COCO panoptic results format, plus our ``score`` / ``area`` / ``bbox``; ``category_id`` is the dataset id).
- Instance: COCO detection results (one dict per instance, mask as pycocotools RLE with ``counts`` a str,
  ``bbox`` XYWH).
- Semantic: a single-channel PNG of dataset category ids, uint8, or uint16 when an id exceeds 255.

Every entry carries ``category_name`` beside ``category_id``. :func:`coco_categories` is the ``categories`` list of
the combined predictions file ``m2f predict`` writes (a COCO dataset dict that ``pycocotools.coco.COCO`` loads).

Owned files: a command that writes into a folder the user names lists what it wrote (:func:`stale_owned_files`
reads that list back), so ``--force`` removes exactly the earlier run's files that the new run did not rewrite,
and a command that replaces a folder as a whole refuses one holding files it does not own
(:func:`check_only_owned`).
"""
from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from .errors import OutputError
from .io import atomic_path, write_json_atomic
from .labels import DatasetLabels
from .postprocess import InstanceResult, PanopticResult, SemanticResult

ImageId = Union[int, str]


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def write_png(path: str | os.PathLike, image: Image.Image | np.ndarray) -> Path:
    """Write a PNG atomically (an RGB / L / 16-bit image or an array PIL understands)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.ascontiguousarray(image))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# panoptic
# ---------------------------------------------------------------------------------------------------------------


def id_to_rgb(segmentation: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 with id = R + 256 G + 256^2 B (panopticapi ``id2rgb``)."""
    ids = segmentation.astype(np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError("panoptic ids must lie in 0 .. 256^3 - 1")
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int64 ids (panopticapi ``rgb2id``)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_segments_info(result: PanopticResult, labels: DatasetLabels) -> list[dict[str, Any]]:
    """COCO panoptic ``segments_info`` entries: id, category_id (dataset id), isthing, score, area, bbox (XYWH)."""
    segmentation = _to_numpy(result.segmentation).astype(np.int64)
    boxes = ndimage.find_objects(segmentation)  # boxes[i] = slices of id i + 1, None when absent
    info = []
    for seg in result.segments:
        box = boxes[seg.id - 1] if seg.id - 1 < len(boxes) else None
        bbox = [0, 0, 0, 0] if box is None else [
            box[1].start, box[0].start, box[1].stop - box[1].start, box[0].stop - box[0].start
        ]
        info.append(
            {
                "id": int(seg.id),
                "category_id": int(labels.dataset_ids[seg.label]),
                "category_name": labels.names[seg.label],
                "isthing": bool(seg.is_thing),
                "score": float(seg.score),
                "area": int(seg.area),
                "bbox": [int(v) for v in bbox],
            }
        )
    return info


def write_panoptic(
    png_path: str | os.PathLike,
    json_path: str | os.PathLike,
    result: PanopticResult,
    labels: DatasetLabels,
    image_id: ImageId,
) -> dict[str, Any]:
    """Write the id PNG and the JSON ``{"image_id", "file_name" (the PNG's name), "segments_info"}``; returns it."""
    annotation = {
        "image_id": image_id,
        "file_name": Path(png_path).name,
        "segments_info": panoptic_segments_info(result, labels),
    }
    write_png(png_path, id_to_rgb(_to_numpy(result.segmentation)))
    write_json_atomic(json_path, annotation)
    return annotation


# ---------------------------------------------------------------------------------------------------------------
# instance
# ---------------------------------------------------------------------------------------------------------------


def instance_annotations(result: InstanceResult, labels: DatasetLabels, image_id: ImageId) -> list[dict[str, Any]]:
    """COCO results entries ``{"image_id", "category_id", "category_name", "segmentation": RLE (``counts`` a str,
    as pycocotools' ``loadRes`` reads it), "score", "bbox": XYWH, "area"}``."""
    from pycocotools import mask as mask_util

    masks = _to_numpy(result.masks).astype(np.uint8)
    if len(masks) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    boxes = _to_numpy(result.boxes).astype(np.float64)
    scores = _to_numpy(result.scores).astype(np.float64)
    classes = _to_numpy(result.labels)
    out = []
    for rle, box, score, label in zip(rles, boxes, scores, classes):
        x1, y1, x2, y2 = (float(v) for v in box)
        out.append(
            {
                "image_id": image_id,
                "category_id": int(labels.dataset_ids[int(label)]),
                "category_name": labels.names[int(label)],
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "score": float(score),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": int(mask_util.area(rle)),
            }
        )
    return out


def write_instances(path: str | os.PathLike, result: InstanceResult, labels: DatasetLabels,
                    image_id: ImageId) -> list[dict[str, Any]]:
    annotations = instance_annotations(result, labels, image_id)
    write_json_atomic(path, annotations)
    return annotations


# ---------------------------------------------------------------------------------------------------------------
# semantic
# ---------------------------------------------------------------------------------------------------------------


def semantic_id_map(result: SemanticResult, labels: DatasetLabels) -> np.ndarray:
    """(H, W) dataset category ids: uint8, or uint16 when an id exceeds 255."""
    lookup = np.asarray(labels.dataset_ids, dtype=np.int64)
    if lookup.min() < 0 or lookup.max() >= 2**16:
        raise ValueError("semantic PNGs hold dataset ids 0 .. 65535")
    dtype = np.uint8 if lookup.max() <= 255 else np.uint16
    return lookup[_to_numpy(result.labels).astype(np.int64)].astype(dtype)


def write_semantic(path: str | os.PathLike, result: SemanticResult, labels: DatasetLabels) -> Path:
    return write_png(path, Image.fromarray(semantic_id_map(result, labels)))  # uint8 -> "L", uint16 -> "I;16"


# ---------------------------------------------------------------------------------------------------------------
# the combined predictions file
# ---------------------------------------------------------------------------------------------------------------


def coco_categories(labels: DatasetLabels) -> list[dict[str, Any]]:
    """COCO ``categories``: ``{"id" (dataset id), "name", "isthing", "color"}`` per class."""
    things = set(labels.thing_classes)
    return [{"id": int(labels.dataset_ids[i]), "name": name, "isthing": int(i in things),
             "color": [int(c) for c in labels.colors[i]]} for i, name in enumerate(labels.names)]


def numbered_annotations(annotations: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Instance results as COCO dataset annotations: ``id`` 1, 2, ... and ``iscrowd`` 0 added (what
    ``pycocotools.coco.COCO`` indexes and ``COCOeval`` reads)."""
    return [{"id": k, **ann, "iscrowd": 0} for k, ann in enumerate(annotations, start=1)]


# ---------------------------------------------------------------------------------------------------------------
# owned files
# ---------------------------------------------------------------------------------------------------------------


def stale_owned_files(index_path: Path, keep: Iterable[str]) -> list[Path]:
    """Files an earlier run listed in its index (``"files"``: names inside the index's folder) that are not in
    ``keep``. An index that is missing, unreadable or not ours owns nothing, so nothing of the user's is touched."""
    try:
        listed = json.loads(index_path.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    keep = set(keep)
    folder = index_path.parent
    return [folder / name for name in listed if isinstance(name, str) and name not in keep
            and name == Path(name).name and name not in ("", ".", "..") and (folder / name).is_file()]


def check_only_owned(folder: Path, patterns: Iterable[str], command: str) -> None:
    """Refuse to replace ``folder`` as a whole if it holds a file no pattern (fnmatch, on the path relative to
    ``folder``, ``/``-separated) claims for ``command``. An absent folder passes."""
    if not folder.is_dir():
        return
    patterns = list(patterns)
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        relative = path.relative_to(folder).as_posix()
        if not any(fnmatch.fnmatchcase(relative, pattern) for pattern in patterns):
            raise OutputError(f"{folder} holds {relative}, which {command} did not write; it replaces only its own "
                              "outputs: move that file away or choose another --out")
