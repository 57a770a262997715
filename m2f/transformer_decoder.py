"""Mask2Former's transformer decoder (official ``MultiScaleMaskedTransformerDecoder``).

Learnable queries go through ``num_layers`` layers, each masked cross-attention -> self-attention -> FFN, the
attended level cycling 1/32 -> 1/16 -> 1/8. A prediction (class logits + mask logits at the mask features'
resolution) is made on the learnable queries and after every layer; its mask logits, resized to the next
layer's level, decide where each query may attend (sigmoid >= 0.5; a query whose mask is empty attends
everywhere), through :func:`m2f.kernels.masked_attention_from_logits`.

Parameter names follow the official module tree (``query_feat``, ``query_embed``, ``level_embed``,
``input_proj.{i}``, ``transformer_{self,cross}_attention_layers.{i}``, ``transformer_ffn_layers.{i}``,
``decoder_norm``, ``class_embed``, ``mask_embed.layers.{i}``); the attention weights keep
``nn.MultiheadAttention``'s packed layout (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) although the
attention itself is computed here, batch first. Pure tensor ops: no data-dependent indexing or branching.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m2f.config import TransformerDecoderConfig
from m2f.errors import ConfigError, InputError
from m2f.kernels import masked_attention_from_logits
from m2f.pixel_decoder import c2_xavier_fill
from m2f.position_encoding import PositionEmbeddingSine


class PackedAttentionProjections(nn.Module):
    """The weights of ``nn.MultiheadAttention`` (packed q/k/v input projection + output projection).

    Only projections live here; the attention op is chosen by the layer using it.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ConfigError(f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}; fix num_heads")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's own init, then the official layers' xavier on every matrix
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, heads, N, C / heads)
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.embed_dim // self.num_heads).transpose(1, 2)

    def project(self, x: torch.Tensor, which: int) -> torch.Tensor:  # (B, N, C) -> (B, heads, N, d); 0 q, 1 k, 2 v
        C = self.embed_dim
        w = self.in_proj_weight[which * C : (which + 1) * C]
        b = self.in_proj_bias[which * C : (which + 1) * C]
        return self.split_heads(F.linear(x, w, b))

    def merge_heads_and_project(self, x: torch.Tensor) -> torch.Tensor:  # (B, heads, N, d) -> (B, N, C)
        B, _, N, _ = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(B, N, self.embed_dim))


