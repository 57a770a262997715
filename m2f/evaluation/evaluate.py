"""Run a model (PyTorch checkpoint, or an exported model through its runner) over a dataset and score it.

Every predictor shares the pre-processing (:func:`m2f.preprocess.preprocess`) and the official post-processing
(:func:`m2f.postprocess.postprocess_task`); only the network call differs. Scores are taken against the dataset's ground truth, or
against a second predictor's results treated as ground truth (e.g. ONNX vs PyTorch):

* panoptic: PQ / SQ / RQ (all, things, stuff) with panopticapi's rules;
* semantic: mIoU / fwIoU / mACC / pACC with detectron2's rules;
* instance: mask AP with pycocotools (a reference predictor's instances with score >= 0.5 become ground truth).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from m2f.config import Mask2FormerConfig
from m2f.data.datasets import IGNORE_LABEL, SegmentationDataset
from m2f.errors import InputError
from m2f.runtime import progress_bar

from .coco_ap import MaskAP
from .miou import SemanticIoU
from .pq import PanopticQuality

REFERENCE_MIN_SCORE = 0.5  # instances of a reference predictor kept as ground truth


class Predictor:
    """pixel_values (B, 3, Hp, Wp) float32 -> (pred_logits (B, Q, K+1), pred_masks (B, Q, Hp/4, Wp/4))."""

    config: Mask2FormerConfig
    name: str = ""
    fixed_size: tuple[int, int] | None = None  # the graph's input size, if it only takes one
    fixed_batch: int | None = None  # the graph's batch size, if it only takes one

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class TorchPredictor(Predictor):
    def __init__(self, model: torch.nn.Module, config: Mask2FormerConfig, name: str = "", device: str = "cpu"):
        self.model, self.config, self.name = model.eval(), config, name
        self.device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, pixel_values):
        out = self.model(pixel_values.to(self.device))
        return out.pred_logits.float().cpu(), out.pred_masks.float().cpu()


class RunnerPredictor(Predictor):
    """An exported model run by its :class:`m2f.export.runner.Runner` (ONNX Runtime, OpenVINO, TensorRT): it must
    take ``pixel_values`` and return ``pred_logits`` and ``pred_masks``."""

    def __init__(self, runner: Any, config: Mask2FormerConfig):
        from m2f.export.runner import RAW_OUTPUTS

        if not set(RAW_OUTPUTS) <= set(runner.output_names):
            raise InputError(f"{runner.name} has outputs {', '.join(runner.output_names)}, not pred_logits and "
                             "pred_masks; export it with --postprocess none")
        self.runner, self.config, self.name = runner, config, runner.name
        self.fixed_size, self.fixed_batch = runner.fixed_size, runner.fixed_batch

    def __call__(self, pixel_values):
        out = self.runner.run(pixel_values.numpy())
        return torch.from_numpy(out["pred_logits"]).float(), torch.from_numpy(out["pred_masks"]).float()


@dataclass
class Prediction:
    """What one image's results look like in the metric's terms (numpy, original size)."""

    panoptic: tuple[np.ndarray, list[dict]] | None = None  # ids map, segments (dataset category ids)
    semantic: np.ndarray | None = None  # (H, W) contiguous class ids
    instances: list[tuple[np.ndarray, int, float]] | None = None  # (mask, dataset category id, score)


def predict(predictor: Predictor, image: np.ndarray, task: str, resize_shortest: int | None = None,
            max_size: int | None = None) -> Prediction:
    from m2f import postprocess as post
    from m2f.preprocess import preprocess

    cfg = predictor.config
    batch = preprocess([image], cfg, resize_shortest=resize_shortest, max_size=max_size)
    pixel_values = batch.pixel_values
    if predictor.fixed_size is not None:
        from m2f.export.runner import pad_to

        pixel_values = pad_to(pixel_values, predictor.fixed_size)
    logits, masks = predictor(pixel_values)
    result = post.postprocess_task(task, logits, masks, batch.image_sizes, batch.original_sizes,
                                   tuple(pixel_values.shape[-2:]), cfg)[0]
    dataset_id = cfg.dataset_id
    if task == "panoptic":
        segments = [{"id": s.id, "category_id": dataset_id(s.label), "iscrowd": 0} for s in result.segments]
        return Prediction(panoptic=(result.segmentation.cpu().numpy().astype(np.int64), segments))
    if task == "semantic":
        return Prediction(semantic=result.labels.cpu().numpy())
    return Prediction(instances=[(m.cpu().numpy(), dataset_id(int(c)), float(s))
                                 for m, c, s in zip(result.masks, result.labels, result.scores)])


# ---------------------------------------------------------------------------------------------------
# Ground truth from the dataset
# ---------------------------------------------------------------------------------------------------


def _gt_panoptic(ds: SegmentationDataset, index: int) -> tuple[np.ndarray, list[dict]]:
    if ds.format != "panoptic":
        raise InputError(f"panoptic evaluation needs a COCO panoptic dataset; {ds.root} is {ds.format} "
                         f"(use --task {'instance' if ds.format == 'instance' else 'semantic'})")
    return ds.panoptic(index)  # type: ignore[attr-defined]


def _gt_semantic(ds: SegmentationDataset, index: int) -> np.ndarray:
    if ds.format == "semantic":
        return ds.semantic(index)  # type: ignore[attr-defined]
    sample = ds[index]
    labels = np.full(sample.image.shape[:2], IGNORE_LABEL, dtype=np.int64)
    for mask, label in zip(sample.masks, sample.labels):
        labels[mask] = label
    return labels


def _gt_instances(ds: SegmentationDataset, index: int) -> list[tuple[np.ndarray, int, bool]]:
    if ds.format == "semantic":
        raise InputError(f"instance evaluation needs instance annotations; {ds.root} holds semantic labels")
    sample = ds[index]
    out = []
    for mask, label, crowd in zip(sample.masks, sample.labels, sample.iscrowd):
        category = ds.categories[int(label)]
        if category.isthing:
            out.append((mask, category.dataset_id, bool(crowd)))
    return out


# ---------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------


def check_label_sets(config: Mask2FormerConfig, ds: SegmentationDataset, what: str) -> None:
    ids = tuple(c.dataset_id for c in ds.categories)
    model_ids = tuple(config.dataset_id(i) for i in range(config.num_classes))
    if len(ids) != config.num_classes or (ds.format != "semantic" and ids != model_ids):
        raise InputError(f"{what} predicts {config.num_classes} classes (ids {list(model_ids)[:8]}...) but the dataset "
                         f"has {len(ids)} (ids {list(ids)[:8]}...); evaluate on data with the model's label set")


def evaluate(ds: SegmentationDataset, predictor: Predictor, task: str, reference: Predictor | None = None,
             limit: int | None = None, resize_shortest: int | None = None, max_size: int | None = None,
             progress: bool = False, on_image: Callable[[int], Any] | None = None) -> dict:
    """Score ``predictor`` on ``ds`` (or against ``reference``); returns the metrics dict (percentages)."""
    if task not in ("panoptic", "semantic", "instance"):
        raise InputError(f"unknown task {task!r}; choose panoptic, semantic or instance")
    cfg = predictor.config
    if reference is None:
        check_label_sets(cfg, ds, "the model")
    elif reference.config.num_classes != cfg.num_classes:
        raise InputError("the model and the reference predict different label sets")
    count = len(ds) if limit is None else min(limit, len(ds))
    if count < 1:
        raise InputError("nothing to evaluate: the dataset is empty or --limit is 0")
    names = {cfg.dataset_id(i): cfg.class_name(i) for i in range(cfg.num_classes)}
    if task == "panoptic":
        metric: Any = PanopticQuality({cfg.dataset_id(i): cfg.is_thing(i) for i in range(cfg.num_classes)}, names)
    elif task == "semantic":
        metric = SemanticIoU(cfg.num_classes, IGNORE_LABEL, [cfg.class_name(i) for i in range(cfg.num_classes)])
    else:
        things = [i for i in range(cfg.num_classes) if cfg.is_thing(i)] or list(range(cfg.num_classes))
        metric = MaskAP([(cfg.dataset_id(i), cfg.class_name(i)) for i in things])

    from m2f.preprocess import load_image

    # a `with` (not track()): an error closes the bar before the error line is printed
    with progress_bar(count, f"eval {task}", quiet=not progress) as bar:
        for index in range(count):
            image = load_image(ds.image_path(index))
            pred = predict(predictor, image, task, resize_shortest, max_size)
            ref = predict(reference, image, task, resize_shortest, max_size) if reference is not None else None
            if task == "panoptic":
                if ref is not None:
                    gt_ids, gt_segments = ref.panoptic
                else:
                    gt_ids, gt_segments = _gt_panoptic(ds, index)
                metric.update(gt_ids, gt_segments, *pred.panoptic)
            elif task == "semantic":
                gt = ref.semantic if ref is not None else _gt_semantic(ds, index)
                metric.update(pred.semantic, gt)
            else:
                h, w = image.shape[:2]
                metric.add_image(index, h, w)
                if ref is not None:
                    gt = [(m, c, False) for m, c, s in ref.instances if s >= REFERENCE_MIN_SCORE]
                else:
                    gt = _gt_instances(ds, index)
                for mask, category, crowd in gt:
                    metric.add_ground_truth(index, mask, category, crowd)
                for mask, category, score in pred.instances:
                    metric.add_detection(index, mask, category, score)
            if on_image is not None:
                on_image(index)
            bar.update(1)
    result = {"task": task, "num_images": count}
    result.update(metric.summary())
    result["num_images"] = count
    return result


def format_table(result: dict) -> str:
    """A short human-readable summary of :func:`evaluate`'s result."""
    task = result["task"]
    if task == "panoptic":
        lines = [f"{'':8s} {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>4s}"]
        for label, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            lines.append(f"{label:8s} {result['PQ' + suffix]:6.2f} {result['SQ' + suffix]:6.2f} "
                         f"{result['RQ' + suffix]:6.2f} {result['N' + suffix]:4d}")
        for name, row in result["per_class"].items():
            lines.append(f"  {name:14s} PQ {row['PQ']:6.2f}  SQ {row['SQ']:6.2f}  RQ {row['RQ']:6.2f}  "
                         f"TP {row['TP']} FP {row['FP']} FN {row['FN']}")
        return "\n".join(lines)
    if task == "semantic":
        head = f"mIoU {result['mIoU']:.2f}  fwIoU {result['fwIoU']:.2f}  mACC {result['mACC']:.2f}  pACC {result['pACC']:.2f}"
        return "\n".join([head] + [f"  {n:14s} IoU {r['IoU']:6.2f}" for n, r in result["per_class"].items()])
    head = "  ".join(f"{k} {result[k]:.2f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    return "\n".join([head] + [f"  {n:14s} AP {v:6.2f}" for n, v in result["per_class"].items()])
