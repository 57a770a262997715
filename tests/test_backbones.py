"""Backbones: parity with transformers' ResNetBackbone / SwinBackbone, checkpoint key conversion (HF Hub 4.x
layout, transformers 5 layout, detectron2 names), the official Swin semantics at small sizes, presets."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from m2f.backbones import build_backbone
from m2f.backbones.convert import backbone_config_from_hf, pop_detectron2_backbone_state, pop_hf_backbone_state
from m2f.backbones.swin import DropPath
from m2f.config import BACKBONE_PRESETS, ResNetConfig
from m2f.errors import CheckpointError, ConfigError
from tests.utils import rel_err

transformers = pytest.importorskip("transformers")  # test-only dependency

PREFIX = "model.pixel_level_module.encoder."
STAGES = ["stage1", "stage2", "stage3", "stage4"]
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
TOL = 1e-5




# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def perturb(module: torch.nn.Module, g: torch.Generator) -> None:
    """Fresh random values in every floating parameter and buffer (and BN counters), so nothing stays at init."""
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        if name.endswith("num_batches_tracked"):
            t.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
        elif not t.is_floating_point():
            continue  # relative_position_index: derived from the window size, not learned
        elif name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith("relative_position_bias_table"):
            t.copy_(torch.randn(t.shape, generator=g))
        elif t.ndim >= 2:  # conv / linear weights, scaled by fan-in to keep activations O(1)
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
        elif name.endswith("weight"):  # norm scales
            t.copy_(1.0 + 0.3 * torch.randn(t.shape, generator=g))
        else:  # biases, running means
            t.copy_(0.3 * torch.randn(t.shape, generator=g))


def randint(g: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=g))


def stage_sizes(H: int, W: int) -> list[tuple[int, int]]:
    """(H, W) of res2..res5: ceil(H/4), then ceil(./2) per stage (the official rounding)."""
    sizes = [(-(-H // 4), -(-W // 4))]
    for _ in range(3):
        h, w = sizes[-1]
        sizes.append((-(-h // 2), -(-w // 2)))
    return sizes


def swin_input_size(g: torch.Generator, window: int) -> tuple[int, int]:
    """H in [150, 200], W in [230, 260] such that the input needs patch padding, some stage needs window padding,
    some stage is odd (patch-merging padding), and every stage is larger than the window (where HF's SwinModel
    and the official backbone agree)."""
    while True:
        H, W = randint(g, 150, 200), randint(g, 230, 260)
        sizes = stage_sizes(H, W)
        if (
            (H % 4 or W % 4)
            and any(h % window or w % window for h, w in sizes)
            and any(h % 2 or w % 2 for h, w in sizes[:3])
            and min(sizes[-1]) > window
        ):
            return H, W


def hf_resnet_config(**overrides):
    kw = dict(embedding_size=8, hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 2, 1], out_features=STAGES)
    kw.update(overrides)
    return transformers.ResNetConfig(**kw)


def hf_swin_config(**overrides):
    kw = dict(embed_dim=16, depths=[2, 1, 3, 2], num_heads=[2, 2, 4, 8], window_size=4, drop_path_rate=0.3,
              out_features=STAGES)
    kw.update(overrides)
    return transformers.SwinConfig(**kw)


def prefixed(state: dict, prefix: str = PREFIX) -> dict:
    return {prefix + k: v for k, v in state.items()}


def load_from_hf(hf_model, hf_config) -> tuple[torch.nn.Module, dict]:
    """Our backbone loaded from the HF model's state dict; also returns what pop left of that state dict."""
    cfg = backbone_config_from_hf(hf_config.to_dict())
    state = prefixed(hf_model.state_dict())
    sentinel = torch.ones(3)
    state["model.pixel_level_module.decoder.mask_projection.weight"] = sentinel
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint (assign=True)
        ours = build_backbone(cfg).eval()
    ours.load_state_dict(pop_hf_backbone_state(state, cfg), strict=True, assign=True)
    assert state.pop("model.pixel_level_module.decoder.mask_projection.weight") is sentinel
    return ours, state


