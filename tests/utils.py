"""Shared test helpers."""
from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # m2f is imported lazily: conftest sets its environment (TRITON_INTERPRET) first
    import numpy as np

    from m2f.config import Mask2FormerConfig

_SESSION_SEED: int | None = None
_DRAWS: Counter[str] = Counter()  # how many seeds each key has drawn, so repeated draws differ but replay


def session_seed_from_env() -> int:
    """``M2F_TEST_SEED`` when set (to replay a run), else a fresh one."""
    text = os.environ.get("M2F_TEST_SEED", "").strip()
    if text:
        try:
            return int(text, 0)
        except ValueError:
            raise SystemExit(f"M2F_TEST_SEED must be an integer, got {text!r}") from None
    return int.from_bytes(os.urandom(4), "little")


def set_session_seed(seed: int) -> None:
    global _SESSION_SEED
    _SESSION_SEED = seed
    _DRAWS.clear()


def session_seed() -> int:
    if _SESSION_SEED is None:  # imported outside pytest (a helper script): still replayable through the variable
        set_session_seed(session_seed_from_env())
    assert _SESSION_SEED is not None
    return _SESSION_SEED


def fresh_seed(key: str | None = None) -> int:
    """A 31-bit seed derived from the session seed and ``key`` (default: the running test's node id).

    Module-scoped fixtures pass their own name as ``key``, so their inputs do not depend on which test set them up.
    """
    if key is None:
        key = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    draw = _DRAWS[key]
    _DRAWS[key] += 1
    digest = hashlib.sha256(f"{session_seed()}:{key}:{draw}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


def has_tensorrt_runtime() -> bool:
    """Whether a TensorRT runtime imports here; tensorrt-stubs (a test extra, for mypy) alone makes an importable
    ``tensorrt`` package with no runtime, which counts as none."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False
    import tensorrt

    return isinstance(getattr(tensorrt, "__version__", None), str)


class SeededGenerator(torch.Generator):
    """A torch.Generator that remembers its seed (the C type takes no new attributes; a subclass does)."""

    seed_value: int


def seeded_generator(key: str | None = None) -> SeededGenerator:
    seed = fresh_seed(key)
    g = SeededGenerator()
    g.manual_seed(seed)
    g.seed_value = seed
    return g


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere makes it NaN, so `rel_err(...) <= tol` fails."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-300))


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel forgets to write shows up in the comparison."""
    return torch.full_like(t, float("nan"))


def full_manifest(kind: str = "onnx", batch: int = 1, height: int = 64, width: int = 64, **fields):
    """An export manifest with every field its readers check (as `m2f export` writes it), ``fields`` overriding;
    ``write_manifest`` adds the model's checksum."""
    from m2f.export.manifest import new_manifest

    per_kind = {
        "onnx": {"opset": 18, "ops": {"msda": {"mode": "decomposed", "nodes": 0, "expected_nodes": None},
                                      "masked_attn": {"mode": "standard", "nodes": 0, "expected_nodes": None}}},
        "tensorrt": {"max_batch": batch, "precision": "fp16", "plugins": "none"},
    }[kind]
    defaults = {
        "dynamic": False,
        "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": [batch, 3, height, width]}],
        "outputs": [{"name": "pred_logits", "dtype": "float32", "shape": [batch, 7, 6]}],
        **per_kind,
    }
    return new_manifest(kind, batch=batch, height=height, width=width, **{**defaults, **fields})


def resnet_config(*, hidden_sizes, dim: int, heads: int, ffn_dim: int, queries: int, decoder_layers: int,
                  encoder_layers: int = 1, stem_channels: int = 8, num_classes: int = 3, backbone: dict | None = None,
                  pixel_decoder: dict | None = None, **fields) -> "Mask2FormerConfig":
    """A small ResNet (one block a stage) Mask2Former config: ``dim`` channels, ``heads`` heads and ``ffn_dim`` in
    both decoders; ``backbone`` / ``pixel_decoder`` add fields of those configs, ``fields`` of the model's."""
    from m2f.config import Mask2FormerConfig, PixelDecoderConfig, ResNetConfig, TransformerDecoderConfig

    return Mask2FormerConfig(
        backbone=ResNetConfig(depths=(1, 1, 1, 1), stem_channels=stem_channels, hidden_sizes=tuple(hidden_sizes),
                              **(backbone or {})),
        pixel_decoder=PixelDecoderConfig(conv_dim=dim, mask_dim=dim, num_encoder_layers=encoder_layers,
                                         num_heads=heads, ffn_dim=ffn_dim, **(pixel_decoder or {})),
        transformer_decoder=TransformerDecoderConfig(hidden_dim=dim, num_queries=queries, num_heads=heads,
                                                     ffn_dim=ffn_dim, num_layers=decoder_layers),
        num_classes=num_classes,
        **fields,
    )


