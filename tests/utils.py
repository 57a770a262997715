"""Shared test helpers."""
from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path

import torch

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


def tiny_config(hidden_sizes=(16, 32, 32, 64), encoder_layers: int = 2, queries: int = 7, decoder_layers: int = 4):
    """A small ResNet Mask2Former config (3 classes, 4 heads, 32 channels)."""
    from m2f.config import Mask2FormerConfig, PixelDecoderConfig, ResNetConfig, TransformerDecoderConfig

    return Mask2FormerConfig(
        backbone=ResNetConfig(depths=(1, 1, 1, 1), stem_channels=16, hidden_sizes=tuple(hidden_sizes)),
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32, num_encoder_layers=encoder_layers, num_heads=4,
                                         ffn_dim=64),
        transformer_decoder=TransformerDecoderConfig(hidden_dim=32, num_queries=queries, num_heads=4, ffn_dim=64,
                                                     num_layers=decoder_layers),
        num_classes=3,
    )


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


def mismatch(out: torch.Tensor, ref: torch.Tensor, tol: float) -> str:
    """'' when ``out`` has NaN, +inf and -inf exactly where ``ref`` has them and its finite values are within
    ``tol`` relative error of ``ref``'s; otherwise a short description of the first difference."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        return f"shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = test(out64) != test(ref64)
        if differ.any():
            where = tuple(int(i) for i in differ.nonzero()[0])
            return f"{int(differ.sum())} {kind} positions differ, first at {where}: {out64[where]} vs {ref64[where]}"
    finite = torch.isfinite(ref64)
    err = rel_err(out64[finite], ref64[finite]) if finite.any() else 0.0
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
        bb = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1],
                                       layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"])
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