def assert_matches(out: dict, ref_maps, x_shape, seed: int, tol: float = TOL) -> list[float]:
    H, W = x_shape[-2:]
    errors = []
    for (name, tensor), ref, (h, w) in zip(out.items(), ref_maps, stage_sizes(H, W)):
        assert tensor.shape == ref.shape == (x_shape[0], tensor.shape[1], h, w), (name, tensor.shape, ref.shape)
        err = rel_err(tensor, ref)
        assert err <= tol, f"{name}: rel_err {err:.3g} > {tol} (seed {seed}, input {tuple(x_shape)})"
        errors.append(err)
    return errors


# ---------------------------------------------------------------------------------------------------
# parity with Hugging Face
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer_type, downsample_in_bottleneck",
    [("bottleneck", False), ("bottleneck", True), ("basic", False)],
    ids=["bottleneck-stride3x3", "bottleneck-stride1x1", "basic"],
)
def test_resnet_matches_hf(rng, layer_type, downsample_in_bottleneck):
    sizes = [16, 24, 32, 48] if layer_type == "bottleneck" else [8, 16, 24, 32]  # basic: res2 has no shortcut
    hf_config = hf_resnet_config(
        hidden_sizes=sizes, layer_type=layer_type, downsample_in_bottleneck=downsample_in_bottleneck
    )
    hf = transformers.ResNetBackbone(hf_config).eval()
    perturb(hf, rng)
    ours, left = load_from_hf(hf, hf_config)
    assert not left, f"backbone keys left unconsumed: {sorted(left)}"
    assert ours.stem.conv1.norm.running_var.std() > 0  # the perturbed statistics arrived
    assert ours.out_channels == dict(zip(STRIDES, sizes)) and ours.out_strides == STRIDES

    x = torch.randn(2, 3, randint(rng, 150, 200), randint(rng, 230, 260), generator=rng)
    with torch.no_grad():
        ref = hf.double()(x.double()).feature_maps  # float64 reference
        out = ours(x)
    assert_matches(out, ref, x.shape, rng.seed_value)


@pytest.mark.parametrize("embed_dim, num_heads, window", [(16, [2, 2, 4, 8], 4), (24, [3, 3, 6, 12], 3)])
def test_swin_matches_hf(rng, embed_dim, num_heads, window):
    hf_config = hf_swin_config(embed_dim=embed_dim, num_heads=num_heads, window_size=window)
    hf = transformers.SwinBackbone(hf_config).eval()
    perturb(hf, rng)
    ours, left = load_from_hf(hf, hf_config)
    assert not left, f"backbone keys left unconsumed: {sorted(left)}"
    assert ours.out_channels == {n: embed_dim * 2**i for i, n in enumerate(STRIDES)}

    H, W = swin_input_size(rng, window)
    x = torch.randn(2, 3, H, W, generator=rng)
    with torch.no_grad():
        ref = hf.double()(x.double()).feature_maps  # float64 reference
        out = ours(x)
    assert_matches(out, ref, x.shape, rng.seed_value)


