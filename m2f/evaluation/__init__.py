"""Evaluation: panoptic quality (panopticapi rules), semantic mIoU (detectron2 rules), mask AP (pycocotools)."""
from .coco_ap import MaskAP
from .miou import SemanticIoU
from .pq import PanopticQuality

__all__ = ["MaskAP", "PanopticQuality", "SemanticIoU"]
