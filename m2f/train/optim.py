"""The official optimisation recipe (Mask2Former ``train_net.py`` + detectron2's ``WarmupPolyLR``).

* AdamW; every parameter its own group: ``lr``, ``weight_decay``; parameters of modules whose name contains
  "backbone" get ``lr × backbone_multiplier``; no weight decay for parameters of normalisation layers
  (BatchNorm / GroupNorm / LayerNorm / ...), of ``nn.Embedding`` modules, and Swin's
  ``relative_position_bias_table`` / ``absolute_pos_embed``.
* Learning rate ``base · (1 − it / max_iter) ^ power`` (power 0.9), with an optional linear warm-up.
* Gradients of the full model clipped to a total L2 norm of ``clip_norm`` (0.01) before every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_multiplier: float = 0.1
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_factor: float = 1.0  # official: 1.0 (the 10 warm-up iterations then change nothing)
    clip_norm: float = 0.01  # full-model gradient clipping; 0 disables


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group per parameter with its lr / weight decay; each group also records its ``name``."""
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr, decay = cfg.lr, cfg.weight_decay
            if "backbone" in module_name:
                lr = lr * cfg.backbone_multiplier
            if param_name in NO_DECAY_NAMES or isinstance(module, NORM_TYPES) or isinstance(module, nn.Embedding):
                decay = 0.0
            name = f"{module_name}.{param_name}" if module_name else param_name
            groups.append({"params": [param], "lr": lr, "weight_decay": decay, "name": name})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)


class PolyLambda:
    """lr multiplier at iteration ``it`` (picklable, so the scheduler's state dict round-trips)."""

    def __init__(self, max_iters: int, power: float = 0.9, warmup_iters: int = 0, warmup_factor: float = 1.0):
        self.max_iters, self.power = max_iters, power
        self.warmup_iters, self.warmup_factor = warmup_iters, warmup_factor

    def __call__(self, it: int) -> float:
        warmup = 1.0
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            warmup = self.warmup_factor * (1 - alpha) + alpha
        return warmup * (1.0 - min(it, self.max_iters) / self.max_iters) ** self.power


def build_scheduler(optimizer: torch.optim.Optimizer, max_iters: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, PolyLambda(max_iters, cfg.poly_power, cfg.warmup_iters, cfg.warmup_factor)
    )


def clip_full_model(parameters, max_norm: float) -> torch.Tensor:
    """Clip all gradients together to total L2 norm ``max_norm``; returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm <= 0:
        norms = [p.grad.detach().float().norm() for p in params]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