class SelfAttentionLayer(nn.Module):
    """Self-attention among the queries; positional embedding added to queries and keys, not values."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False, eps: float = 1e-5):
        super().__init__()
        self.self_attn = PackedAttentionProjections(d_model, nhead)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        self.attn_dropout = dropout

    def _attend(self, x: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        qk_in = x + query_pos
        q = self.self_attn.project(qk_in, 0)  # (B, heads, Q, d)
        k = self.self_attn.project(qk_in, 1)
        v = self.self_attn.project(x, 2)
        p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, heads, Q, d)
        return self.self_attn.merge_heads_and_project(out)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:  # (B, Q, C)
        if self.normalize_before:
            return tgt + self.dropout(self._attend(self.norm(tgt), query_pos))
        return self.norm(tgt + self.dropout(self._attend(tgt, query_pos)))


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention from the queries to one level of pixel features."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dropout: float = 0.0,
        normalize_before: bool = False,
        eps: float = 1e-5,
        backend: str = "torch",
    ):
        super().__init__()
        self.multihead_attn = PackedAttentionProjections(d_model, nhead)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        self.backend = backend

    def _attend(
        self, x: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor, mask_logits: torch.Tensor
    ) -> torch.Tensor:
        q = self.multihead_attn.project(x + query_pos, 0)  # (B, heads, Q, d)
        k = self.multihead_attn.project(memory + pos, 1)  # (B, heads, HW, d)
        v = self.multihead_attn.project(memory, 2)  # (B, heads, HW, d)
        out = masked_attention_from_logits(q, k, v, mask_logits, backend=self.backend)  # (B, heads, Q, d)
        return self.multihead_attn.merge_heads_and_project(out)

    def forward(
        self,
        tgt: torch.Tensor,  # (B, Q, C)
        memory: torch.Tensor,  # (B, HW, C)
        mask_logits: torch.Tensor,  # (B, Q, HW): may attend where >= 0
        pos: torch.Tensor,  # (1 or B, HW, C)
        query_pos: torch.Tensor,  # (1 or B, Q, C)
    ) -> torch.Tensor:  # (B, Q, C)
        if self.normalize_before:
            return tgt + self.dropout(self._attend(self.norm(tgt), memory, pos, query_pos, mask_logits))
        return self.norm(tgt + self.dropout(self._attend(tgt, memory, pos, query_pos, mask_logits)))


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0, normalize_before: bool = False, eps: float = 1e-5):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:  # (B, Q, C)
        if self.normalize_before:
            return tgt + self.dropout(self._ffn(self.norm(tgt)))
        return self.norm(tgt + self.dropout(self._ffn(tgt)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the mask embedding head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Official ``MultiScaleMaskedTransformerDecoder``.

    Args:
        in_channels: channels of the pixel decoder's multi-scale features (its ``conv_dim``).
        num_classes: classes without "no object"; the class head has ``num_classes + 1`` outputs.
        mask_dim: channels of the mask features.
        config: decoder sizes.
        backend: kernel backend of the masked cross-attention ("torch", "triton", "auto"), handed to the
            cross-attention layers (which hold it; the op checks the name when it runs).
    """

    num_feature_levels = 3  # always three scales

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        mask_dim: int,
        config: TransformerDecoderConfig = TransformerDecoderConfig(),
        backend: str = "torch",
    ) -> None:
        super().__init__()
        self.config = config
        hidden, heads, eps = config.hidden_dim, config.num_heads, config.layer_norm_eps
        self.num_heads = heads
        self.num_layers = config.num_layers
        self.pe_layer = PositionEmbeddingSine(hidden // 2)

        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden, heads, config.dropout, config.pre_norm, eps) for _ in range(config.num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden, heads, config.dropout, config.pre_norm, eps, backend=backend)
            for _ in range(config.num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden, config.ffn_dim, config.dropout, config.pre_norm, eps) for _ in range(config.num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden, eps=eps)
        self.num_queries = config.num_queries
        self.query_feat = nn.Embedding(config.num_queries, hidden)  # learnable query features
        self.query_embed = nn.Embedding(config.num_queries, hidden)  # learnable query positional embedding
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden or config.enforce_input_proj:
                conv = nn.Conv2d(in_channels, hidden, kernel_size=1)
                c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.class_embed = nn.Linear(hidden, num_classes + 1)
        self.mask_embed = MLP(hidden, hidden, mask_dim, config.mask_mlp_layers)

    def forward_prediction_heads(
        self,
        output: torch.Tensor,  # (B, Q, C)
        mask_features: torch.Tensor,  # (B, mask_dim, H, W)
        attn_mask_target_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (B, Q, K+1), (B, Q, H, W), (B, Q, h*w)
        decoder_output = self.decoder_norm(output)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        # logits at the next level's size; the kernel allows attention where they are >= 0 (sigmoid >= 0.5).
        # Detached as in the official code: no gradient flows through the attention mask.
        attn_logits = F.interpolate(outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False)
        return outputs_class, outputs_mask, attn_logits.flatten(2).detach()

    def forward(
        self,
        x: list[torch.Tensor] | tuple[torch.Tensor, ...],  # 3 maps (B, C_in, h_l, w_l), coarsest first
        mask_features: torch.Tensor,  # (B, mask_dim, H, W)
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # per prediction: (B, Q, K+1) logits, (B, Q, H, W) masks
        if len(x) != self.num_feature_levels:
            raise InputError(f"expected {self.num_feature_levels} feature maps (coarsest first), got {len(x)}")
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append((x[i].shape[-2], x[i].shape[-1]))
            pos.append(self.pe_layer(x[i]).to(x[i].dtype).flatten(2).transpose(1, 2))  # (1, HW, C)
            feat = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]  # (B, C, HW)
            src.append(feat.transpose(1, 2))  # (B, HW, C)

        B = src[0].shape[0]
        query_embed = self.query_embed.weight.unsqueeze(0)  # (1, Q, C)
        output = self.query_feat.weight.unsqueeze(0).expand(B, -1, -1)  # (B, Q, C)

        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, attn_logits = self.forward_prediction_heads(output, mask_features, size_list[0])
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)

        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](output, src[level], attn_logits, pos[level], query_embed)
            output = self.transformer_self_attention_layers[i](output, query_embed)
            output = self.transformer_ffn_layers[i](output)
            outputs_class, outputs_mask, attn_logits = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels]
            )
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)
        return predictions_class, predictions_mask