def tiny_config(hidden_sizes=(16, 32, 32, 64), encoder_layers: int = 2, queries: int = 7, decoder_layers: int = 4):
    """A small ResNet Mask2Former config (3 classes, 4 heads, 32 channels)."""
    return resnet_config(hidden_sizes=hidden_sizes, dim=32, heads=4, ffn_dim=64, queries=queries,
                         decoder_layers=decoder_layers, encoder_layers=encoder_layers, stem_channels=16)


def tiny_model(seed: int) -> torch.nn.Module:
    """:func:`tiny_config`'s model with weights moved off their init values (zero biases would hide layout
    mistakes) and some empty masks."""
    import m2f

    torch.manual_seed(seed)
    model = m2f.build_model(tiny_config(), backend="torch").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.transformer_decoder.mask_embed.layers[-1].bias[0] -= 2.0
    return model


def save_tiny_checkpoint(tmp_path_factory, key: str) -> tuple[Path, int]:
    """:func:`tiny_model` saved as an m2f checkpoint directory; (its path, the seed), the seed drawn for ``key``."""
    import m2f

    seed = fresh_seed(key)
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    m2f.save_pretrained(tiny_model(seed), path)
    return path, seed


def off_kink_locations(shapes, size: tuple[int, int, int, int], generator: torch.Generator, margin: float = 0.2,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:  # (N, Q, M, L, P, 2)
    """Deformable-attention sampling locations whose pixel coordinates (x * W - 0.5) lie in [i + margin,
    i + 1 - margin] for a random cell i in [-2, W] (per axis and level): corners partly or wholly outside the map,
    yet never within rounding of a kink (pixel centre, border), so float32 and float64 pick the same corners and
    finite differences stay on one side."""
    n, q, m, p = size
    coords = []
    for h, w in shapes:
        extent = torch.tensor([w, h], dtype=torch.float64)
        cell = torch.floor(torch.rand(n, q, m, p, 2, generator=generator, dtype=torch.float64) * (extent + 3)) - 2
        frac = margin + (1 - 2 * margin) * torch.rand(n, q, m, p, 2, generator=generator, dtype=torch.float64)
        coords.append((cell + frac + 0.5) / extent)
    return torch.stack(coords, dim=3).to(dtype)


def mismatch(out: torch.Tensor, ref: torch.Tensor, tol: float, scale: float = 0.0) -> str:
    """'' when ``out`` has NaN, +inf and -inf exactly where ``ref`` has them and its finite values are within
    ``tol`` relative error of ``ref``'s; otherwise a short description of the first difference. ``scale``: the
    norm of the terms that sum to ``ref`` where it may cancel to ~0 (the error is then relative to that)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        return f"shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = test(out64) != test(ref64)
        if differ.any():
            where = tuple(int(i) for i in differ.nonzero()[0])
            return f"{int(differ.sum())} {kind} positions differ, first at {where}: {out64[where]} vs {ref64[where]}"
    finite = torch.isfinite(ref64)
    err = 0.0
    if finite.any():
        diff, norm = out64[finite] - ref64[finite], torch.linalg.vector_norm(ref64[finite])
        err = float(torch.linalg.vector_norm(diff) / max(float(norm), scale, 1e-300))
    return f"finite values rel_err {err:.3g} > {tol}" if err > tol else ""


# what m2f.runtime prints while it works: tqdm's bar, a plain progress line, a stage's start / end line
PROGRESS_LINE = re.compile(r"\S+: +\d+%\||m2f: .*(?: \.\.\.|: done \([\d.]+ s\)|: \d+/\d+ \S+ \([\d.]+ s\))$")


def without_progress(stderr: str) -> list[str]:
    """The lines of ``stderr`` other than progress and stage lines."""
    return [line for line in stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]


def hub_cache_snapshot(hf_home, repo_id: str, revision: str = "main"):
    """An empty snapshot folder of ``repo_id`` in the hub cache layout under ``hf_home`` (``$HF_HOME/hub/models--
    OWNER--NAME/{refs/REVISION, snapshots/COMMIT}``), as huggingface_hub leaves it after a download; fill it with
    the repository's files. The commit is derived from the id and revision (a cache needs one, any 40 hex digits)."""
    from pathlib import Path

    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def offline_env(hf_home) -> dict[str, str]:
    """The environment of a subprocess that must never reach the network: hub offline mode, the hub cache under
    ``hf_home``, and every proxy pointed at a closed local port (anything that still tries to connect fails)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "hf_token", "hf_hub_cache")}
    closed = "http://127.0.0.1:9"
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HTTP_PROXY=closed, HTTPS_PROXY=closed, ALL_PROXY=closed,
               http_proxy=closed, https_proxy=closed)
    return env


def tiny_hf_checkpoint(path, backbone: str, seed: int, cross_attn_gain: float = 1.0):
    """A tiny Hugging Face Mask2Former checkpoint (``save_pretrained`` folder at ``path``) with a Swin or ResNet
    backbone, its weights moved off their init values (zero biases would hide layout mistakes); returns ``path``.

    ``cross_attn_gain`` scales the transformer decoder's masked cross-attention output projections. A random
    decoder attends over a handful of keys with many mask logits near the 0.5 threshold, so any rounding flips
    masks and moves its outputs by percents (measured 2026-12-01 on the tiny Swin at fp16: 6 of 30 check seeds
    past fp16's 2e-2 bound); with a gain of 0.05 a flip moves them little (30 of 30 pass, worst rel err 5.5e-3),
    so that low-precision tests measure rounding.
    """
    import transformers

    torch.manual_seed(seed)
    if backbone == "swin":
        bb = transformers.SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=2,
                                     drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    else:
        bb = hf_resnet_backbone()
    config = transformers.Mask2FormerConfig(
        backbone_config=bb, feature_size=64, mask_feature_size=48, hidden_dim=64, encoder_layers=2,
        encoder_feedforward_dim=96, num_attention_heads=8, decoder_layers=4, num_queries=7, dim_feedforward=80,
        id2label={i: f"class{i}" for i in range(5)},
    )
    hf = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for layer in hf.model.transformer_module.decoder.layers:
            layer.cross_attn.out_proj.weight.mul_(cross_attn_gain)
    hf.save_pretrained(path)
    return path


TINY_HF_LABELS, TINY_HF_QUERIES = 5, 7  # classes and queries of :func:`tiny_hf_model`
D2_ENC_LAYERS, D2_DEC_LAYERS = 2, 3  # encoder and decoder layers of :func:`d2_config`


def perturb_(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.1) -> None:
    """Add noise to every floating parameter and buffer so that no tensor stays at its init value
    (zero biases, unit norms, zero-initialised attention weights, BN statistics...)."""
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
            if name.endswith("running_var"):
                t.mul_(torch.exp(scale * noise))  # stays positive
            else:
                t.add_(scale * noise)


def hf_config(**kw):
    """A small Hugging Face Mask2FormerConfig (no backbone given: HF's default); ``kw`` overrides."""
    from transformers import Mask2FormerConfig

    base = dict(feature_size=64, mask_feature_size=48, hidden_dim=64, encoder_layers=2, encoder_feedforward_dim=96,
                num_attention_heads=8, decoder_layers=4, num_queries=7, dim_feedforward=80)
    base.update(kw)
    return Mask2FormerConfig(**base)


def hf_resnet_backbone():
    """A small Hugging Face ResNet backbone config (bottleneck blocks, four stages out)."""
    import transformers

    return transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1], layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )


def tiny_hf_model(backbone_config, gen: torch.Generator):
    """A small random HF Mask2Former with every tensor moved off its init value, in eval mode."""
    import transformers

    torch.manual_seed(gen.seed_value)
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone_config, feature_size=64, mask_feature_size=48, hidden_dim=64, encoder_layers=2,
        encoder_feedforward_dim=96, num_attention_heads=8, decoder_layers=5, num_queries=TINY_HF_QUERIES,
        dim_feedforward=80, id2label={i: f"thing{i}" for i in range(TINY_HF_LABELS)},
    )
    model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    perturb_(model, gen)
    return model


