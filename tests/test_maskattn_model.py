"""The model's masked cross-attention on the fused Triton kernel (interpreter on the CPU) against the PyTorch
backend: the transformer decoder forward and backward, with masks that leave some queries empty."""
from __future__ import annotations

import torch

from m2f.config import TransformerDecoderConfig
from m2f.transformer_decoder import MultiScaleMaskedTransformerDecoder
from tests.utils import perturb_, rel_err, tiny_config

# The kernels run on the GPU where there is one, else in the interpreter on the CPU (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LEVEL_SIZES = [(3, 5), (5, 9), (10, 17)]  # 1/32, 1/16, 1/8, coarsest first
MASK_SIZE = (19, 33)  # 1/4


def decoder_pair(gen: torch.Generator, num_layers: int = 4):
    """The same random decoder with backend "torch" and "triton"; mask embeddings lean negative so that some
    queries' masks are empty at some levels (they must attend everywhere) while others stay partial."""
    torch.manual_seed(gen.seed_value)
    cfg = TransformerDecoderConfig(hidden_dim=64, num_queries=7, num_heads=8, ffn_dim=80, num_layers=num_layers)
    ref = MultiScaleMaskedTransformerDecoder(32, 5, 24, cfg).eval()
    perturb_(ref, gen)
    with torch.no_grad():
        ref.mask_embed.layers[-1].bias[0] = -3.0
    tri = MultiScaleMaskedTransformerDecoder(32, 5, 24, cfg, backend="triton").eval()
    tri.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(DEVICE), tri.to(DEVICE)


def decoder_inputs(gen: torch.Generator, batch: int = 2):
    feats = [torch.randn(batch, 32, h, w, generator=gen) for h, w in LEVEL_SIZES]
    mask_features = torch.randn(batch, 24, *MASK_SIZE, generator=gen)
    mask_features[:, 0] = 1.0  # with the bias above: channel 0 pushes every mask logit down by ~3
    return [f.to(DEVICE) for f in feats], mask_features.to(DEVICE)


def test_decoder_triton_matches_torch(rng):  # noqa: F811
    ref, tri = decoder_pair(rng)
    feats, mask_features = decoder_inputs(rng)
    with torch.no_grad():
        ref_classes, ref_masks = ref(feats, mask_features)
        classes, masks = tri(feats, mask_features)
        # the set-up must exercise the empty-row rule: some query has no allowed key at some level
        empties = [bool((F_interp(m, LEVEL_SIZES[i % 3]) < 0).all(-1).any()) for i, m in enumerate(ref_masks[:-1])]
    assert any(empties), f"no empty mask in the set-up (seed {rng.seed_value})"
    assert len(classes) == len(ref_classes) == 5
    for i, (c, m, rc, rm) in enumerate(zip(classes, masks, ref_classes, ref_masks)):
        assert rel_err(c, rc) <= 1e-4, f"prediction {i} class logits {rel_err(c, rc):.3g} (seed {rng.seed_value})"
        assert rel_err(m, rm) <= 1e-4, f"prediction {i} mask logits {rel_err(m, rm):.3g} (seed {rng.seed_value})"


def test_decoder_triton_gradients_match_torch(rng):  # noqa: F811
    """Fine-tuning: every parameter's gradient through the Triton backward matches the PyTorch backend."""
    ref, tri = decoder_pair(rng, num_layers=3)
    feats, mask_features = decoder_inputs(rng, batch=1)
    weights = None
    grads = {}
    for name, model in (("torch", ref), ("triton", tri)):
        model.zero_grad()
        classes, masks = model(feats, mask_features)
        if weights is None:
            weights = [torch.randn(t.shape, generator=rng).to(DEVICE) for t in (*classes, *masks)]
        loss = sum((t * w).sum() for t, w in zip((*classes, *masks), weights))
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["torch"].keys() == grads["triton"].keys()
    flat_ref = torch.cat([g.flatten() for g in grads["torch"].values()])
    flat_tri = torch.cat([grads["triton"][n].flatten() for n in grads["torch"]])
    assert rel_err(flat_tri, flat_ref) <= 1e-4, f"all gradients: {rel_err(flat_tri, flat_ref):.3g} (seed {rng.seed_value})"
    for n, g in grads["torch"].items():
        if "cross_attention" in n:  # the parameters whose gradients flow through the kernel's backward first
            assert rel_err(grads["triton"][n], g) <= 1e-4, f"{n}: {rel_err(grads['triton'][n], g):.3g} (seed {rng.seed_value})"


