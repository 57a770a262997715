"""Segmentation datasets on disk: COCO panoptic, COCO instance and folders of semantic PNG label maps.

Every dataset yields :class:`Sample` (an RGB image plus one binary mask per segment with its contiguous class),
the form the training targets and the evaluators need. :func:`open_dataset` detects the format from a folder:

* COCO panoptic: a ``*.json`` with ``annotations[*].segments_info`` (``panoptic.json`` as ``m2f data synth``
  writes it, or COCO's ``annotations/panoptic_val2017.json``), the PNG folder named like the JSON
  (``panoptic/``, ``panoptic_val2017/``) and the image folder ``images/`` (or ``val2017/`` for
  ``panoptic_val2017.json``).
* COCO instance: a ``*.json`` with ``annotations[*].segmentation`` (polygons or RLE; decoded by pycocotools) and
  the image folder ``images/`` (or ``val2017/`` for ``instances_val2017.json``).
* Semantic PNGs: ``images/`` and ``labels/`` (or ``annotations/``) with the same file stems; each label pixel is
  a contiguous class id, 255 = ignore. An optional ``categories.json`` lists the class names (``["sky", ...]`` or
  ``[{"id", "name", "isthing"}, ...]``).

Contiguous class ids follow the dataset's category ids in ascending order (as detectron2 does for COCO).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from m2f.errors import InputError
from m2f.io import read_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
IGNORE_LABEL = 255
FORMATS = ("panoptic", "instance", "semantic")


@dataclass(frozen=True)
class Category:
    dataset_id: int  # the id used in the dataset's files
    name: str
    isthing: bool


@dataclass
class Sample:
    """One image with its segments. masks: (N, H, W) bool; labels: (N,) contiguous class ids; iscrowd: (N,) bool."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (N, H, W) bool
    labels: np.ndarray  # (N,) int64
    iscrowd: np.ndarray  # (N,) bool
    image_id: Any = None
    file_name: str = ""
    segment_ids: list[int] = field(default_factory=list)  # panoptic segment ids (panoptic datasets only)


class SegmentationDataset:
    """Base class: ``len(ds)``, ``ds[i] -> Sample``, ``ds.categories`` (contiguous order), ``ds.format``."""

    format: str = ""
    categories: list[Category]
    root: Path

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def label_set(self) -> dict[str, tuple]:
        """Config fields describing this label set: class_names, thing_classes, dataset_ids."""
        return {
            "class_names": tuple(c.name for c in self.categories),
            "thing_classes": tuple(i for i, c in enumerate(self.categories) if c.isthing),
            "dataset_ids": tuple(c.dataset_id for c in self.categories),
        }

    def image_path(self, index: int) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    return read_json(path, fix="expected a COCO-format JSON: fix or regenerate it")


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"image {path} listed in the dataset does not exist; check the dataset folder")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"image {path} cannot be decoded ({exc}); the file is corrupt") from None


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise InputError(f"{path} is not a valid dataset annotation file: {what}; fix the JSON or regenerate the "
                         "dataset (`m2f data --help` describes the format)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true/false are not ids


def _is_id(value: Any) -> bool:
    return _is_int(value) or isinstance(value, str)


def _is_flag(value: Any) -> bool:
    return isinstance(value, bool) or (_is_int(value) and value in (0, 1))


def _check_field(item: dict, key: str, test, expected: str, path: Path, where: str, required: bool = True) -> None:
    """``item[key]`` passes ``test``; ``where`` says which item ("image 'a.png'", "category #3")."""
    if key not in item:
        _require(not required, path, f"{where} lacks '{key}'")
    elif not test(item[key]):
        _require(False, path, f"{where} has {key} {item[key]!r} ({type(item[key]).__name__}), expected {expected}")


def _categories_from_json(raw: Any, path: Path) -> list[Category]:
    _require(isinstance(raw, list) and len(raw) > 0, path, "'categories' must be a non-empty list")
    cats = []
    for number, c in enumerate(raw):
        where = f"category #{number}"
        _require(isinstance(c, dict), path, f"{where} is a {type(c).__name__}, not an object")
        _check_field(c, "id", _is_int, "an integer", path, where)
        _check_field(c, "name", lambda v: isinstance(v, str), "a string", path, where, required=False)
        _check_field(c, "isthing", _is_flag, "0 or 1", path, where, required=False)
        cats.append(Category(c["id"], c.get("name", f"class_{c['id']}"), bool(c.get("isthing", 1))))
    ids = [c.dataset_id for c in cats]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    _require(not duplicates, path, f"category ids {duplicates} appear more than once")
    return sorted(cats, key=lambda c: c.dataset_id)


def _index_images(raw: list, path: Path, fields: tuple[tuple[str, Any, str], ...] = ()) -> dict[Any, dict]:
    """'images' by id: every image an object with a unique int or str 'id', a 'file_name' and ``fields``."""
    images: dict[Any, dict] = {}
    for number, img in enumerate(raw):
        _require(isinstance(img, dict), path, f"image #{number} is a {type(img).__name__}, not an object")
        where = f"image #{number}"
        _check_field(img, "id", _is_id, "an integer or string", path, where)
        _check_field(img, "file_name", lambda v: isinstance(v, str) and v != "", "a file name", path, where)
        for key, test, expected in fields:
            _check_field(img, key, test, expected, path, f"image {img['file_name']!r}")
        _require(img["id"] not in images, path, f"image id {img['id']!r} appears more than once")
        images[img["id"]] = img
    return images


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, with _load_rgb's errors."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"image {path} listed in the dataset does not exist; check the dataset folder")
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"image {path} cannot be decoded ({exc}); the file is corrupt") from None


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