def d2_config(backbone: str = "resnet") -> "Mask2FormerConfig":
    """A small config for checkpoints in the official detectron2 layout (ResNet or Swin backbone)."""
    from m2f.config import Mask2FormerConfig, PixelDecoderConfig, ResNetConfig, SwinConfig, TransformerDecoderConfig

    if backbone == "swin":
        bb = SwinConfig(embed_dim=16, depths=(2, 1, 1, 2), num_heads=(1, 2, 2, 4), window_size=3)
    else:
        bb = ResNetConfig(depths=(1, 2, 1, 1), stem_channels=16, hidden_sizes=(32, 64, 96, 128))
    return Mask2FormerConfig(
        backbone=bb,
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32, num_encoder_layers=D2_ENC_LAYERS, num_heads=4, ffn_dim=48),
        transformer_decoder=TransformerDecoderConfig(hidden_dim=32, num_queries=5, num_heads=4, ffn_dim=40,
                                                     num_layers=D2_DEC_LAYERS, enforce_input_proj=True),
        num_classes=4,
        name="test-d2",
    )


def official_keys(cfg: "Mask2FormerConfig") -> list[str]:
    """The key names of an official Mask2Former checkpoint (detectron2 ResNet or D2SwinTransformer +
    MSDeformAttnPixelDecoder + MultiScaleMaskedTransformerDecoder), written out from the official module tree."""
    wb = ("weight", "bias")
    if cfg.backbone.type == "swin":
        keys = [f"backbone.patch_embed.{m}.{w}" for m in ("proj", "norm") for w in wb]
        for stage, depth in enumerate(cfg.backbone.depths):
            for block in range(depth):
                p = f"backbone.layers.{stage}.blocks.{block}."
                keys += [p + "attn.relative_position_bias_table", p + "attn.relative_position_index"]
                keys += [p + m + "." + w for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for w in wb]
            if stage < 3:
                keys += [f"backbone.layers.{stage}.downsample.reduction.weight"]
                keys += [f"backbone.layers.{stage}.downsample.norm.{w}" for w in wb]
        keys += [f"backbone.norm{i}.{w}" for i in range(4) for w in wb]  # the output norms of D2SwinTransformer
    else:
        bn = ("weight", "bias", "running_mean", "running_var")  # FrozenBatchNorm2d
        keys = ["backbone.stem.conv1.weight"] + [f"backbone.stem.conv1.norm.{n}" for n in bn]
        for stage, depth in zip(range(2, 6), cfg.backbone.depths):
            for block in range(depth):
                p = f"backbone.res{stage}.{block}."
                convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if block == 0 else [])
                for conv in convs:
                    keys += [p + conv + ".weight"] + [p + conv + ".norm." + n for n in bn]
    pd = "sem_seg_head.pixel_decoder."
    for i in range(3):
        keys += [f"{pd}input_proj.{i}.{j}.{w}" for j in (0, 1) for w in ("weight", "bias")]
    keys.append(pd + "transformer.level_embed")
    for layer in range(D2_ENC_LAYERS):
        p = f"{pd}transformer.encoder.layers.{layer}."
        for sub in ("self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
                    "self_attn.output_proj", "norm1", "linear1", "linear2", "norm2"):
            keys += [p + sub + ".weight", p + sub + ".bias"]
    keys += [pd + "mask_features.weight", pd + "mask_features.bias"]
    keys += [pd + "adapter_1.weight", pd + "adapter_1.norm.weight", pd + "adapter_1.norm.bias"]
    keys += [pd + "layer_1.weight", pd + "layer_1.norm.weight", pd + "layer_1.norm.bias"]
    pr = "sem_seg_head.predictor."
    for layer in range(D2_DEC_LAYERS):
        for mod, attn in (("transformer_self_attention_layers", "self_attn"),
                          ("transformer_cross_attention_layers", "multihead_attn")):
            p = f"{pr}{mod}.{layer}."
            keys += [p + attn + ".in_proj_weight", p + attn + ".in_proj_bias", p + attn + ".out_proj.weight",
                     p + attn + ".out_proj.bias", p + "norm.weight", p + "norm.bias"]
        p = f"{pr}transformer_ffn_layers.{layer}."
        keys += [p + n + "." + w for n in ("linear1", "linear2", "norm") for w in ("weight", "bias")]
    keys += [pr + "decoder_norm.weight", pr + "decoder_norm.bias", pr + "query_feat.weight", pr + "query_embed.weight",
             pr + "level_embed.weight", pr + "class_embed.weight", pr + "class_embed.bias"]
    keys += [f"{pr}input_proj.{i}.{w}" for i in range(3) for w in ("weight", "bias")]
    keys += [f"{pr}mask_embed.layers.{i}.{w}" for i in range(3) for w in ("weight", "bias")]
    return keys


