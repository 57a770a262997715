"""A TensorRT engine as an m2f.evaluation Predictor, for `m2f serve --engine`: a thin adapter over
:class:`m2f.export.runner.TensorRTRunner` (NumPy in and out) so the serving path stays runner-agnostic."""
from __future__ import annotations

from pathlib import Path

import torch

from m2f.errors import InputError
from m2f.evaluation.evaluate import Predictor


class EnginePredictor(Predictor):
    """pixel_values (B, 3, Hp, Wp) -> (pred_logits, pred_masks) as float32 CPU tensors, like the other predictors."""

    max_batch: int | None = None  # the optimisation profile's largest batch

    def __init__(self, path: str | Path, config_path: str | None = None):
        from m2f.config import Mask2FormerConfig
        from m2f.export.runner import TensorRTRunner

        path = Path(path)
        if not path.is_file():
            raise InputError(f"engine {path} not found; build one with `m2f export tensorrt`")
        self.runner = TensorRTRunner(path)  # TensorRT or cuda-python missing: one line naming the install
        if not {"pred_logits", "pred_masks"} <= set(self.runner.output_names):
            raise InputError(f"{path} has outputs {', '.join(self.runner.output_names)}, not pred_logits and "
                             "pred_masks; build the engine from an export with --postprocess none")
        if config_path is not None:
            from m2f.cli.train import load_config

            self.config = load_config(config_path)
        elif self.runner.manifest.get("config"):
            self.config = Mask2FormerConfig.from_dict(self.runner.manifest["config"])
        else:
            raise InputError(f"no config for {path}: its manifest {path}.json has none; pass --config "
                             "m2f_config.json (the model's config)")
        profile = self.runner.manifest.get("profile") or {}
        if profile:
            low, high = profile["min"], profile["max"]
            self.max_batch = int(high[0])  # larger batches run in chunks (m2f.serve.app.run_network)
            if low[2:] == high[2:]:
                self.fixed_size = (int(high[2]), int(high[3]))
        self.name = str(path)

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.runner.infer(pixel_values.cpu().numpy())
        return (torch.from_numpy(outputs["pred_logits"]).float(), torch.from_numpy(outputs["pred_masks"]).float())
