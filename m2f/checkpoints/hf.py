"""Hugging Face ``Mask2FormerForUniversalSegmentation`` checkpoints: config translation and tensor renaming.

A HF directory holds ``config.json`` (``model_type: "mask2former"``) and ``model.safetensors`` (or
``pytorch_model.bin``, possibly sharded). HF's module tree differs from the official one: its decoder layer's
``self_attn`` has separate q/k/v projections (packed here into ``in_proj_weight``), its ``cross_attn`` is the
masked cross-attention (an ``nn.MultiheadAttention``, same layout as ours), and FFN / norm names differ.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from m2f.config import Mask2FormerConfig, PixelDecoderConfig, TransformerDecoderConfig
from m2f.errors import CheckpointError

PIXEL_DECODER_PREFIX = "model.pixel_level_module.decoder."
TRANSFORMER_PREFIX = "model.transformer_module."
BACKBONE_PREFIX = "model.pixel_level_module.encoder."
# Tensors of the training loss only (the no-object class weight): read and dropped.
IGNORED_KEYS = ("criterion.empty_weight",)

# (pattern on the key after PIXEL_DECODER_PREFIX, replacement) -> our key under ``pixel_decoder.``
_PIXEL_DECODER_RULES = [
    (r"level_embed", r"transformer.level_embed"),
    (r"input_projections\.(\d+)\.([01])\.(weight|bias)", r"input_proj.\1.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(weight|bias)", r"transformer.encoder.layers.\1.self_attn.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"transformer.encoder.layers.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"transformer.encoder.layers.\1.linear1.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"transformer.encoder.layers.\1.linear2.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"transformer.encoder.layers.\1.norm2.\2"),
    (r"mask_projection\.(weight|bias)", r"mask_features.\1"),
    (r"(adapter|layer)_(\d+)\.0\.weight", r"\1_\2.weight"),
    (r"(adapter|layer)_(\d+)\.1\.(weight|bias)", r"\1_\2.norm.\3"),
]

# (pattern on the key after TRANSFORMER_PREFIX, replacement) -> our key under ``transformer_decoder.``
_TRANSFORMER_RULES = [
    (r"queries_embedder\.weight", r"query_embed.weight"),
    (r"queries_features\.weight", r"query_feat.weight"),
    (r"level_embed\.weight", r"level_embed.weight"),
    (r"input_projections\.(\d+)\.(weight|bias)", r"input_proj.\1.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"transformer_self_attention_layers.\1.self_attn.out_proj.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"transformer_self_attention_layers.\1.norm.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.(in_proj_weight|in_proj_bias)", r"transformer_cross_attention_layers.\1.multihead_attn.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.out_proj\.(weight|bias)", r"transformer_cross_attention_layers.\1.multihead_attn.out_proj.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(weight|bias)", r"transformer_cross_attention_layers.\1.norm.\2"),
    (r"decoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"transformer_ffn_layers.\1.linear1.\2"),
    (r"decoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"transformer_ffn_layers.\1.linear2.\2"),
    (r"decoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"transformer_ffn_layers.\1.norm.\2"),
    (r"decoder\.layernorm\.(weight|bias)", r"decoder_norm.\1"),
    (r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(weight|bias)", r"mask_embed.layers.\1.\2"),
]
_SELF_ATTN_QKV = re.compile(r"decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def pop_hf_pixel_decoder_state(hf_state: dict[str, torch.Tensor], prefix: str = PIXEL_DECODER_PREFIX) -> dict[str, torch.Tensor]:
    """Pops HF pixel-decoder tensors from ``hf_state``; returns them under our names (relative to the pixel decoder)."""
    out = {}
    for key in [k for k in hf_state if k.startswith(prefix)]:
        ours = _rename(key[len(prefix) :], _PIXEL_DECODER_RULES)
        if ours is not None:
            out[ours] = hf_state.pop(key)
    return out


def pop_hf_transformer_decoder_state(
    hf_state: dict[str, torch.Tensor], prefix: str = TRANSFORMER_PREFIX, class_prefix: str = "class_predictor."
) -> dict[str, torch.Tensor]:
    """Pops HF transformer-module tensors (and the class head) from ``hf_state``; returns ours (relative names)."""
    out = {}
    qkv: dict[tuple[str, str], dict[str, str]] = {}  # (layer, weight|bias) -> {q|k|v: hf key}
    for key in [k for k in hf_state if k.startswith(prefix)]:
        rel = key[len(prefix) :]
        m = _SELF_ATTN_QKV.fullmatch(rel)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = key
            continue
        ours = _rename(rel, _TRANSFORMER_RULES)
        if ours is not None:
            out[ours] = hf_state.pop(key)
    for (layer, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:  # an incomplete triple stays behind and is reported as unexpected
            packed = torch.cat([hf_state.pop(parts[c]) for c in "qkv"], 0)
            name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
            out[f"transformer_self_attention_layers.{layer}.self_attn.{name}"] = packed
    for suffix in ("weight", "bias"):
        key = class_prefix + suffix
        if key in hf_state:
            out[f"class_embed.{suffix}"] = hf_state.pop(key)
    return out


def convert_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: Mask2FormerConfig) -> dict[str, torch.Tensor]:
    """Our full state dict from a HF one. Keys we do not know are kept under their HF names, so that loading
    reports them as unexpected instead of silently dropping them."""
    from m2f.backbones.convert import pop_hf_backbone_state

    hf_state = dict(hf_state)
    for key in IGNORED_KEYS:
        hf_state.pop(key, None)
    ours: dict[str, torch.Tensor] = {}
    for k, v in pop_hf_backbone_state(hf_state, cfg.backbone, prefix=BACKBONE_PREFIX).items():
        ours[k if k.startswith("backbone.") else "backbone." + k] = v
    ours.update({"pixel_decoder." + k: v for k, v in pop_hf_pixel_decoder_state(hf_state).items()})
    ours.update({"transformer_decoder." + k: v for k, v in pop_hf_transformer_decoder_state(hf_state).items()})
    ours.update(hf_state)  # leftovers: unexpected
    return ours


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], name: str = "", preprocessor: dict[str, Any] | None = None) -> Mask2FormerConfig:
    """Translate a HF ``Mask2FormerConfig`` (as the dict of its config.json) into ours."""
    from m2f.backbones.convert import backbone_config_from_hf

    if hf.get("model_type") != "mask2former":
        raise CheckpointError(
            f"{name or 'config'} is a {hf.get('model_type')!r} model, not Mask2Former (model_type 'mask2former'); "
            "pass a Mask2FormerForUniversalSegmentation checkpoint"
        )
    backbone_cfg = hf.get("backbone_config")
    if not isinstance(backbone_cfg, dict):
        if hf.get("backbone") or hf.get("use_timm_backbone"):
            raise CheckpointError(
                f"{name or 'config'} uses a named/timm backbone ({hf.get('backbone')!r}) instead of backbone_config; "
                "only Swin and ResNet backbone_config checkpoints are supported"
            )
        # HF's default backbone when config.json has none
        backbone_cfg = {"model_type": "swin", "depths": [2, 2, 18, 2], "drop_path_rate": 0.3,
                        "out_features": ["stage1", "stage2", "stage3", "stage4"]}
    try:
        backbone = backbone_config_from_hf(backbone_cfg)
    except CheckpointError:
        raise
    except Exception as exc:  # the backbones helper raises M2FError subclasses for unsupported ones
        raise CheckpointError(f"cannot translate the backbone config of {name or 'the checkpoint'}: {exc}") from None

    def get(key: str, default: Any) -> Any:
        value = hf.get(key, default)
        return default if value is None else value

    hf_heads = int(get("num_attention_heads", 8))
    pixel = PixelDecoderConfig(
        conv_dim=int(get("feature_size", 256)),
        mask_dim=int(get("mask_feature_size", 256)),
        num_encoder_layers=int(get("encoder_layers", 6)),
        num_heads=hf_heads,
        num_points=4,
        ffn_dim=int(get("encoder_feedforward_dim", 1024)),
        num_feature_levels=3,
        common_stride=int(get("common_stride", 4)),
        dropout=float(get("dropout", 0.0)),
    )
    decoder = TransformerDecoderConfig(
        hidden_dim=int(get("hidden_dim", 256)),
        num_queries=int(get("num_queries", 100)),
        num_heads=hf_heads,
        ffn_dim=int(get("dim_feedforward", 2048)),
        num_layers=int(get("decoder_layers", 10)) - 1,  # HF counts the prediction on the learnable queries
        pre_norm=bool(get("pre_norm", False)),
        enforce_input_proj=bool(get("enforce_input_projection", False)),
        dropout=float(get("dropout", 0.0)),
    )
    if get("activation_function", "relu") != "relu":
        raise CheckpointError(f"{name or 'config'} uses activation {hf['activation_function']!r}; only relu is supported")
    id2label = hf.get("id2label") or {}
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise CheckpointError(f"{name or 'config'} has a malformed id2label; expected {{index: name}}") from None
    num_classes = len(labels) if labels else int(get("num_labels", 0))
    if num_classes < 1 or (labels and sorted(labels) != list(range(num_classes))):
        raise CheckpointError(f"{name or 'config'}: id2label must number the classes 0..N-1 (got {sorted(labels)[:5]}...)")
    extra: dict[str, Any] = {}
    if preprocessor:
        mean, std = preprocessor.get("image_mean"), preprocessor.get("image_std")
        if isinstance(mean, list) and isinstance(std, list) and len(mean) == 3 and len(std) == 3:
            # HF stores them for pixels rescaled to [0, 1]; ours are for 0..255
            extra["pixel_mean"] = tuple(float(m) * 255.0 for m in mean)
            extra["pixel_std"] = tuple(float(s) * 255.0 for s in std)
        if isinstance(preprocessor.get("size_divisor"), int) and preprocessor["size_divisor"] > 0:
            extra["size_divisibility"] = preprocessor["size_divisor"]
    return Mask2FormerConfig(
        backbone=backbone,
        pixel_decoder=pixel,
        transformer_decoder=decoder,
        num_classes=num_classes,
        class_names=tuple(labels[i] for i in range(num_classes)) if labels else (),
        name=name,
        **extra,
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON file ({type(exc).__name__}); is the directory complete?") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; is it really a model config?")
    return data
