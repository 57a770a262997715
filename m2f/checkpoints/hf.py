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

from m2f.config import ConfigFieldError, Mask2FormerConfig, PixelDecoderConfig, TransformerDecoderConfig, is_int
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


# Our field path -> HF's name, to report a translated field under the name the user sees in config.json. A name
# with arithmetic says how our value is derived from HF's (the error then shows our value).
_HF_NAMES = {
    "pixel_decoder.conv_dim": "feature_size",
    "pixel_decoder.mask_dim": "mask_feature_size",
    "pixel_decoder.num_encoder_layers": "encoder_layers",
    "pixel_decoder.num_heads": "num_attention_heads",
    "pixel_decoder.ffn_dim": "encoder_feedforward_dim",
    "pixel_decoder.common_stride": "common_stride",
    "pixel_decoder.dropout": "dropout",
    "transformer_decoder.hidden_dim": "hidden_dim",
    "transformer_decoder.num_queries": "num_queries",
    "transformer_decoder.num_heads": "num_attention_heads",
    "transformer_decoder.ffn_dim": "dim_feedforward",
    "transformer_decoder.num_layers": "decoder_layers - 1",
    "transformer_decoder.pre_norm": "pre_norm",
    "transformer_decoder.enforce_input_proj": "enforce_input_projection",
    "transformer_decoder.dropout": "dropout",
    "num_classes": "num_labels",
}
# the same for preprocessor_config.json; HF's mean / std are for pixels rescaled to [0, 1], ours for 0..255
_HF_PREPROCESSOR_NAMES = {"pixel_mean": "255 * image_mean", "pixel_std": "255 * image_std", "size_divisibility": "size_divisor"}


def config_from_hf(hf: dict[str, Any], name: str = "", preprocessor: dict[str, Any] | None = None) -> Mask2FormerConfig:
    """Translate a HF ``Mask2FormerConfig`` (as the dict of its config.json) into ours.

    Values are passed through untouched for our config to validate; an invalid one raises
    :class:`~m2f.config.ConfigFieldError` under HF's field name.
    """
    from m2f.backbones.convert import backbone_config_from_hf

    where = f"{name or 'the checkpoint'}"
    if hf.get("model_type") != "mask2former":
        raise CheckpointError(
            f"{where} is a {hf.get('model_type')!r} model, not Mask2Former (model_type 'mask2former'); "
            "pass a Mask2FormerForUniversalSegmentation checkpoint"
        )
    backbone_cfg = hf.get("backbone_config")
    if not isinstance(backbone_cfg, dict):
        if hf.get("backbone") or hf.get("use_timm_backbone"):
            raise CheckpointError(
                f"{where} uses a named/timm backbone ({hf.get('backbone')!r}) instead of backbone_config; "
                "only Swin and ResNet backbone_config checkpoints are supported"
            )
        # HF's default backbone when config.json has none
        backbone_cfg = {"model_type": "swin", "depths": [2, 2, 18, 2], "drop_path_rate": 0.3,
                        "out_features": ["stage1", "stage2", "stage3", "stage4"]}

    def get(key: str, default: Any) -> Any:
        value = hf.get(key, default)
        return default if value is None else value

    if get("activation_function", "relu") != "relu":
        raise CheckpointError(f"{where} uses activation {hf['activation_function']!r}; only relu is supported")
    labels = _hf_class_names(hf.get("id2label"), where)
    decoder_layers = get("decoder_layers", 10)
    extra: dict[str, Any] = {}
    for ours, key in (("pixel_mean", "image_mean"), ("pixel_std", "image_std")):
        value = (preprocessor or {}).get(key)
        if value is not None:
            scalable = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            extra[ours] = tuple(v * 255.0 for v in value) if scalable else value
    if (preprocessor or {}).get("size_divisor") is not None:
        extra["size_divisibility"] = preprocessor["size_divisor"]
    try:
        return Mask2FormerConfig(
            backbone=backbone_config_from_hf(backbone_cfg),
            pixel_decoder=PixelDecoderConfig(
                conv_dim=get("feature_size", 256),
                mask_dim=get("mask_feature_size", 256),
                num_encoder_layers=get("encoder_layers", 6),
                num_heads=get("num_attention_heads", 8),
                num_points=4,
                ffn_dim=get("encoder_feedforward_dim", 1024),
                num_feature_levels=3,
                common_stride=get("common_stride", 4),
                dropout=get("dropout", 0.0),
            ),
            transformer_decoder=TransformerDecoderConfig(
                hidden_dim=get("hidden_dim", 256),
                num_queries=get("num_queries", 100),
                num_heads=get("num_attention_heads", 8),
                ffn_dim=get("dim_feedforward", 2048),
                # HF counts the prediction on the learnable queries; a non-integer is reported as it is
                num_layers=decoder_layers - 1 if is_int(decoder_layers) else decoder_layers,
                pre_norm=get("pre_norm", False),
                enforce_input_proj=get("enforce_input_projection", False),
                dropout=get("dropout", 0.0),
            ),
            num_classes=len(labels) if labels else get("num_labels", 0),
            class_names=labels,
            name=name,
            **extra,
        )
    except ConfigFieldError as exc:
        if exc.field in _HF_PREPROCESSOR_NAMES:
            raise exc.renamed(_HF_PREPROCESSOR_NAMES, f"{where} preprocessor_config.json") from None
        raise exc.renamed(_HF_NAMES, f"{where} config.json") from None