def to_ours(key: str) -> str:
    """An official checkpoint key -> m2f's parameter name."""
    for official, ours in (("sem_seg_head.pixel_decoder.", "pixel_decoder."), ("sem_seg_head.predictor.", "transformer_decoder.")):
        if key.startswith(official):
            return ours + key[len(official):]
    return key


def official_state(cfg: "Mask2FormerConfig", gen: torch.Generator) -> dict[str, "np.ndarray"]:
    """Random arrays under the official names, shaped like our model's tensors of the same (renamed) name."""
    import numpy as np

    import m2f

    ours = m2f.build_model(cfg).state_dict()
    keys = official_keys(cfg)
    assert {to_ours(k) for k in keys} == set(ours), "our parameter names must mirror the official ones"
    state = {}
    for k in keys:
        t = torch.randn(ours[to_ours(k)].shape, generator=gen)
        if k.endswith("relative_position_index"):  # a fixed function of the window size, checked on load
            t = ours[k]
        elif k.endswith("running_var"):
            t = t.abs() + 0.5
        state[k] = t.numpy()
    state["criterion.empty_weight"] = np.ones(cfg.num_classes + 1, dtype=np.float32)
    return state


def write_pkl(path, state: dict[str, "np.ndarray"]):
    """``state`` as a detectron2 model_final.pkl (the pickle layout the official checkpoints use)."""
    import pickle

    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "test", "matching_heuristics": True}, f, protocol=2)
    return path


