"""Swin follows the official D2SwinTransformer also where stages are not larger than the window (where HF's
SwinModel shrinks the window and drops the shift): checked against a naive float64 re-implementation of the
official semantics, written with explicit token coordinates (cyclic indexing for the shift) and the official
region slices for the mask."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from m2f.backbones import build_backbone
from m2f.config import SwinConfig
from tests.utils import rel_err




@torch.no_grad()
def randomize(model: torch.nn.Module, g: torch.Generator) -> None:
    for name, t in model.named_parameters():
        if name.endswith("relative_position_bias_table"):
            t.copy_(torch.randn(t.shape, generator=g))
        elif t.ndim >= 2:
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
        elif name.endswith("weight"):
            t.copy_(1.0 + 0.3 * torch.randn(t.shape, generator=g))
        else:
            t.copy_(0.3 * torch.randn(t.shape, generator=g))


def layer_norm(x, p, name):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)


def linear(x, p, name):
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def naive_block(x, p, name, heads, ws, shift):
    """One official Swin block on (B, H, W, C); windows gathered with explicit (cyclic) token coordinates."""
    B, H, W, C = x.shape
    y = layer_norm(x, p, f"{name}.norm1")
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    padded = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    padded[:, :H, :W] = y  # padded tokens are zeros after the norm and take part in attention

    def region(i, size):  # the official img_mask slices, on the shifted (padded) map
        return 0 if i < size - ws else (1 if i < size - shift else 2)

    local = [(a, b) for a in range(ws) for b in range(ws)]  # token order inside a window: row-major
    windows = [[(wr * ws + a, wc * ws + b) for a, b in local] for wr in range(Hp // ws) for wc in range(Wp // ws)]
    # The shifted map's (r, c) holds the padded map's ((r + shift) % Hp, (c + shift) % Wp): a roll by -shift.
    rows = torch.tensor([[(r + shift) % Hp for r, _ in win] for win in windows])  # (nWin, N)
    cols = torch.tensor([[(c + shift) % Wp for _, c in win] for win in windows])
    tokens = padded[:, rows, cols]  # (B, nWin, N, C)
    q, k, v = linear(tokens, p, f"{name}.attn.qkv").chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (heads, C // heads)).transpose(-2, -3) for t in (q, k, v))  # (B, nWin, h, N, d)
    logits = q @ k.transpose(-1, -2) * (C // heads) ** -0.5
    offsets = [[(ai - aj + ws - 1) * (2 * ws - 1) + (bi - bj + ws - 1) for aj, bj in local] for ai, bi in local]
    logits = logits + p[f"{name}.attn.relative_position_bias_table"][torch.tensor(offsets)].permute(2, 0, 1)
    if shift:
        labels = torch.tensor([[region(r, Hp) * 3 + region(c, Wp) for r, c in win] for win in windows])
        logits = logits + torch.where(labels[:, None, :, None] == labels[:, None, None, :], 0.0, -100.0)
    attended = (logits.softmax(-1) @ v).transpose(-2, -3).flatten(-2)  # (B, nWin, N, C)
    out = torch.zeros_like(padded)
    out[:, rows, cols] = linear(attended, p, f"{name}.attn.proj")
    x = x + out[:, :H, :W]
    hidden = F.gelu(linear(layer_norm(x, p, f"{name}.norm2"), p, f"{name}.mlp.fc1"))
    return x + linear(hidden, p, f"{name}.mlp.fc2")


def naive_swin(model, cfg: SwinConfig, x: torch.Tensor) -> list[torch.Tensor]:
    p = {k: v.double() for k, v in model.state_dict().items()}
    x = x.double()
    B, _, H, W = x.shape
    image = torch.zeros(B, 3, math.ceil(H / 4) * 4, math.ceil(W / 4) * 4, dtype=x.dtype)
    image[:, :, :H, :W] = x
    feat = F.conv2d(image, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=4)
    feat = layer_norm(feat.permute(0, 2, 3, 1), p, "patch_embed.norm")
    outs = []
    for i, depth in enumerate(cfg.depths):
        for j in range(depth):
            shift = cfg.window_size // 2 if j % 2 else 0
            feat = naive_block(feat, p, f"layers.{i}.blocks.{j}", cfg.num_heads[i], cfg.window_size, shift)
        outs.append(layer_norm(feat, p, f"norm{i}").permute(0, 3, 1, 2))
        if i < 3:
            h, w = feat.shape[1:3]
            feat = F.pad(feat, (0, 0, 0, w % 2, 0, h % 2))
            feat = torch.cat([feat[:, 0::2, 0::2], feat[:, 1::2, 0::2], feat[:, 0::2, 1::2], feat[:, 1::2, 1::2]], -1)
            feat = linear(layer_norm(feat, p, f"layers.{i}.downsample.norm"), p, f"layers.{i}.downsample.reduction")
    return outs


@pytest.mark.parametrize(
    "window, size, padded",
    [
        (7, (45, 70), True),  # res2..res5: 12x18, 6x9, 3x5, 2x3: res4 / res5 smaller than the window
        (3, (96, 96), False),  # every stage an exact multiple of the window: no padding anywhere
    ],
    ids=["smaller-than-window", "exact-multiple"],
)
def test_swin_official_semantics_against_naive_float64(rng, window, size, padded):
    cfg = SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=window)
    model = build_backbone(cfg).eval()
    randomize(model, rng)
    x = torch.randn(2, 3, *size, generator=rng)
    stages = [(math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in (4, 8, 16, 32)]
    assert any(h % window or w % window for h, w in stages) == padded
    if padded:
        assert min(stages[-1]) < window

    with torch.no_grad():
        out = model(x)
    ref = naive_swin(model, cfg, x)
    for (name, tensor), expected, hw in zip(out.items(), ref, stages):
        assert tensor.shape == (2, cfg.embed_dim * 2 ** (int(name[-1]) - 2), *hw)
        assert torch.isfinite(tensor).all()
        err = rel_err(tensor, expected)
        assert err <= 1e-5, f"{name}: rel_err {err:.3g} vs naive float64 (seed {rng.seed_value}, window {window})"

    # Each image is computed independently of the others in the batch (masks broadcast, never mix samples).
    with torch.no_grad():
        single = model(x[1:])
    assert all(rel_err(single[k], out[k][1:]) <= 1e-6 for k in out)


def test_swin_absolute_position_embedding_and_no_patch_norm(rng):
    """Options no official config uses, wired as the original: ``ape`` adds the pretrain-size table resized
    bicubically to the patch grid after the patch norm; ``patch_norm=False`` drops that norm."""
    base = SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), window_size=3, pretrain_img_size=32)
    plain = build_backbone(base).eval()
    randomize(plain, rng)
    with_ape = build_backbone(dataclasses.replace(base, ape=True)).eval()
    state = plain.state_dict()
    table = torch.randn(1, 16, 8, 8, generator=rng)
    with_ape.load_state_dict({**state, "absolute_pos_embed": table}, strict=True)
    x = torch.randn(2, 3, 45, 70, generator=rng)
    with torch.no_grad():
        grid = plain.patch_embed(x)  # (B, 12, 18, C)
        pos = F.interpolate(table, size=grid.shape[1:3], mode="bicubic", align_corners=False)
        expected = plain.norm0(plain.layers[0](grid + pos.permute(0, 2, 3, 1))[0]).permute(0, 3, 1, 2)
        out = with_ape(x)
    assert rel_err(out["res2"], expected) <= 1e-6

    no_norm = build_backbone(dataclasses.replace(base, patch_norm=False)).eval()
    assert not any(k.startswith("patch_embed.norm") for k in no_norm.state_dict())
    no_norm.load_state_dict({k: v for k, v in state.items() if not k.startswith("patch_embed.norm")}, strict=True)
    with torch.no_grad():
        out = no_norm(x)
        tokens = F.conv2d(F.pad(x, (0, 2, 0, 3)), state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                          stride=4).permute(0, 2, 3, 1)
        expected = plain.norm0(plain.layers[0](tokens)[0]).permute(0, 3, 1, 2)
    assert rel_err(out["res2"], expected) <= 1e-6