def test_swin_drop_path_is_identity_in_eval_and_stochastic_in_training(rng):
    hf_config = hf_swin_config(drop_path_rate=0.5)
    cfg = backbone_config_from_hf(hf_config.to_dict())
    assert cfg.drop_path_rate == 0.5
    model = build_backbone(cfg)
    perturb(model, rng)
    x = torch.randn(2, 3, 70, 90, generator=rng)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    model.train()
    torch.manual_seed(rng.seed_value)
    out = model(x)
    assert any(not torch.allclose(out[k], a[k]) for k in a), "drop path did nothing in training mode"
    sum(o.square().mean() for o in out.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    # DropPath itself: per sample either the input scaled by 1/keep or zero; the identity in eval mode.
    drop = DropPath(0.5).train()
    y = torch.randn(64, 5, 3, generator=rng) + 3.0
    kept = drop(y)
    per_sample = [torch.equal(k, 2 * s) or torch.equal(k, torch.zeros_like(s)) for k, s in zip(kept, y)]
    assert all(per_sample)
    assert 0 < sum(torch.equal(k, 2 * s) for k, s in zip(kept, y)) < 64
    assert torch.equal(drop.eval()(y), y)


# ---------------------------------------------------------------------------------------------------
# Hub (transformers 4.x) layout, and what the converters reject
# ---------------------------------------------------------------------------------------------------


def official_relative_position_index(ws: int) -> torch.Tensor:
    """The index as the official code defines it, written out with loops: [i, j] for tokens i, j of a window."""
    coords = [(r, c) for r in range(ws) for c in range(ws)]
    return torch.tensor(
        [[(ri - rj + ws - 1) * (2 * ws - 1) + (ci - cj + ws - 1) for rj, cj in coords] for ri, ci in coords]
    )


def to_hub_layout(state: dict, window: int) -> dict:
    """transformers 5 SwinBackbone state dict -> the layout of the Hub checkpoints (transformers 4.x names,
    separate query / key / value, stored relative_position_index, no `swin.` level, no unused final norm)."""
    renames = [
        (".attention.q_proj.", ".attention.self.query."),
        (".attention.k_proj.", ".attention.self.key."),
        (".attention.v_proj.", ".attention.self.value."),
        (".attention.o_proj.", ".attention.output.dense."),
        (".attention.relative_position_bias.relative_position_bias_table",
         ".attention.self.relative_position_bias_table"),
        (".mlp.fc1.", ".intermediate.dense."),
        (".mlp.fc2.", ".output.dense."),
    ]
    hub = {}
    for key, value in state.items():
        if key.startswith("swin.layernorm."):
            continue
        key = key.removeprefix("swin.")
        for old, new in renames:
            key = key.replace(old, new)
        hub[key] = value
        if key.endswith("attention.self.relative_position_bias_table"):
            hub[key.replace("bias_table", "index")] = official_relative_position_index(window)
    return hub


def test_swin_hub_layout_and_stored_index(rng):
    hf_config = hf_swin_config(window_size=3, embed_dim=24, num_heads=[3, 3, 6, 12])
    hf = transformers.SwinBackbone(hf_config).eval()
    perturb(hf, rng)
    cfg = backbone_config_from_hf(hf_config.to_dict())
    reference, _ = load_from_hf(hf, hf_config)

    hub = prefixed(to_hub_layout(hf.state_dict(), 3))
    assert any(k.endswith("attention.self.relative_position_index") for k in hub)
    unknown = PREFIX + "encoder.layers.0.blocks.0.attention.self.something_new"
    hub[unknown] = torch.zeros(1)
    ours = build_backbone(cfg).eval()
    ours.load_state_dict(pop_hf_backbone_state(hub, cfg), strict=True)
    assert list(hub) == [unknown], "unrecognised keys must stay for the caller to report, all others be consumed"
    ref_state = reference.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in ours.state_dict().items())

    # A stored index that does not fit the configured window is refused.
    bad = prefixed(to_hub_layout(hf.state_dict(), 3))
    key = next(k for k in bad if k.endswith("relative_position_index"))
    bad[key] = bad[key].flip(0)
    with pytest.raises(CheckpointError, match="relative_position_index"):
        pop_hf_backbone_state(bad, cfg)
    # So is an attention projection with a missing part.
    incomplete = prefixed(to_hub_layout(hf.state_dict(), 3))
    del incomplete[PREFIX + "encoder.layers.1.blocks.0.attention.self.value.weight"]
    with pytest.raises(CheckpointError, match="value"):
        pop_hf_backbone_state(incomplete, cfg)
    # And weights of another size than the config says.
    wrong = dataclasses.replace(cfg, embed_dim=48, num_heads=(3, 6, 12, 24))
    with pytest.raises(CheckpointError, match="shape"):
        pop_hf_backbone_state(prefixed(hf.state_dict()), wrong)


def test_relative_position_index_is_the_official_one():
    from m2f.backbones.swin import relative_position_index

    for ws in (1, 3, 7, 12):
        assert torch.equal(relative_position_index(ws), official_relative_position_index(ws))


def _hf_dict(model_type: str, **overrides) -> dict:
    config = hf_resnet_config() if model_type == "resnet" else hf_swin_config()
    return {**config.to_dict(), **overrides}