def _hf_class_names(id2label: Any, where: str) -> tuple[str, ...]:
    """The class names of HF's ``id2label`` ({"0": "person", ...}: keys are indices, as strings in JSON)."""
    if id2label is None or id2label == {}:
        return ()
    source = f"{where} config.json"
    if not isinstance(id2label, dict):
        raise ConfigFieldError("id2label", id2label, 'an object {"0": "name of class 0", ...}', source)
    labels: dict[int, str] = {}
    for key, label in id2label.items():
        index = key if is_int(key) else int(key) if isinstance(key, str) and key.isdigit() else None
        if index is None or not isinstance(label, str):
            raise ConfigFieldError(f"id2label[{key!r}]", label, "a class name (string) under an integer key", source)
        labels[index] = label
    if sorted(labels) != list(range(len(labels))):
        raise ConfigFieldError(
            "id2label", sorted(labels), f"keyed by the class indices 0..{len(labels) - 1}, each once", source
        )
    return tuple(labels[i] for i in range(len(labels)))


def read_json(path: Path) -> dict[str, Any]:
    from m2f.io import read_json as read_strict_json

    data = read_strict_json(path, error=CheckpointError, fix="is the directory complete?")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; is it really a model config?")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face hub ids
# ---------------------------------------------------------------------------------------------------------------

HUB_SCHEME = "hf://"
# owner/name[@revision], the hub's own spelling of a model id (revision: a branch, tag or commit)
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
# What m2f reads of a model repository: its JSON configs and safetensors weights; torch .bin weights only when a
# repository has no safetensors (fetched in a second step, so that a repository holding both downloads one copy).
HUB_PATTERNS = ["*.json", "*.safetensors"]
HUB_FALLBACK_PATTERNS = ["pytorch_model*.bin"]
_LOCAL_HINT = "or pass a local directory (an HF Mask2Former folder, or `m2f convert` output) as --checkpoint"


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``spec`` reads as a hub id (``owner/name``, ``owner/name@rev``, ``hf://...``);
    None when it can only be a local path. ``hf://`` forces the hub reading and must then be a valid id."""
    text = spec[len(HUB_SCHEME):] if spec.startswith(HUB_SCHEME) else spec
    match = _HUB_ID.fullmatch(text)
    if match is None:
        if spec.startswith(HUB_SCHEME):
            raise CheckpointError(
                f"{spec!r} is not a Hugging Face model id; write hf://OWNER/NAME or hf://OWNER/NAME@REVISION, "
                "e.g. hf://facebook/mask2former-swin-tiny-coco-panoptic"
            )
        return None
    return match.group("repo"), match.group("revision")


def download_hub_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision``, downloaded into the Hugging Face cache (``HF_HOME``)
    unless cached; ``HF_HUB_OFFLINE=1`` reads the cache only. Hub failures become one-line CheckpointErrors."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise CheckpointError(
            f"{repo_id} reads as a Hugging Face hub id, which needs the huggingface_hub package: "
            f"pip install huggingface_hub, {_LOCAL_HINT}"
        ) from None
    where = repo_id + (f"@{revision}" if revision else "")
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
        if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
            folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                            allow_patterns=HUB_FALLBACK_PATTERNS))
    except errors.GatedRepoError:
        raise CheckpointError(
            f"{where} is a gated model on the Hugging Face hub: accept its terms on https://huggingface.co/{repo_id} "
            f"and log in (`hf auth login` or HF_TOKEN), {_LOCAL_HINT}"
        ) from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(
            f"{repo_id} has no revision {revision!r} on the Hugging Face hub; pass a branch, tag or commit it has "
            f"(OWNER/NAME@REVISION), or leave @REVISION out for main"
        ) from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"{where} is neither a local path nor a model on the Hugging Face hub (or it is private: log in with "
            f"`hf auth login` or HF_TOKEN); check the spelling, {_LOCAL_HINT}"
        ) from None
    except errors.LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1, or no network) and not in the cache
        from huggingface_hub import constants

        raise CheckpointError(
            f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached "
            f"({'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'no network'}); download it once with "
            f"network access, {_LOCAL_HINT}"
        ) from None
    except errors.HFValidationError:
        raise CheckpointError(
            f"{where!r} is not a valid Hugging Face model id (OWNER/NAME[@REVISION]); {_LOCAL_HINT.removeprefix('or ')}"
        ) from None
    except errors.HfHubHTTPError as exc:
        from m2f.checkpoints import _first_line

        raise CheckpointError(
            f"the Hugging Face hub refused {where} ({_first_line(exc)}); try again later, {_LOCAL_HINT}"
        ) from None
    return folder