# ---------------------------------------------------------------------------------------------------
# COCO panoptic
# ---------------------------------------------------------------------------------------------------


class CocoPanopticDataset(SegmentationDataset):
    format = "panoptic"

    def __init__(self, json_path: str | Path, image_dir: str | Path, panoptic_dir: str | Path):
        self.json_path, self.image_dir, self.panoptic_dir = Path(json_path), Path(image_dir), Path(panoptic_dir)
        self.root = self.json_path.parent
        for folder, what in ((self.image_dir, "image"), (self.panoptic_dir, "panoptic PNG")):
            if not folder.is_dir():
                raise InputError(f"{what} folder {folder} does not exist; see `m2f data --help` for the layout")
        data = _read_json(self.json_path)
        _require(isinstance(data, dict), self.json_path, "expected a JSON object")
        for key in ("images", "annotations", "categories"):
            _require(isinstance(data.get(key), list), self.json_path, f"missing list '{key}'")
        self.categories = _categories_from_json(data["categories"], self.json_path)
        self.contiguous = {c.dataset_id: i for i, c in enumerate(self.categories)}
        images = _index_images(data["images"], self.json_path)
        self.records = []
        annotated: set = set()
        for number, ann in enumerate(data["annotations"]):
            path, where = self.json_path, f"annotation #{number}"
            _require(isinstance(ann, dict), path, f"{where} is a {type(ann).__name__}, not an object")
            _check_field(ann, "image_id", lambda v: _is_id(v) and v in images, "the id of an image in 'images'",
                         path, where)
            where = f"the annotation of image {images[ann['image_id']]['file_name']!r}"
            _require(ann["image_id"] not in annotated, path, f"{where} appears more than once")
            annotated.add(ann["image_id"])
            _check_field(ann, "file_name", lambda v: isinstance(v, str) and v != "", "a PNG file name", path, where)
            _check_field(ann, "segments_info", lambda v: isinstance(v, list), "a list", path, where)
            seen: set[int] = set()
            for seg in ann["segments_info"]:
                _require(isinstance(seg, dict), path, f"{where} has a segment that is not an object: {seg!r}")
                _check_field(seg, "id", lambda v: _is_int(v) and v > 0, "a positive integer (0 is void)", path, where)
                seg_where = f"{where}, segment {seg['id']},"
                _require(seg["id"] not in seen, path, f"{where} lists segment id {seg['id']} more than once")
                seen.add(seg["id"])
                _check_field(seg, "category_id", _is_int, "an integer category id", path, seg_where)
                _require(seg["category_id"] in self.contiguous, path, f"{seg_where} has category_id "
                         f"{seg['category_id']}, which 'categories' does not list")
                _check_field(seg, "iscrowd", _is_flag, "0 or 1", path, seg_where, required=False)
                _check_field(seg, "area", lambda v: _is_int(v) and v >= 0, "a pixel count", path, seg_where,
                             required=False)
            self.records.append((images[ann["image_id"]], ann))
        self.records.sort(key=lambda r: str(r[0]["file_name"]))
        self.raw_categories = data["categories"]

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.records[index][0]["file_name"]

    def panoptic(self, index: int) -> tuple[np.ndarray, list[dict]]:
        """The (H, W) segment-id map and the segments_info of image ``index`` (ground truth for PQ), checked
        against each other as panopticapi does: same size as the image, the same segment ids in both."""
        from PIL import Image

        image_info, ann = self.records[index]
        path = self.panoptic_dir / ann["file_name"]
        if not path.is_file():
            raise InputError(f"panoptic PNG {path} listed in {self.json_path.name} does not exist; add it or "
                             "remove its annotation")
        try:
            with Image.open(path) as img:
                ids = rgb_to_id(np.asarray(img.convert("RGB")))
        except OSError as exc:
            raise InputError(f"panoptic PNG {path} cannot be decoded ({exc}); the file is corrupt") from None
        size = _image_size(self.image_path(index))
        if ids.shape != size:
            raise InputError(f"panoptic PNG {path} is {ids.shape[0]}x{ids.shape[1]} but image "
                             f"{image_info['file_name']!r} is {size[0]}x{size[1]}; the PNG must be of the image's size")
        listed = {seg["id"] for seg in ann["segments_info"]}
        in_png = set(np.unique(ids).tolist()) - {0}
        if listed - in_png:
            raise InputError(f"{self.json_path.name}: segments_info ids {sorted(listed - in_png)} of image "
                             f"{image_info['file_name']!r} appear in no pixel of {path}; remove them from "
                             "segments_info or regenerate the PNG")
        if in_png - listed:
            raise InputError(f"{path} has segment ids {sorted(in_png - listed)[:10]} that segments_info of image "
                             f"{image_info['file_name']!r} in {self.json_path.name} does not list; add them or "
                             "regenerate the PNG")
        return ids, ann["segments_info"]

    def __getitem__(self, index: int) -> Sample:
        image_info, _ = self.records[index]
        image = _load_rgb(self.image_path(index))
        ids, segments = self.panoptic(index)
        masks, labels, crowd, seg_ids = [], [], [], []
        for seg in segments:
            mask = ids == seg["id"]
            masks.append(mask)
            labels.append(self.contiguous[seg["category_id"]])
            crowd.append(bool(seg.get("iscrowd", 0)))
            seg_ids.append(int(seg["id"]))
        return _sample(image, masks, labels, crowd, image_info["id"], image_info["file_name"], seg_ids)


