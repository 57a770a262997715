"""Backbone configs and weights from Hugging Face and official detectron2 Mask2Former checkpoints.

Hugging Face layouts understood (both appear in the wild):

* the layout of the Hub checkpoints (transformers 4.x names, as its Mask2Former conversion script writes them):
  ``embeddings.patch_embeddings.projection``, ``encoder.layers.i.blocks.j.attention.self.{query,key,value,
  relative_position_bias_table,relative_position_index}``, ``attention.output.dense``, ``intermediate.dense``,
  ``output.dense``, ``layernorm_{before,after}``, ``hidden_states_norms.stageK``;
* the in-memory layout of transformers >= 5: everything under ``swin.``, ``attention.{q,k,v,o}_proj``,
  ``attention.relative_position_bias.relative_position_bias_table``, ``mlp.fc{1,2}``, no stored index, plus
  ``swin.layernorm`` (the final norm of HF's ``SwinModel``, which its backbone never applies: consumed, dropped).

ResNet: ``embedder.embedder.{convolution,normalization}``, ``encoder.stages.i.layers.j.{shortcut,layer.k}``.
BatchNorm's ``num_batches_tracked`` is dropped when our norm is frozen (it has no such counter).

detectron2 checkpoints already use our names (``backbone.`` + our state_dict keys).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import Tensor

from m2f.config import ConfigFieldError, ResNetConfig, SwinConfig
from m2f.errors import CheckpointError, M2FError

from .swin import relative_position_index

HF_STAGES = ["stage1", "stage2", "stage3", "stage4"]

# Defaults of transformers' ResNetConfig / SwinConfig: a config.json omits fields left at their default.
_HF_RESNET_DEFAULTS: dict[str, Any] = {
    "num_channels": 3,
    "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
    "depths": [3, 4, 6, 3],
    "layer_type": "bottleneck",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False,
}
_HF_SWIN_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 4,
    "num_channels": 3,
    "embed_dim": 96,
    "depths": [2, 2, 6, 2],
    "num_heads": [3, 6, 12, 24],
    "window_size": 7,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.1,
    "hidden_act": "gelu",
    "use_absolute_embeddings": False,
    "layer_norm_eps": 1e-5,
}


# ---------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------


def backbone_config_from_hf(backbone_config: dict) -> ResNetConfig | SwinConfig:
    """Translate the ``backbone_config`` of an HF Mask2Former ``config.json`` (model_type "resnet" or "swin").

    Raises :class:`CheckpointError` naming the option for anything m2f cannot reproduce faithfully, and
    :class:`~m2f.config.ConfigFieldError` (under HF's ``backbone_config.*`` name) for a value that is invalid.
    """
    if not isinstance(backbone_config, dict):
        raise CheckpointError(f"backbone_config must be a JSON object, got {type(backbone_config).__name__}")
    from . import BACKBONES  # the registry imports this module

    model_type = backbone_config.get("model_type")
    if model_type in BACKBONES:
        return BACKBONES[model_type].config_from_hf(backbone_config)
    raise CheckpointError(
        f"backbone_config.model_type {model_type!r} is not supported: m2f builds {', '.join(map(repr, BACKBONES))} "
        "backbones (convert a checkpoint that uses one of those)"
    )


def _option(bc: dict, defaults: dict, name: str) -> Any:
    return bc[name] if bc.get(name) is not None else defaults[name]


def _reject(model_type: str, name: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"unsupported {model_type} backbone option {name}={value!r}: {why}")


def _check_out_features(bc: dict, model_type: str) -> None:
    features = bc.get("out_features", bc.get("_out_features"))
    indices = bc.get("out_indices", bc.get("_out_indices"))
    if features is None and indices is None:
        raise _reject(model_type, "out_features", None, f"Mask2Former needs all four stages, set it to {HF_STAGES}")
    if features is not None and features != HF_STAGES:
        raise _reject(model_type, "out_features", features, f"Mask2Former needs exactly {HF_STAGES}")
    if indices is not None and indices != [1, 2, 3, 4]:
        raise _reject(model_type, "out_indices", indices, "Mask2Former needs exactly [1, 2, 3, 4]")


# Our backbone field -> HF's backbone_config name, to report a translated field under the name in config.json
_HF_RESNET_NAMES = {
    "backbone.depths": "backbone_config.depths",
    "backbone.stem_channels": "backbone_config.embedding_size",
    "backbone.hidden_sizes": "backbone_config.hidden_sizes",
    "backbone.block": "backbone_config.layer_type",
    "backbone.stride_in_1x1": "backbone_config.downsample_in_bottleneck",
}
_HF_SWIN_NAMES = {
    "backbone.embed_dim": "backbone_config.embed_dim",
    "backbone.depths": "backbone_config.depths",
    "backbone.num_heads": "backbone_config.num_heads",
    "backbone.window_size": "backbone_config.window_size",
    "backbone.mlp_ratio": "backbone_config.mlp_ratio",
    "backbone.qkv_bias": "backbone_config.qkv_bias",
    "backbone.patch_size": "backbone_config.patch_size",
    "backbone.pretrain_img_size": "backbone_config.image_size",
    "backbone.drop_path_rate": "backbone_config.drop_path_rate",
}


def _check_stages_channels_activation(bc: dict, defaults: dict, model_type: str, activation: str, origin: str) -> None:
    """What every HF backbone must have for m2f: the four stages out, RGB input, the one activation we build."""
    _check_out_features(bc, model_type)
    if _option(bc, defaults, "num_channels") != 3:
        raise _reject(model_type, "num_channels", bc["num_channels"], "m2f takes RGB images (3 channels)")
    act = _option(bc, defaults, "hidden_act")
    if act != activation:
        raise _reject(model_type, "hidden_act", act, f"only {activation!r} is implemented ({origin})")


def resnet_config_from_hf(bc: dict) -> ResNetConfig:
    d = _HF_RESNET_DEFAULTS
    _check_stages_channels_activation(bc, d, "resnet", "relu", "as in detectron2's ResNet")
    if _option(bc, d, "downsample_in_first_stage"):
        raise _reject(
            "resnet", "downsample_in_first_stage", True,
            "it puts res2..res5 at strides 8..64, Mask2Former needs 4..32",
        )
    layer_type = _option(bc, d, "layer_type")
    if layer_type not in ("bottleneck", "basic"):
        raise _reject("resnet", "layer_type", layer_type, "use 'bottleneck' or 'basic'")
    try:  # the values go through as they are: ResNetConfig validates them
        return ResNetConfig(
            depths=_option(bc, d, "depths"),
            stem_channels=_option(bc, d, "embedding_size"),
            hidden_sizes=_option(bc, d, "hidden_sizes"),
            block=layer_type,
            bottleneck_reduction=4,  # HF's ResNetBottleNeckLayer reduction, fixed
            stride_in_1x1=_option(bc, d, "downsample_in_bottleneck"),
            norm="frozen_bn",  # HF runs BatchNorm2d in eval mode for inference: identical
            norm_eps=1e-5,  # nn.BatchNorm2d's default, which HF uses
        )
    except ConfigFieldError as exc:
        raise exc.renamed(_HF_RESNET_NAMES, "") from None


def resnet_config_to_hf(bb: ResNetConfig, out_features: list[str]) -> Any:
    """The ``transformers.ResNetConfig`` of the same network (benchmarks share weights with HF through it)."""
    import transformers

    return transformers.ResNetConfig(
        embedding_size=bb.stem_channels, hidden_sizes=list(bb.hidden_sizes), depths=list(bb.depths),
        layer_type=bb.block, hidden_act="relu", downsample_in_first_stage=False,
        downsample_in_bottleneck=bb.stride_in_1x1, out_features=out_features,
    )


def swin_config_to_hf(bb: SwinConfig, out_features: list[str]) -> Any:
    """The ``transformers.SwinConfig`` of the same network (drop path off: it only acts in training)."""
    import transformers

    return transformers.SwinConfig(
        image_size=bb.pretrain_img_size, patch_size=bb.patch_size, embed_dim=bb.embed_dim, depths=list(bb.depths),
        num_heads=list(bb.num_heads), window_size=bb.window_size, mlp_ratio=bb.mlp_ratio, qkv_bias=bb.qkv_bias,
        drop_path_rate=0.0, use_absolute_embeddings=bb.ape, out_features=out_features,
    )


def _square(value: Any, name: str) -> Any:
    """HF's (h, w) pairs as one side; anything else goes through for SwinConfig to validate."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise _reject("swin", name, value, "only square sizes are supported")
        return value[0]
    return value


def swin_config_from_hf(bc: dict) -> SwinConfig:
    d = _HF_SWIN_DEFAULTS
    _check_stages_channels_activation(bc, d, "swin", "gelu", "as the official Swin")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if _option(bc, d, name) != 0:
            raise _reject("swin", name, bc[name], "dropout is not implemented (0 in every official config)")
    if _option(bc, d, "use_absolute_embeddings"):
        raise _reject(
            "swin", "use_absolute_embeddings", True,
            "HF adds a fixed-size table without the official bicubic resize; no official config uses it",
        )
    eps = _option(bc, d, "layer_norm_eps")
    if eps != 1e-5:
        raise _reject(
            "swin", "layer_norm_eps", eps,
            "HF applies it to the block norms only and 1e-5 elsewhere; m2f uses one eps (1e-5 as the official)",
        )
    try:  # the values go through as they are: SwinConfig validates them
        return SwinConfig(
            embed_dim=_option(bc, d, "embed_dim"),
            depths=_option(bc, d, "depths"),
            num_heads=_option(bc, d, "num_heads"),
            window_size=_option(bc, d, "window_size"),
            mlp_ratio=_option(bc, d, "mlp_ratio"),
            qkv_bias=_option(bc, d, "qkv_bias"),
            patch_size=_square(_option(bc, d, "patch_size"), "patch_size"),
            pretrain_img_size=_square(_option(bc, d, "image_size"), "image_size"),  # used by ape only
            drop_path_rate=_option(bc, d, "drop_path_rate"),
            ape=False,
            patch_norm=True,  # HF's SwinEmbeddings always normalises the patches
            layer_norm_eps=1e-5,
        )
    except ConfigFieldError as exc:
        raise exc.renamed(_HF_SWIN_NAMES, "") from None


# ---------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------

# A rename rule's result: ("keep", our_key) | ("qkv", our_key, part) | ("index", our_key) | ("drop", key)
Action = tuple


def _expected_state(cfg: ResNetConfig | SwinConfig) -> dict[str, torch.Size]:
    """Our state_dict key -> shape, from a module built on the meta device (no memory, no init cost)."""
    from . import build_backbone  # the registry imports this module

    try:
        with torch.device("meta"):
            module = build_backbone(cfg)
    except M2FError as exc:
        raise CheckpointError(f"the backbone config cannot be built: {exc}") from None
    return {name: tensor.shape for name, tensor in module.state_dict().items()}


def _pop_backbone(
    state: dict[str, Tensor], cfg: ResNetConfig | SwinConfig, prefix: str, rename: Callable[[str], Action | None],
    source: str,
) -> dict[str, Tensor]:
    expected = _expected_state(cfg)
    out: dict[str, Tensor] = {}
    qkv_parts: dict[str, dict[int, tuple[str, Tensor]]] = {}
    consumed: list[str] = []

    for full_key in [k for k in state if k.startswith(prefix)]:
        action = rename(full_key[len(prefix):])
        if action is None:
            continue  # not ours: stays for the caller to report
        kind, key = action[0], action[1]
        if kind == "drop":
            if key in expected:  # num_batches_tracked when our norm is a real BatchNorm2d
                kind = "keep"
            else:
                if _droppable(key, expected):
                    consumed.append(full_key)
                continue
        if key not in expected:
            continue  # a name our config does not have (e.g. a block beyond its depth): stays, caller reports
        tensor = state[full_key]
        if kind == "keep":
            _check_shape(full_key, tensor.shape, key, expected[key], source)
            out[key] = tensor
        elif kind == "index":
            _check_index(full_key, tensor, key, cfg)
            out[key] = relative_position_index(cfg.window_size)
        elif kind == "qkv":
            qkv_parts.setdefault(key, {})[action[2]] = (full_key, tensor)
            continue  # consumed once all three parts are there
        consumed.append(full_key)

    for key, parts in qkv_parts.items():
        if sorted(parts) != [0, 1, 2]:
            have = ", ".join(name for name, _ in parts.values())
            missing = [("query", "key", "value")[i] for i in range(3) if i not in parts]
            raise CheckpointError(
                f"{source} checkpoint has {have} but no {'/'.join(missing)} part for {key}: the file is incomplete"
            )
        fused = torch.cat([parts[i][1] for i in range(3)], dim=0)
        _check_shape(" + ".join(parts[i][0] for i in range(3)), fused.shape, key, expected[key], source)
        out[key] = fused
        consumed.extend(parts[i][0] for i in range(3))

    # Things the checkpoint may leave out that are fully determined by the config.
    for key in expected:
        if key in out:
            continue
        if key.endswith("attn.relative_position_index"):
            out[key] = relative_position_index(cfg.window_size)
        elif key.endswith("num_batches_tracked") and key[: -len("num_batches_tracked")] + "running_mean" in out:
            out[key] = torch.tensor(0, dtype=torch.long)  # what nn.BatchNorm2d loads for checkpoints without it

    for full_key in consumed:
        del state[full_key]
    return out


def _droppable(key: str, expected: dict[str, torch.Size]) -> bool:
    """A tensor we knowingly discard: a BN counter of a norm we have (frozen), or HF's unused final norm."""
    if key.endswith("num_batches_tracked"):
        return key[: -len("num_batches_tracked")] + "running_mean" in expected
    return True


def _check_shape(src_key: str, shape: torch.Size, key: str, want: torch.Size, source: str) -> None:
    if tuple(shape) != tuple(want):
        raise CheckpointError(
            f"{source} checkpoint tensor {src_key} has shape {tuple(shape)} but the backbone config expects "
            f"{tuple(want)} for {key}: the config does not describe these weights"
        )


def _check_index(src_key: str, tensor: Tensor, key: str, cfg: SwinConfig) -> None:
    ours = relative_position_index(cfg.window_size)
    if tensor.numel() != ours.numel() or not torch.equal(tensor.reshape(-1).to(torch.long).cpu(), ours.reshape(-1)):
        raise CheckpointError(
            f"checkpoint buffer {src_key} differs from the relative position index of a {cfg.window_size}x"
            f"{cfg.window_size} window that {key} uses: window_size in the config does not match the weights"
        )


# -- Hugging Face ------------------------------------------------------------------------------------

_NORM_TENSOR = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def hf_resnet_rename(key: str) -> Action | None:
    if key == "embedder.embedder.convolution.weight":
        return ("keep", "stem.conv1.weight")
    if m := re.fullmatch(r"embedder\.embedder\.normalization\." + _NORM_TENSOR, key):
        return _norm_action(f"stem.conv1.norm.{m[1]}")
    if m := re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", key):
        block = f"res{int(m[1]) + 2}.{m[2]}"
        rest = m[3]
        if rest == "shortcut.convolution.weight":
            return ("keep", f"{block}.shortcut.weight")
        if n := re.fullmatch(r"shortcut\.normalization\." + _NORM_TENSOR, rest):
            return _norm_action(f"{block}.shortcut.norm.{n[1]}")
        if n := re.fullmatch(r"layer\.(\d+)\.convolution\.weight", rest):
            return ("keep", f"{block}.conv{int(n[1]) + 1}.weight")
        if n := re.fullmatch(r"layer\.(\d+)\.normalization\." + _NORM_TENSOR, rest):
            return _norm_action(f"{block}.conv{int(n[1]) + 1}.norm.{n[2]}")
    return None


def _norm_action(key: str) -> Action:
    # A frozen norm has no step counter: HF's / torchvision's num_batches_tracked is dropped unless we have one.
    return ("drop", key) if key.endswith("num_batches_tracked") else ("keep", key)


# Suffix of an HF Swin block key (4.x Hub names | 5.x names) -> our suffix.
_HF_SWIN_BLOCK = [
    (r"layernorm_before\.(weight|bias)", "norm1.{}"),
    (r"layernorm_after\.(weight|bias)", "norm2.{}"),
    (r"attention\.(?:self|relative_position_bias)\.relative_position_bias_table", "attn.relative_position_bias_table"),
    (r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", "attn.proj.{}"),
    (r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", "mlp.fc1.{}"),
    (r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", "mlp.fc2.{}"),
]
_QKV_PART = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}


def hf_swin_rename(key: str) -> Action | None:
    if m := re.fullmatch(r"(?:swin\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)", key):
        return ("keep", f"patch_embed.proj.{m[1]}")
    if m := re.fullmatch(r"(?:swin\.)?embeddings\.norm\.(weight|bias)", key):
        return ("keep", f"patch_embed.norm.{m[1]}")
    if m := re.fullmatch(r"hidden_states_norms\.stage([1-4])\.(weight|bias)", key):
        return ("keep", f"norm{int(m[1]) - 1}.{m[2]}")
    if re.fullmatch(r"swin\.layernorm\.(weight|bias)", key):
        return ("drop", key)  # HF SwinModel's final norm; its backbone never applies it
    downsample = r"(?:swin\.)?encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)"
    if m := re.fullmatch(downsample, key):
        return ("keep", f"layers.{m[1]}.downsample.{m[2]}")
    m = re.fullmatch(r"(?:swin\.)?encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", key)
    if m is None:
        return None
    block, rest = f"layers.{m[1]}.blocks.{m[2]}", m[3]
    if re.fullmatch(r"attention\.(?:self|relative_position_bias)\.relative_position_index", rest):
        return ("index", f"{block}.attn.relative_position_index")
    if n := re.fullmatch(r"attention\.(?:self\.(query|key|value)|(q_proj|k_proj|v_proj))\.(weight|bias)", rest):
        return ("qkv", f"{block}.attn.qkv.{n[3]}", _QKV_PART[n[1] or n[2]])
    for pattern, target in _HF_SWIN_BLOCK:
        if n := re.fullmatch(pattern, rest):
            return ("keep", f"{block}.{target.format(*n.groups())}")
    return None


def pop_hf_backbone_state(
    hf_state: dict[str, Tensor], cfg: ResNetConfig | SwinConfig, prefix: str = "model.pixel_level_module.encoder."
) -> dict[str, Tensor]:
    """Remove the backbone's tensors from an HF Mask2Former state dict and return them under our names.

    Query / key / value projections are fused into ``attn.qkv``; a stored ``relative_position_index`` is checked
    against ours (CheckpointError if it differs) and consumed. Keys under ``prefix`` that are not recognised stay
    in ``hf_state`` for the caller to report. Raises CheckpointError when a tensor's shape does not fit ``cfg``.
    """
    from . import backbone_spec

    return _pop_backbone(hf_state, cfg, prefix, backbone_spec(cfg).hf_rename, "Hugging Face")


# -- detectron2 --------------------------------------------------------------------------------------


def d2_rename(key: str) -> Action | None:
    if key.endswith("attn.relative_position_index"):
        return ("index", key)
    if key.endswith("norm.num_batches_tracked"):
        return ("drop", key)
    return ("keep", key)  # only kept when our module has the name (checked by _pop_backbone)


def pop_detectron2_backbone_state(
    d2_state: dict[str, Tensor], cfg: ResNetConfig | SwinConfig, prefix: str = "backbone."
) -> dict[str, Tensor]:
    """Remove the backbone's tensors from an official (detectron2) Mask2Former state dict, prefix stripped.

    The names already match ours. ``relative_position_index`` buffers are checked against ours and consumed;
    a ``num_batches_tracked`` counter is dropped when our norm is frozen. Unrecognised keys stay in ``d2_state``.
    """
    from . import backbone_spec

    return _pop_backbone(d2_state, cfg, prefix, backbone_spec(cfg).d2_rename, "detectron2")