@pytest.mark.parametrize(
    "model_type, overrides, option",
    [
        ("resnet", {"hidden_act": "gelu"}, "hidden_act"),
        ("resnet", {"downsample_in_first_stage": True}, "downsample_in_first_stage"),
        ("resnet", {"layer_type": "preactivation"}, "layer_type"),
        ("resnet", {"num_channels": 4}, "num_channels"),
        ("resnet", {"out_features": ["stage2", "stage3", "stage4"], "out_indices": [2, 3, 4]}, "out_features"),
        ("resnet", {"out_features": None, "out_indices": None}, "out_features"),
        ("swin", {"hidden_act": "relu"}, "hidden_act"),
        ("swin", {"use_absolute_embeddings": True}, "use_absolute_embeddings"),
        ("swin", {"hidden_dropout_prob": 0.1}, "hidden_dropout_prob"),
        ("swin", {"attention_probs_dropout_prob": 0.1}, "attention_probs_dropout_prob"),
        ("swin", {"layer_norm_eps": 1e-6}, "layer_norm_eps"),
        ("swin", {"patch_size": [4, 2]}, "patch_size"),
        ("swin", {"out_indices": [1, 2, 3], "out_features": None}, "out_indices"),
        ("swinv2", {}, "model_type"),
    ],
)
def test_bad_hf_options_raise(model_type, overrides, option):
    base = "swin" if model_type == "swinv2" else model_type
    config = _hf_dict(base, **overrides)
    config["model_type"] = model_type
    with pytest.raises(CheckpointError) as info:
        backbone_config_from_hf(config)
    message = str(info.value)
    assert option in message and "\n" not in message, message