# ---------------------------------------------------------------------------------------------------
# COCO instance
# ---------------------------------------------------------------------------------------------------


class CocoInstanceDataset(SegmentationDataset):
    format = "instance"

    def __init__(self, json_path: str | Path, image_dir: str | Path):
        self.json_path, self.image_dir = Path(json_path), Path(image_dir)
        self.root = self.json_path.parent
        if not self.image_dir.is_dir():
            raise InputError(f"image folder {self.image_dir} does not exist; see `m2f data --help` for the layout")
        data = _read_json(self.json_path)
        _require(isinstance(data, dict), self.json_path, "expected a JSON object")
        for key in ("images", "annotations", "categories"):
            _require(isinstance(data.get(key), list), self.json_path, f"missing list '{key}'")
        self.categories = _categories_from_json(data["categories"], self.json_path)
        self.contiguous = {c.dataset_id: i for i, c in enumerate(self.categories)}
        positive = (lambda v: _is_int(v) and v > 0, "a positive integer")
        images = _index_images(data["images"], self.json_path, (("height", *positive), ("width", *positive)))
        self.images = sorted(images.values(), key=lambda i: i["file_name"])
        self.anns: dict[Any, list[dict]] = {img["id"]: [] for img in self.images}
        for number, ann in enumerate(data["annotations"]):
            path, where = self.json_path, f"annotation #{number}"
            _require(isinstance(ann, dict), path, f"{where} is a {type(ann).__name__}, not an object")
            _check_field(ann, "image_id", lambda v: _is_id(v) and v in images, "the id of an image in 'images'",
                         path, where)
            _check_field(ann, "category_id", _is_int, "an integer category id", path, where)
            _require(ann["category_id"] in self.contiguous, path,
                     f"{where} has category_id {ann['category_id']}, which 'categories' does not list")
            _check_field(ann, "segmentation", lambda v: isinstance(v, (list, dict)), "polygons or an RLE", path,
                         where)
            _check_field(ann, "iscrowd", _is_flag, "0 or 1", path, where, required=False)
            self.anns[ann["image_id"]].append(ann)
        self.coco_json = data

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images[index]["file_name"]

    def __getitem__(self, index: int) -> Sample:
        from pycocotools import mask as mask_utils

        info = self.images[index]
        image = _load_rgb(self.image_path(index))
        h, w = int(info["height"]), int(info["width"])
        if image.shape[:2] != (h, w):
            raise InputError(f"image {info['file_name']} is {image.shape[:2]} but the JSON says {(h, w)}")
        masks, labels, crowd = [], [], []
        for ann in self.anns[info["id"]]:
            seg = ann["segmentation"]
            try:
                if isinstance(seg, list):  # polygons
                    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
                elif isinstance(seg.get("counts"), list):  # uncompressed RLE
                    rle = mask_utils.frPyObjects(seg, h, w)
                else:
                    rle = seg
                mask = mask_utils.decode(rle).astype(bool)
            except Exception as exc:  # pycocotools raises assorted types on malformed input
                raise InputError(f"{self.json_path}: bad segmentation in annotation {ann.get('id')} ({exc})") from None
            if mask.ndim == 3:
                mask = mask.any(axis=2)
            if not mask.any():
                continue
            masks.append(mask)
            labels.append(self.contiguous[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
        return _sample(image, masks, labels, crowd, info["id"], info["file_name"])


# ---------------------------------------------------------------------------------------------------
# Semantic PNG folders
# ---------------------------------------------------------------------------------------------------


class SemanticPngDataset(SegmentationDataset):
    format = "semantic"

    def __init__(self, image_dir: str | Path, label_dir: str | Path, categories: Sequence[Category] | None = None,
                 num_classes: int | None = None):
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.root = self.image_dir.parent
        labels = {p.stem: p for p in sorted(self.label_dir.glob("*.png"))}
        if not labels:
            raise InputError(f"no label PNGs in {self.label_dir}; expected one <stem>.png per image")
        self.pairs = []
        for p in sorted(self.image_dir.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in labels:
                self.pairs.append((p, labels[p.stem]))
        if not self.pairs:
            raise InputError(f"no image in {self.image_dir} has a label PNG of the same name in {self.label_dir}")
        if categories is None:
            if num_classes is None:
                num_classes = self._scan_num_classes()
            categories = [Category(i, f"class_{i}", False) for i in range(num_classes)]
        self.categories = list(categories)

    def _scan_num_classes(self) -> int:
        top = -1
        for _, label_path in self.pairs:
            labels = self._labels(label_path)
            valid = labels[labels != IGNORE_LABEL]
            if valid.size:
                top = max(top, int(valid.max()))
        if top < 0:
            raise InputError(f"every label PNG in {self.label_dir} is empty (all pixels 255 = ignore)")
        return top + 1

    @staticmethod
    def _labels(path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as img:
                if img.mode not in ("L", "P", "I", "I;16"):
                    raise InputError(f"label PNG {path} has mode {img.mode}; expected one channel of class ids")
                return np.asarray(img, dtype=np.int64)
        except OSError as exc:
            raise InputError(f"label PNG {path} cannot be decoded ({exc})") from None

    def __len__(self) -> int:
        return len(self.pairs)

    def image_path(self, index: int) -> Path:
        return self.pairs[index][0]

    def semantic(self, index: int) -> np.ndarray:
        """(H, W) int64 class ids, 255 = ignore (ground truth for mIoU)."""
        labels = self._labels(self.pairs[index][1])
        bad = (labels != IGNORE_LABEL) & (labels >= self.num_classes)
        if bad.any():
            raise InputError(f"label PNG {self.pairs[index][1]} has class {int(labels[bad].max())} but the dataset has "
                             f"{self.num_classes} classes; fix categories.json or the labels")
        return labels

    def __getitem__(self, index: int) -> Sample:
        image_path, _ = self.pairs[index]
        image = _load_rgb(image_path)
        labels = self.semantic(index)
        if labels.shape != image.shape[:2]:
            raise InputError(f"label PNG of {image_path.name} is {labels.shape}, image is {image.shape[:2]}")
        classes = [int(c) for c in np.unique(labels) if c != IGNORE_LABEL]
        masks = [labels == c for c in classes]
        return _sample(image, masks, classes, [False] * len(classes), index, image_path.name)


def _sample(image, masks, labels, crowd, image_id, file_name, segment_ids=None) -> Sample:
    h, w = image.shape[:2]
    return Sample(
        image=image,
        masks=np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool),
        labels=np.asarray(labels, dtype=np.int64),
        iscrowd=np.asarray(crowd, dtype=bool),
        image_id=image_id,
        file_name=file_name,
        segment_ids=list(segment_ids or []),
    )


# ---------------------------------------------------------------------------------------------------
# Format detection
# ---------------------------------------------------------------------------------------------------


def _json_kind(data: Any) -> str | None:
    """'panoptic' / 'instance' from a loaded JSON's annotations, None if it is neither."""
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) or "categories" not in data:
        return None
    first = data["annotations"][0] if data["annotations"] else {}
    if isinstance(first, dict) and "segments_info" in first:
        return "panoptic"
    if isinstance(first, dict) and "segmentation" in first:
        return "instance"
    return "panoptic" if "panoptic" in str(data.get("info", "")).lower() else None


def _image_dir_for(root: Path, json_path: Path, prefix: str) -> Path:
    """images/ if present, else the split folder named after the JSON (panoptic_val2017.json -> val2017/)."""
    candidates = [root / "images"]
    stem = json_path.stem
    if stem.startswith(prefix):
        split = stem[len(prefix):]
        candidates += [root / split, json_path.parent / split, json_path.parent.parent / split]
    for c in candidates:
        if c.is_dir():
            return c
    raise InputError(f"no image folder for {json_path.name}: expected one of " + ", ".join(str(c) for c in candidates))


def open_dataset(root: str | Path, format: str | None = None, num_classes: int | None = None) -> SegmentationDataset:
    """Open the dataset in folder ``root``; ``format`` forces panoptic / instance / semantic (else detected)."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"data directory {root} does not exist; create one with `m2f data synth --out {root}`")
    if not root.is_dir():
        raise InputError(f"--data {root} is a file; pass the dataset folder")
    if format is not None and format not in FORMATS:
        raise InputError(f"unknown dataset format {format!r}; choose one of {', '.join(FORMATS)}")

    json_files = sorted(root.glob("*.json")) + sorted((root / "annotations").glob("*.json"))
    json_files = [p for p in json_files if p.name != "categories.json"]
    unrecognised = []
    if format in (None, "panoptic", "instance"):
        for path in json_files:
            kind = _json_kind(_read_json(path))  # invalid JSON is an error, not a skip
            if kind is None:
                unrecognised.append(path)
                continue
            if format is not None and kind != format:
                continue
            if kind == "panoptic":
                png_dir = next((d for d in (path.with_suffix(""), root / path.stem, root / "panoptic") if d.is_dir()),
                               path.with_suffix(""))
                return CocoPanopticDataset(path, _image_dir_for(root, path, "panoptic_"), png_dir)
            return CocoInstanceDataset(path, _image_dir_for(root, path, "instances_"))
        if format is not None:
            raise InputError(f"no COCO {format} JSON found in {root} or {root / 'annotations'}")

    label_dir = next((d for d in (root / "labels", root / "annotations") if d.is_dir() and any(d.glob("*.png"))), None)
    image_dir = root / "images"
    if label_dir is None or not image_dir.is_dir():
        if unrecognised:
            raise InputError(f"{unrecognised[0]} is not a COCO panoptic or instance annotation file (it needs "
                             "'categories' and 'annotations' with 'segments_info' or 'segmentation')")
        raise InputError(
            f"cannot tell the dataset format of {root}: expected a COCO panoptic / instance JSON, or images/ and "
            "labels/ folders of semantic PNGs (make one with `m2f data synth`)"
        )
    categories = None
    cat_file = root / "categories.json"
    if cat_file.is_file():
        raw = _read_json(cat_file)
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            categories = [Category(i, name, False) for i, name in enumerate(raw)]
        else:
            categories = _categories_from_json(raw, cat_file)
            if [c.dataset_id for c in categories] != list(range(len(categories))):
                raise InputError(f"{cat_file}: semantic label ids must be 0..K-1 in order")
    return SemanticPngDataset(image_dir, label_dir, categories=categories, num_classes=num_classes)
