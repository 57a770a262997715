"""Mask2Former with the Triton deformable attention in its pixel decoder against the PyTorch backend.

The masked-attention Triton kernel is another branch's work, so the Triton model here is the official module
tree with only the pixel decoder built with backend="triton" (same weights): backbone -> pixel decoder (Triton)
-> transformer decoder, compared with the whole model built with backend="torch". Runs the kernels in
Triton's interpreter on a tiny config.
"""
from __future__ import annotations


import torch

import m2f
from m2f.config import Mask2FormerConfig, PixelDecoderConfig, ResNetConfig, TransformerDecoderConfig
from m2f.pixel_decoder import MSDeformAttnPixelDecoder
from tests.utils import rel_err




# The kernels run on the GPU where there is one, else in the interpreter on the CPU (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_config() -> Mask2FormerConfig:
    return Mask2FormerConfig(
        backbone=ResNetConfig(depths=(1, 1, 1, 1), stem_channels=16, hidden_sizes=(32, 32, 64, 64)),
        # 4 heads of 8 channels, 3 levels, 4 points: the official structure at a size the interpreter can run.
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32, num_encoder_layers=1, num_heads=4, ffn_dim=64),
        transformer_decoder=TransformerDecoderConfig(hidden_dim=32, num_queries=6, num_heads=4, ffn_dim=64,
                                                     num_layers=2),
        num_classes=3,
    )


def test_model_with_triton_pixel_decoder_matches_torch_backend(rng):
    torch.manual_seed(rng.seed_value)
    config = tiny_config()
    model = m2f.build_model(config, backend="torch").eval()
    attn = model.pixel_decoder.transformer.encoder.layers[0].self_attn
    with torch.no_grad():  # Deformable DETR zero-inits these; make every query sample its own places / weights
        attn.sampling_offsets.weight.normal_(0.0, 0.5, generator=rng)
        attn.attention_weights.weight.normal_(0.0, 0.5, generator=rng)
    pixel_decoder = MSDeformAttnPixelDecoder(
        dict(model.backbone.out_channels), dict(model.backbone.out_strides), config.pixel_decoder, backend="triton"
    )
    pixel_decoder.load_state_dict(model.pixel_decoder.state_dict())
    pixel_decoder.eval()
    model.to(DEVICE), pixel_decoder.to(DEVICE)

    x = torch.randn(1, 3, 70, 98, generator=rng).to(DEVICE)  # odd level sizes: 9x13, 5x7, 3x4
    ref = model(x)
    pix = pixel_decoder(model.backbone(x))
    classes, masks = model.transformer_decoder(pix.multi_scale_features, pix.mask_features)
    e_logits, e_masks = rel_err(classes[-1], ref.pred_logits), rel_err(masks[-1], ref.pred_masks)
    print(f"triton pixel decoder vs torch model: logits rel_err {e_logits:.3g}, masks rel_err {e_masks:.3g}")
    assert e_logits <= 1e-4, f"seed {rng.seed_value}: logits rel_err {e_logits:.3g}"
    assert e_masks <= 1e-4, f"seed {rng.seed_value}: masks rel_err {e_masks:.3g}"

    # Training: the pixel decoder's parameter gradients through the Triton backward match too.
    weights = [torch.randn(t.shape, generator=rng).to(DEVICE) for t in (ref.pred_logits, ref.pred_masks)]
    loss_ref = (ref.pred_logits * weights[0]).sum() + (ref.pred_masks * weights[1]).sum()
    loss = (classes[-1] * weights[0]).sum() + (masks[-1] * weights[1]).sum()
    names = [n for n, _ in model.pixel_decoder.named_parameters()]
    grads_ref = torch.autograd.grad(loss_ref, list(model.pixel_decoder.parameters()))
    grads = torch.autograd.grad(loss, list(pixel_decoder.parameters()))
    flat = rel_err(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in grads_ref]))
    print(f"pixel decoder parameter gradients: rel_err {flat:.3g}")
    assert flat <= 1e-4, f"seed {rng.seed_value}: pixel decoder gradients rel_err {flat:.3g}"
    # The deformable attention's own projections one by one: their gradients go through all three of the
    # kernel's (value, locations, weights). (Biases ahead of a GroupNorm get only rounding noise: not compared.)
    checked = [name for name in names if ".self_attn." in name]
    assert len(checked) == 8, checked  # weight and bias of sampling_offsets, attention_weights, value / output_proj
    for name, g, g_ref in zip(names, grads, grads_ref):
        if name in checked:
            err = rel_err(g, g_ref)
            assert err <= 1e-4, f"seed {rng.seed_value}: grad {name} rel_err {err:.3g}"
