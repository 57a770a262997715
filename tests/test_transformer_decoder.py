"""Transformer decoder: parity with Hugging Face's Mask2FormerTransformerModule, official names, masked attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import m2f.transformer_decoder as td_module
from m2f.checkpoints.hf import pop_hf_transformer_decoder_state
from m2f.config import TransformerDecoderConfig
from m2f.transformer_decoder import CrossAttentionLayer, MultiScaleMaskedTransformerDecoder
from tests.utils import hf_config, perturb_, rel_err

hf_m2f = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")

LEVEL_SIZES = [(3, 5), (5, 9), (10, 17)]  # 1/32, 1/16, 1/8 maps, coarsest first
MASK_SIZE = (19, 33)  # 1/4


def build_pair(gen, in_channels: int, pre_norm: bool, enforce: bool, num_classes: int = 6):
    torch.manual_seed(gen.seed_value)
    cfg = hf_config(pre_norm=pre_norm, enforce_input_projection=enforce, feature_size=in_channels)
    hf = hf_m2f.Mask2FormerTransformerModule(in_channels, cfg).eval()
    cls = torch.nn.Linear(64, num_classes + 1)
    perturb_(hf, gen)
    perturb_(cls, gen)
    state = {"model.transformer_module." + k: v for k, v in hf.state_dict().items()}
    state.update({"class_predictor." + k: v for k, v in cls.state_dict().items()})
    converted = pop_hf_transformer_decoder_state(state)
    assert not state, f"HF tensors left unconverted: {sorted(state)}"
    ours_cfg = TransformerDecoderConfig(hidden_dim=64, num_queries=7, num_heads=8, ffn_dim=80, num_layers=3,
                                        pre_norm=pre_norm, enforce_input_proj=enforce)
    ours = MultiScaleMaskedTransformerDecoder(in_channels, num_classes, 48, ours_cfg).eval()
    ours.load_state_dict(converted, strict=True)
    return hf, cls, ours


@pytest.mark.parametrize("in_channels,pre_norm,enforce", [(64, False, False), (32, True, False), (64, False, True)])
def test_transformer_decoder_matches_transformers(rng, in_channels, pre_norm, enforce):
    hf, cls, ours = build_pair(rng, in_channels, pre_norm, enforce)
    feats = [torch.randn(2, in_channels, h, w, generator=rng) for h, w in LEVEL_SIZES]
    mask_features = torch.randn(2, 48, *MASK_SIZE, generator=rng)
    with torch.no_grad():
        classes, masks = ours(feats, mask_features)
        ref = hf(feats, mask_features)
        ref_classes = [cls(h.transpose(0, 1)) for h in ref.intermediate_hidden_states]
    assert len(classes) == len(masks) == 4 == len(ref_classes)
    for i, (c, m, rc, rm) in enumerate(zip(classes, masks, ref_classes, ref.masks_queries_logits)):
        assert c.shape == (2, 7, 7) and m.shape == (2, 7, *MASK_SIZE)
        assert rel_err(c, rc) <= 1e-5, f"prediction {i} class logits: {rel_err(c, rc):.3g} (seed {rng.seed_value})"
        assert rel_err(m, rm) <= 1e-5, f"prediction {i} mask logits: {rel_err(m, rm):.3g} (seed {rng.seed_value})"


def test_transformer_decoder_parameter_names_are_official():
    cfg = TransformerDecoderConfig(hidden_dim=64, num_queries=7, num_heads=8, ffn_dim=80, num_layers=2)
    ours = MultiScaleMaskedTransformerDecoder(32, 5, 48, cfg)
    expected = {"query_feat.weight", "query_embed.weight", "level_embed.weight", "decoder_norm.weight",
                "decoder_norm.bias", "class_embed.weight", "class_embed.bias"}
    expected |= {f"input_proj.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    expected |= {f"mask_embed.layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    for i in range(2):
        for layer, attn in (("transformer_self_attention_layers", "self_attn"),
                            ("transformer_cross_attention_layers", "multihead_attn")):
            p = f"{layer}.{i}."
            expected |= {p + attn + ".in_proj_weight", p + attn + ".in_proj_bias", p + attn + ".out_proj.weight",
                         p + attn + ".out_proj.bias", p + "norm.weight", p + "norm.bias"}
        p = f"transformer_ffn_layers.{i}."
        expected |= {p + n + "." + w for n in ("linear1", "linear2", "norm") for w in ("weight", "bias")}
    assert set(ours.state_dict()) == expected
    assert ours.class_embed.out_features == 6
    # without enforce_input_proj and in_channels == hidden_dim there are no input projections
    same = MultiScaleMaskedTransformerDecoder(64, 5, 48, cfg)
    assert not any(k.startswith("input_proj") for k in same.state_dict())


def _cross_attention_float64(layer: CrossAttentionLayer, tgt, memory, logits, pos, query_pos):
    """Hand computation: per batch, head and query, softmax over the allowed keys (all keys if none allowed)."""
    attn = layer.multihead_attn
    W, b = attn.in_proj_weight.double(), attn.in_proj_bias.double()
    C, H = attn.embed_dim, attn.num_heads
    d = C // H
    q = (tgt + query_pos) @ W[:C].T + b[:C]
    k = (memory + pos) @ W[C : 2 * C].T + b[C : 2 * C]
    v = memory @ W[2 * C :].T + b[2 * C :]
    out = torch.zeros_like(q)
    for bi in range(q.shape[0]):
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            for qi in range(q.shape[1]):
                allowed = (logits[bi, qi] >= 0).nonzero().flatten().tolist()
                if not allowed:
                    allowed = list(range(k.shape[1]))
                scores = torch.stack([q[bi, qi, sl] @ k[bi, j, sl] for j in allowed]) / d**0.5
                p = torch.softmax(scores, 0)
                out[bi, qi, sl] = sum(p[n] * v[bi, j, sl] for n, j in enumerate(allowed))
    out = out @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()
    return torch.nn.functional.layer_norm(tgt + out, (C,), layer.norm.weight.double(), layer.norm.bias.double(), layer.norm.eps)


def test_masked_cross_attention_against_float64_hand_computation(rng):
    torch.manual_seed(rng.seed_value)
    layer = CrossAttentionLayer(16, 4).eval()
    perturb_(layer, rng)
    B, Q, HW = 2, 4, 11
    tgt, memory = torch.randn(B, Q, 16, generator=rng), torch.randn(B, HW, 16, generator=rng)
    pos, query_pos = torch.randn(1, HW, 16, generator=rng), torch.randn(1, Q, 16, generator=rng)
    logits = torch.randn(B, Q, HW, generator=rng)
    logits[0, 0] = -torch.rand(HW, generator=rng) - 0.1  # empty mask: must attend everywhere
    logits[1, 2] = torch.rand(HW, generator=rng) + 0.1  # full mask
    logits[1, 3] = -1.0
    logits[1, 3, 4] = 0.0  # exactly one allowed key (sigmoid(0) = 0.5 counts as foreground)
    with torch.no_grad():
        got = layer(tgt, memory, logits, pos, query_pos)
        want = _cross_attention_float64(layer, tgt.double(), memory.double(), logits, pos.double(), query_pos.double())
    assert rel_err(got, want) <= 1e-5, f"seed {rng.seed_value}"
    # the empty row differs from what it would be with a fully masked softmax (NaN) or with only key 0
    assert torch.isfinite(got).all()


def test_decoder_masks_come_from_previous_prediction_and_empty_masks_attend_everywhere(rng, monkeypatch):
    """Record every masked-attention call of the decoder: its logits are the previous prediction's mask logits
    resized (bilinear, align_corners=False) to the attended level, and its output matches a float64 hand
    computation in which queries with an empty mask attend to every key."""
    torch.manual_seed(rng.seed_value)
    cfg = TransformerDecoderConfig(hidden_dim=16, num_queries=5, num_heads=2, ffn_dim=24, num_layers=4)
    dec = MultiScaleMaskedTransformerDecoder(16, 3, 8, cfg).eval()
    perturb_(dec, rng)
    # channel 0 of the mask features is 1 everywhere and channel 0 of every mask embedding is pushed down by a
    # bias of -4: masks lean empty (attend everywhere) while the other channels keep some queries partial.
    with torch.no_grad():
        dec.mask_embed.layers[-1].bias[0] = -4.0
    calls = []
    real = td_module.masked_attention_from_logits

    def recording(q, k, v, logits, backend):
        out = real(q, k, v, logits, backend=backend)
        calls.append((q, k, v, logits, out))
        return out

    monkeypatch.setattr(td_module, "masked_attention_from_logits", recording)
    sizes = [(2, 3), (3, 5), (5, 9)]
    feats = [torch.randn(1, 16, h, w, generator=rng) for h, w in sizes]
    mask_features = torch.randn(1, 8, 9, 17, generator=rng)
    mask_features[:, 0] = 1.0
    with torch.no_grad():
        classes, masks = dec(feats, mask_features)
    assert len(calls) == 4
    saw_empty = False
    for i, (q, k, v, logits, out) in enumerate(calls):
        size = sizes[i % 3]
        expected_logits = F.interpolate(masks[i], size=size, mode="bilinear", align_corners=False).flatten(2)
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
        q64, k64, v64 = q.double(), k.double(), v.double()
        allow = logits[:, None] >= 0  # (B, 1, Q, HW)
        empty = ~allow.any(-1, keepdim=True)
        saw_empty |= bool(empty.any())
        allow = allow | empty
        scores = (q64 @ k64.transpose(-1, -2)) / q.shape[-1] ** 0.5
        ref = torch.softmax(scores.masked_fill(~allow, float("-inf")), -1) @ v64
        assert rel_err(out, ref) <= 1e-5, f"layer {i} (seed {rng.seed_value})"
    assert saw_empty, "the set-up should produce at least one query with an empty mask"
    assert not calls[0][3].requires_grad  # detached like the official code