@pytest.mark.parametrize(
    "model_type, overrides, message",
    [
        ("resnet", {"depths": [1, 1, 1]}, r"backbone_config.depths must be 4 integers in 1\.\.128 .*got \[1, 1, 1\]"),
        ("resnet", {"hidden_sizes": [16, 24, 30, 48]}, r"backbone_config.hidden_sizes must be multiples of .* \(4\)"),
        ("resnet", {"embedding_size": 0}, r"backbone_config.embedding_size must be an integer in 1\.\.8192, got 0"),
        ("resnet", {"depths": [1, 1.5, 1, 1]}, r"backbone_config.depths must be 4 integers"),
        ("resnet", {"downsample_in_bottleneck": "yes"}, r"backbone_config.downsample_in_bottleneck must be true or false"),
        ("swin", {"patch_size": 2}, r"backbone_config.patch_size must be an integer in 4\.\.4 .*got 2"),
        ("swin", {"num_heads": [3, 3, 6, 12]}, r"backbone_config.num_heads must be divisors .*stage 1: 3 does not divide 16"),
        ("swin", {"window_size": 0}, r"backbone_config.window_size must be an integer in 1\.\.128, got 0"),
        ("swin", {"embed_dim": True}, r"backbone_config.embed_dim must be an integer in 1\.\.1024 .*got True"),
        ("swin", {"mlp_ratio": float("inf")}, r"backbone_config.mlp_ratio must be a number in \(0, 16\], got inf"),
        ("swin", {"image_size": 10**9}, r"backbone_config.image_size must be an integer in 4\.\.8192"),
    ],
)
def test_invalid_hf_backbone_values_raise_config_errors_under_hf_names(model_type, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        backbone_config_from_hf(_hf_dict(model_type, **overrides))
    assert "\n" not in str(info.value)


def test_hf_config_defaults_follow_transformers():
    """A config.json leaves defaults out: the translation must use transformers' defaults, not ours."""
    minimal = {"model_type": "swin", "out_features": STAGES}
    cfg = backbone_config_from_hf(minimal)
    full = backbone_config_from_hf(transformers.SwinConfig(out_features=STAGES).to_dict())
    assert cfg == full and cfg.drop_path_rate == 0.1 and cfg.window_size == 7
    minimal = {"model_type": "resnet", "out_indices": [1, 2, 3, 4]}
    assert backbone_config_from_hf(minimal) == backbone_config_from_hf(
        transformers.ResNetConfig(out_features=STAGES).to_dict()
    ) == BACKBONE_PRESETS["r50"]


# ---------------------------------------------------------------------------------------------------
# detectron2 (official Mask2Former) names
# ---------------------------------------------------------------------------------------------------

NORM4 = ["weight", "bias", "running_mean", "running_var"]  # FrozenBatchNorm2d buffers, no num_batches_tracked


def official_resnet_keys(depths, block: str) -> list[str]:
    """detectron2 build_resnet_backbone: BasicStem + BottleneckBlock / BasicBlock, Conv2d(norm=FrozenBN)."""
    convs = ["conv1", "conv2", "conv3"] if block == "bottleneck" else ["conv1", "conv2"]
    keys = ["stem.conv1.weight"] + [f"stem.conv1.norm.{n}" for n in NORM4]
    for stage, depth in zip(["res2", "res3", "res4", "res5"], depths):
        for b in range(depth):
            names = convs + (["shortcut"] if b == 0 else [])  # channels change in the first block of each stage
            for conv in names:
                keys += [f"{stage}.{b}.{conv}.weight"] + [f"{stage}.{b}.{conv}.norm.{n}" for n in NORM4]
    return keys


def official_swin_keys(depths) -> list[str]:
    """mask2former/modeling/backbone/swin.py D2SwinTransformer (patch_norm, no ape)."""
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"]
    block = ["norm1.weight", "norm1.bias", "attn.relative_position_bias_table", "attn.relative_position_index",
             "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
             "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    for i, depth in enumerate(depths):
        keys += [f"layers.{i}.blocks.{j}.{name}" for j in range(depth) for name in block]
        if i < 3:
            keys += [f"layers.{i}.downsample.{n}" for n in ("reduction.weight", "norm.weight", "norm.bias")]
    keys += [f"norm{i}.{n}" for i in range(4) for n in ("weight", "bias")]
    return keys


def d2_checkpoint(backbone_state: dict) -> dict:
    state = prefixed(backbone_state, "backbone.")
    state["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(4, 8)
    state["pixel_mean"] = torch.zeros(3, 1, 1)
    return state


@pytest.mark.parametrize("block", ["bottleneck", "basic"])
def test_detectron2_resnet_names(rng, block):
    sizes = [16, 24, 32, 48] if block == "bottleneck" else [8, 16, 24, 32]
    hf_config = hf_resnet_config(hidden_sizes=sizes, layer_type=block)
    hf = transformers.ResNetBackbone(hf_config).eval()
    perturb(hf, rng)
    via_hf, _ = load_from_hf(hf, hf_config)
    cfg = backbone_config_from_hf(hf_config.to_dict())
    official = official_resnet_keys(cfg.depths, block)
    if block == "basic":  # res2 keeps 8 channels (stem 8 -> 8): detectron2 has no shortcut there either
        official = [k for k in official if not k.startswith("res2.0.shortcut")]
    assert sorted(via_hf.state_dict()) == sorted(official)

    # A detectron2 checkpoint: our names under backbone., plus a BN counter some checkpoints carry.
    d2 = d2_checkpoint(via_hf.state_dict())
    d2["backbone.res3.0.conv1.norm.num_batches_tracked"] = torch.tensor(7)
    ours = build_backbone(cfg).eval()
    ours.load_state_dict(pop_detectron2_backbone_state(d2, cfg), strict=True)
    assert sorted(d2) == ["pixel_mean", "sem_seg_head.predictor.query_feat.weight"]
    x = torch.randn(2, 3, randint(rng, 60, 90), randint(rng, 60, 90), generator=rng)
    with torch.no_grad():
        a, b = ours(x), via_hf(x)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Trainable BatchNorm: HF counters are kept; a FrozenBN checkpoint (no counter) gets 0, like nn.BatchNorm2d.
    bn_cfg = dataclasses.replace(cfg, norm="bn")
    state = prefixed(hf.state_dict())
    bn_state = pop_hf_backbone_state(state, bn_cfg)
    assert not state and int(bn_state["stem.conv1.norm.num_batches_tracked"]) == int(
        hf.state_dict()["embedder.embedder.normalization.num_batches_tracked"]
    )
    bn_model = build_backbone(bn_cfg)
    bn_model.load_state_dict(pop_detectron2_backbone_state(d2_checkpoint(via_hf.state_dict()), bn_cfg), strict=True)
    assert int(bn_model.stem.conv1.norm.num_batches_tracked) == 0
    with torch.no_grad():
        c = bn_model.eval()(x)
    assert all(rel_err(c[k], b[k]) <= TOL for k in c)


def test_detectron2_swin_names(rng):
    hf_config = hf_swin_config()
    hf = transformers.SwinBackbone(hf_config).eval()
    perturb(hf, rng)
    via_hf, _ = load_from_hf(hf, hf_config)
    cfg = backbone_config_from_hf(hf_config.to_dict())
    assert sorted(via_hf.state_dict()) == sorted(official_swin_keys(cfg.depths))

    d2 = d2_checkpoint(via_hf.state_dict())
    ours = build_backbone(cfg).eval()
    ours.load_state_dict(pop_detectron2_backbone_state(d2, cfg), strict=True)
    assert sorted(d2) == ["pixel_mean", "sem_seg_head.predictor.query_feat.weight"]
    x = torch.randn(2, 3, randint(rng, 60, 90), randint(rng, 60, 90), generator=rng)
    with torch.no_grad():
        a, b = ours(x), via_hf(x)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # An official checkpoint for another window size than the config is refused, naming the tensor ...
    other = d2_checkpoint(build_backbone(dataclasses.replace(cfg, window_size=5)).state_dict())
    with pytest.raises(CheckpointError, match="relative_position_bias_table has shape"):
        pop_detectron2_backbone_state(other, cfg)
    # ... and so is a stored index that is not the one of the configured window.
    bad = d2_checkpoint(via_hf.state_dict())
    bad["backbone.layers.2.blocks.1.attn.relative_position_index"] = official_relative_position_index(4).T.flip(0)
    with pytest.raises(CheckpointError, match="window_size"):
        pop_detectron2_backbone_state(bad, cfg)


# ---------------------------------------------------------------------------------------------------
# Full-size presets
# ---------------------------------------------------------------------------------------------------


def hf_preset_config(name: str):
    cfg = BACKBONE_PRESETS[name]
    if isinstance(cfg, ResNetConfig):
        return transformers.ResNetConfig(depths=list(cfg.depths), out_features=STAGES)
    return transformers.SwinConfig(
        embed_dim=cfg.embed_dim, depths=list(cfg.depths), num_heads=list(cfg.num_heads), window_size=cfg.window_size,
        image_size=cfg.pretrain_img_size, drop_path_rate=cfg.drop_path_rate, out_features=STAGES,
    )


@pytest.mark.parametrize("name", list(BACKBONE_PRESETS))
def test_preset_parameter_counts_match_hf(name):
    cfg = BACKBONE_PRESETS[name]
    hf_config = hf_preset_config(name)
    assert backbone_config_from_hf(hf_config.to_dict()) == cfg  # the translation lands on the preset
    with torch.device("meta"):  # shapes only: no memory, no init
        hf = (transformers.ResNetBackbone if isinstance(cfg, ResNetConfig) else transformers.SwinBackbone)(hf_config)
        ours = build_backbone(cfg)
        ours_bn = build_backbone(dataclasses.replace(cfg, norm="bn")) if isinstance(cfg, ResNetConfig) else ours
    # HF's SwinModel keeps a final LayerNorm that its backbone never applies; the official backbone has none.
    hf_params = sum(p.numel() for n, p in hf.named_parameters() if not n.startswith("swin.layernorm."))
    assert sum(p.numel() for p in ours_bn.parameters()) == hf_params
    if isinstance(cfg, ResNetConfig):  # frozen: the same numbers, as buffers, and no step counters
        hf_stats = sum(b.numel() for n, b in hf.named_buffers() if n.endswith(("running_mean", "running_var")))
        assert sum(t.numel() for t in ours.state_dict().values()) == hf_params + hf_stats


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("r50", (224, 288)), ("swin-t", (256, 288))])
def test_full_size_forward_matches_hf(rng, name, size):
    """One small forward at full width, against HF in float32 (the float64 references are in the tiny-config
    tests above; here the point is the full-size wiring). Swin-T at 256x288: res5 is 8x9, larger than the window."""
    hf_config = hf_preset_config(name)
    hf = (transformers.ResNetBackbone if name == "r50" else transformers.SwinBackbone)(hf_config).eval()
    perturb(hf, rng)
    ours, left = load_from_hf(hf, hf_config)
    assert not left
    x = torch.randn(1, 3, *size, generator=rng)
    with torch.no_grad():
        ref = hf(x).feature_maps
        out = ours(x)
    assert_matches(out, ref, x.shape, rng.seed_value)