def F_interp(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(masks, size=size, mode="bilinear", align_corners=False).flatten(2)


def tiny_model_pair(gen: torch.Generator):
    """A tiny random Mask2Former built with backend "torch" and the same weights with backend "triton" (both
    attention kernels: deformable attention in the pixel decoder, masked attention in the transformer decoder)."""
    import m2f

    torch.manual_seed(gen.seed_value)
    config = tiny_config(hidden_sizes=(32, 32, 64, 64), encoder_layers=1, queries=6, decoder_layers=3)
    ref = m2f.build_model(config, backend="torch").eval()
    perturb_(ref, gen)
    attn = ref.pixel_decoder.transformer.encoder.layers[0].self_attn
    with torch.no_grad():  # zero-initialised in Deformable DETR: make every query sample its own places / weights
        attn.sampling_offsets.weight.normal_(0.0, 0.5, generator=gen)
        attn.attention_weights.weight.normal_(0.0, 0.5, generator=gen)
        ref.transformer_decoder.mask_embed.layers[-1].bias[0] -= 1.0  # some empty masks
    tri = m2f.build_model(config, backend="triton").eval()
    tri.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(DEVICE), tri.to(DEVICE)


def test_model_with_both_triton_kernels_matches_torch(rng):  # noqa: F811
    ref, tri = tiny_model_pair(rng)
    assert tri.backend == "triton"
    x = torch.randn(1, 3, 70, 98, generator=rng).to(DEVICE)  # odd level sizes: 9x13, 5x7, 3x4
    with torch.no_grad():
        want, got = ref(x), tri(x)
    e_logits, e_masks = rel_err(got.pred_logits, want.pred_logits), rel_err(got.pred_masks, want.pred_masks)
    print(f"triton model vs torch model: logits rel_err {e_logits:.3g}, masks rel_err {e_masks:.3g}")
    assert e_logits <= 1e-4, f"seed {rng.seed_value}: logits rel_err {e_logits:.3g}"
    assert e_masks <= 1e-4, f"seed {rng.seed_value}: masks rel_err {e_masks:.3g}"
    for i, ((c, m), (rc, rm)) in enumerate(zip(got.aux_outputs, want.aux_outputs)):
        assert rel_err(c, rc) <= 1e-4 and rel_err(m, rm) <= 1e-4, f"aux {i} (seed {rng.seed_value})"


def test_model_with_both_triton_kernels_gives_the_same_panoptic_output(rng):  # noqa: F811
    """Official panoptic inference (m2f.postprocess) on the outputs of the Triton and the torch model: the same
    segments (ids, labels, thing / stuff), and the same segment map except at pixels whose decision is a tie
    within rounding in the reference (two queries' score x prob, or the winner's prob and 0.5, within 1e-5).
    The tiny random model is neither confident nor clean, so its classes are pushed away from no-object and the
    thresholds lowered (object 0.3, overlap 0) to keep segments; the assertion below makes sure the comparison is
    not between two empty results (>= 1 segment on 30 of 30 seeds tried; on 1 seed of 40 one tied pixel of 21600
    differed)."""
    from m2f.postprocess import panoptic

    ref, tri = tiny_model_pair(rng)
    with torch.no_grad():
        ref.transformer_decoder.class_embed.bias[:3] += 3.0
        ref.transformer_decoder.class_embed.bias[3] -= 3.0  # no-object
        tri.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 96, generator=rng).to(DEVICE)
    with torch.no_grad():
        want, got = ref(x), tri(x)
    kwargs = dict(image_sizes=[(60, 90)], original_sizes=[(120, 180)], thing_classes=[0, 1],
                  object_mask_threshold=0.3, overlap_threshold=0.0)
    (p_want,) = panoptic(want.pred_logits, want.pred_masks, **kwargs)
    (p_got,) = panoptic(got.pred_logits, got.pred_masks, **kwargs)
    assert len(p_want.segments) > 0, f"no segment kept: the comparison would be vacuous (seed {rng.seed_value})"
    assert [(s.id, s.label, s.is_thing) for s in p_got.segments] == \
        [(s.id, s.label, s.is_thing) for s in p_want.segments], f"seed {rng.seed_value}"
    differ = (p_got.segmentation != p_want.segmentation).cpu()
    n_differ = int(differ.sum())
    for s_got, s_want in zip(p_got.segments, p_want.segments):
        assert abs(s_got.score - s_want.score) <= 1e-5, f"seed {rng.seed_value}"
        assert abs(s_got.area - s_want.area) <= n_differ, f"seed {rng.seed_value}"
    if n_differ:
        ties = near_ties(want.pred_logits[0], want.pred_masks[0], object_mask_threshold=0.3,
                         image_size=(60, 90), original_size=(120, 180))
        assert n_differ <= 1e-3 * differ.numel() and bool(ties.cpu()[differ].all()), \
            f"{n_differ} pixels differ, not all at rounding ties (seed {rng.seed_value})"


def near_ties(logits, masks, object_mask_threshold, image_size, original_size, rtol=1e-5) -> torch.Tensor:
    """(H, W) bool: pixels where the panoptic decision of the official algorithm is within ``rtol`` of a tie."""
    from m2f.postprocess import resize_mask_logits

    scores, labels = logits.float().softmax(-1).max(-1)
    keep = labels.ne(logits.shape[-1] - 1) & (scores > object_mask_threshold)
    padded = (masks.shape[-2] * 4, masks.shape[-1] * 4)
    probs = resize_mask_logits(masks[keep], padded, image_size, original_size).sigmoid()  # (N, H, W)
    weighted = scores[keep].view(-1, 1, 1) * probs
    top = weighted.topk(min(2, weighted.shape[0]), dim=0).values
    tie = (top[0] - top[-1]) <= rtol * top[0] if top.shape[0] == 2 else torch.zeros_like(top[0], dtype=torch.bool)
    winner_prob = probs.gather(0, weighted.argmax(0, keepdim=True))[0]
    return tie | ((winner_prob - 0.5).abs() <= rtol)