def tiny_train_config(num_classes: int = 6, norm: str = "bn", **label_set) -> "Mask2FormerConfig":
    """A very small ResNet (basic blocks, BatchNorm by default) Mask2Former config for training loops."""
    return resnet_config(hidden_sizes=(8, 16, 24, 32), dim=16, heads=2, ffn_dim=32, queries=6, decoder_layers=2,
                         num_classes=num_classes, backbone={"block": "basic", "norm": norm},
                         pixel_decoder={"num_points": 2, "norm_groups": 4}, **label_set)


def bilinear_ref(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Value of img (H, W) at normalised (x, y), pixel centres at (i + 0.5) / size, zeros outside (float64)."""
    import math

    h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = img.new_zeros(())
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out = out + wy * wx * img[yy, xx]
    return out


def sample_ref(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """masks (N, H, W), coords (P, 2) -> (N, P) in float64 by :func:`bilinear_ref`."""
    masks = masks.double()
    return torch.stack([torch.stack([bilinear_ref(m, float(c[0]), float(c[1])) for c in coords]) for m in masks])


def cost_ref(logits, masks, labels, tgt_masks, coords, wc=2.0, wm=5.0, wd=5.0) -> torch.Tensor:
    """The matcher's (Q, N) cost in float64 by loops: class, point-sampled sigmoid BCE and dice terms."""
    probs = logits.double().softmax(-1)
    pred = sample_ref(masks, coords)
    tgt = sample_ref(tgt_masks.double(), coords)
    q, n = pred.shape[0], tgt.shape[0]
    cost = torch.zeros(q, n, dtype=torch.float64)
    for i in range(q):
        for j in range(n):
            x, t = pred[i], tgt[j]
            bce = (-(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(1 - torch.sigmoid(x)))).mean()
            p = torch.sigmoid(x)
            dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            cost[i, j] = wc * -probs[i, labels[j]] + wm * bce + wd * dice
    return cost
