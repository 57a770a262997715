"""Mask2Former's pixel decoder (official ``MSDeformAttnPixelDecoder``).

res3..res5 are projected to ``conv_dim`` channels (1x1 conv + GroupNorm), refined jointly by a stack of
multi-scale deformable-attention encoder layers (Deformable DETR, post-norm), and the finer backbone levels
(res2 for ``common_stride`` 4) are merged in FPN style. Outputs the per-pixel embeddings at ``common_stride``
(``mask_features``) and the three coarsest refined maps the transformer decoder attends to.

Parameter names follow the official module tree, so an official checkpoint's ``sem_seg_head.pixel_decoder.*``
loads with a prefix rename: ``input_proj.{i}.{0,1}``, ``transformer.level_embed``,
``transformer.encoder.layers.{i}.{self_attn.*, norm1, linear1, linear2, norm2}``, ``adapter_{i}`` / ``layer_{i}``
(conv weight + ``.norm``), ``mask_features``.

Everything is traced-shape friendly: spatial sizes come from tensor shapes as Python (or symbolic) ints, the
reference points are built with ``arange`` in float32, and the attention op is :func:`m2f.kernels.ms_deform_attn`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from m2f.config import PixelDecoderConfig
from m2f.errors import ConfigError
from m2f.kernels import ms_deform_attn
from m2f.position_encoding import PositionEmbeddingSine

Shapes = list[tuple[int, int]]


def c2_xavier_fill(module: nn.Conv2d | nn.Linear) -> None:
    """Caffe2's "XavierFill" as detectron2 implements it (kaiming uniform with a=1, zero bias)."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class Conv2dNorm(nn.Conv2d):
    """Conv2d followed by an optional ``norm`` and activation (detectron2's ``layers.Conv2d`` parameter layout)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        bias: bool = True,
        norm: nn.Module | None = None,
        activation: bool = False,
        padding: int = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.norm = norm
        self.use_relu = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.use_relu:
            x = F.relu(x)
        return x


class MultiScaleDeformableAttention(nn.Module):
    """Deformable DETR's ``MSDeformAttn`` with 2-d reference points (encoder use: queries are the pixels)."""

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4, backend: str = "torch"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ConfigError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}; fix pixel_decoder.num_heads")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of directions, one per head, radius 1..P per point."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (M, 2)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)  # (M, L, P, 2)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,  # (N, Lq, C), position embedding already added
        reference_points: torch.Tensor,  # (1 or N, Lq, 2) as (x, y) in [0, 1], shared by all levels
        input_flatten: torch.Tensor,  # (N, S, C), S = sum of H_l * W_l
        spatial_shapes: Shapes,  # L pairs (H_l, W_l)
    ) -> torch.Tensor:  # (N, Lq, C)
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten).view(N, S, M, self.d_model // M)  # (N, S, M, D)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P)
        weights = F.softmax(weights, -1).view(N, Lq, M, L, P)
        # offsets are in pixels of each level: normalise by that level's (W, H)
        normalizer = torch.tensor(
            [[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device
        )  # (L, 2)
        locations = reference_points[:, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn(value, spatial_shapes, None, locations, weights, backend=self.backend)  # (N, Lq, C)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then a ReLU FFN."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.0,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
        layer_norm_eps: float = 1e-5,
        backend: str = "torch",
    ) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(
        self,
        src: torch.Tensor,  # (N, S, C)
        pos: torch.Tensor,  # (1 or N, S, C) position + level embedding
        reference_points: torch.Tensor,  # (1, S, 2)
        spatial_shapes: Shapes,
    ) -> torch.Tensor:  # (N, S, C)
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


def encoder_reference_points(spatial_shapes: Shapes, device: torch.device) -> torch.Tensor:  # (1, S, 2)
    """Pixel centres of every level, (x, y) normalised to [0, 1], flattened level by level in float32."""
    points = []
    for h, w in spatial_shapes:
        ref_y = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h  # (H,)
        ref_x = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w  # (W,)
        ref = torch.stack((ref_x[None, :].expand(h, w), ref_y[:, None].expand(h, w)), dim=-1)  # (H, W, 2)
        points.append(ref.reshape(h * w, 2))
    return torch.cat(points, 0).unsqueeze(0)


class DeformableEncoder(nn.Module):
    """The stack of encoder layers (official ``MSDeformAttnTransformerEncoder``)."""

    def __init__(self, layers: Sequence[DeformableEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, spatial_shapes: Shapes) -> torch.Tensor:
        reference_points = encoder_reference_points(spatial_shapes, src.device).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes)
        return src


class DeformableTransformerEncoder(nn.Module):
    """Flattens the projected levels, adds level embeddings and runs the encoder (``MSDeformAttnTransformerEncoderOnly``)."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_feature_levels: int = 3,
        enc_n_points: int = 4,
        layer_norm_eps: float = 1e-5,
        backend: str = "torch",
    ) -> None:
        super().__init__()
        self.encoder = DeformableEncoder(
            [
                DeformableEncoderLayer(
                    d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points, layer_norm_eps, backend
                )
                for _ in range(num_encoder_layers)
            ]
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: Sequence[torch.Tensor],  # L maps (N, C, H_l, W_l), coarsest first
        pos_embeds: Sequence[torch.Tensor],  # L maps (1, C, H_l, W_l)
    ) -> tuple[torch.Tensor, Shapes]:  # (N, S, C), [(H_l, W_l)]
        spatial_shapes = [(src.shape[-2], src.shape[-1]) for src in srcs]
        src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)  # (N, S, C)
        pos_flat = torch.cat(
            [pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, pos in enumerate(pos_embeds)],
            1,
        )  # (1, S, C)
        return self.encoder(src_flat, pos_flat, spatial_shapes), spatial_shapes


@dataclass(frozen=True)
class PixelDecoderOutput:
    """``mask_features``: (B, mask_dim, H/common_stride, W/common_stride) per-pixel embeddings.
    ``multi_scale_features``: three maps (B, conv_dim, h, w) for the transformer decoder, coarsest (1/32) first."""

    mask_features: torch.Tensor
    multi_scale_features: tuple[torch.Tensor, ...]


# a pytree node, so that torch.export / torch.compile can return it
torch.export.register_dataclass(PixelDecoderOutput, serialized_type_name="m2f.pixel_decoder.PixelDecoderOutput")


class MSDeformAttnPixelDecoder(nn.Module):
    """Official ``MSDeformAttnPixelDecoder`` (GroupNorm convs; deformable encoder over the coarsest levels).

    Args:
        in_channels: channels of each backbone feature, e.g. ``{"res2": 256, ..., "res5": 2048}``.
        in_strides: stride of each backbone feature, e.g. ``{"res2": 4, ..., "res5": 32}``.
        config: sizes of the decoder.
        backend: kernel backend of :func:`m2f.kernels.ms_deform_attn` ("torch", "triton", "auto"), handed to the
            deformable-attention layers (which hold it; the op checks the name when it runs).
    """

    maskformer_num_feature_levels = 3  # the transformer decoder always takes three scales

    def __init__(
        self,
        in_channels: Mapping[str, int],
        in_strides: Mapping[str, int],
        config: PixelDecoderConfig = PixelDecoderConfig(),
        backend: str = "torch",
    ) -> None:
        super().__init__()
        self.config = config
        conv_dim, groups = config.conv_dim, config.norm_groups
        names = sorted(in_channels, key=lambda k: in_strides[k])  # finest first: res2 .. res5
        if len(names) < config.num_feature_levels:
            raise ConfigError(
                f"pixel_decoder.num_feature_levels is {config.num_feature_levels} but the backbone has only {names}"
            )
        self.in_features = names
        self.transformer_in_features = names[-config.num_feature_levels :]
        min_stride = in_strides[self.transformer_in_features[0]]
        self.num_fpn_levels = int(round(math.log2(min_stride) - math.log2(config.common_stride)))

        # coarsest (res5) first, as the official order
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[name], conv_dim, kernel_size=1), nn.GroupNorm(groups, conv_dim))
            for name in self.transformer_in_features[::-1]
        )
        self.transformer = DeformableTransformerEncoder(
            d_model=conv_dim,
            nhead=config.num_heads,
            num_encoder_layers=config.num_encoder_layers,
            dim_feedforward=config.ffn_dim,
            dropout=config.dropout,
            num_feature_levels=config.num_feature_levels,
            enc_n_points=config.num_points,
            layer_norm_eps=config.layer_norm_eps,
            backend=backend,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)
        self.mask_features = nn.Conv2d(conv_dim, config.mask_dim, kernel_size=1)

        lateral, output = [], []
        for idx, name in enumerate(self.in_features[: self.num_fpn_levels]):
            lateral_conv = Conv2dNorm(in_channels[name], conv_dim, 1, bias=False, norm=nn.GroupNorm(groups, conv_dim))
            output_conv = Conv2dNorm(
                conv_dim, conv_dim, 3, padding=1, bias=False, norm=nn.GroupNorm(groups, conv_dim), activation=True
            )
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral.append(lateral_conv)
            output.append(output_conv)
        # top-down order (low to high resolution); plain lists so the parameters keep their official names
        self._lateral_convs = lateral[::-1]
        self._output_convs = output[::-1]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.transformer.reset_parameters()
        c2_xavier_fill(self.mask_features)
        for conv in (*self._lateral_convs, *self._output_convs):
            c2_xavier_fill(conv)

    def forward(self, features: Mapping[str, torch.Tensor]) -> PixelDecoderOutput:
        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features[::-1]):  # res5, res4, res3
            x = features[name]
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x).to(x.dtype))
        memory, spatial_shapes = self.transformer(srcs, pos)  # (B, S, C)

        B = memory.shape[0]
        levels = memory.split([h * w for h, w in spatial_shapes], dim=1)
        out = [z.transpose(1, 2).reshape(B, -1, h, w) for z, (h, w) in zip(levels, spatial_shapes)]

        # FPN levels finer than the encoder's, top-down
        for idx, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            cur = self._lateral_convs[idx](features[name])
            # the official comment says "nearest" but the code (and every checkpoint) uses bilinear
            y = cur + F.interpolate(out[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False)
            out.append(self._output_convs[idx](y))

        return PixelDecoderOutput(
            mask_features=self.mask_features(out[-1]),
            multi_scale_features=tuple(out[: self.maskformer_num_feature_levels]),
        )
