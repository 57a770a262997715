"""Swin Transformer backbone with the semantics and parameter names of the official D2SwinTransformer.

Follows facebookresearch/Mask2Former ``mask2former/modeling/backbone/swin.py`` (itself the Swin
segmentation backbone): the input is padded on the right / bottom to a multiple of the patch size; inside
every block the (normalised) feature map is zero-padded on the right / bottom to a multiple of the window
size, and the padded tokens take part in window attention exactly as in the original (only the cyclic-shift
regions are masked, with -100); patch merging pads odd sizes. The window size and shift never change with
the resolution (Hugging Face's ``SwinModel`` shrinks the window and drops the shift when a stage is not
larger than the window; the official backbone does not, and neither do we).

Parameter names equal the official checkpoint's ``backbone.*`` keys: ``patch_embed.{proj,norm}``,
``layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj, attn.relative_position_bias_table,
attn.relative_position_index, norm2, mlp.fc1, mlp.fc2}``, ``layers.{i}.downsample.{reduction, norm}``,
``norm0..norm3`` (and ``absolute_pos_embed`` when ``ape``).

Internally feature maps stay channels-last, (B, H, W, C). Every size comes from ``tensor.shape`` and nothing
branches on tensor values: the module traces (torch.jit, the TorchScript ONNX exporter) with dynamic batch,
H and W, and torch.export exports it at fixed sizes (with dynamic H, W, torch.export still trips over shape
guards inside reshape / cat on the padded sizes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.errors import ConfigError

STAGE_NAMES = ("res2", "res3", "res4", "res5")
STAGE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
# Added to attention logits between tokens of different cyclic-shift regions (the official value, not -inf).
SHIFT_MASK_VALUE = -100.0


def _round_up(size: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` >= ``size`` (a ceil-division: symbolic shapes simplify it better than %)."""
    return (size + multiple - 1) // multiple * multiple


def relative_position_index(window_size: int) -> Tensor:
    """(ws*ws, ws*ws) int64: for tokens i, j of a window, the row of the bias table for their offset.

    Offsets (dh, dw) in [-(ws-1), ws-1]^2 map to (dh + ws - 1) * (2*ws - 1) + (dw + ws - 1).
    """
    coords = torch.arange(window_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # (N,), N = ws*ws, row-major order inside the window
    d_rows = rows[:, None] - rows[None, :] + (window_size - 1)  # (N, N)
    d_cols = cols[:, None] - cols[None, :] + (window_size - 1)  # (N, N)
    return d_rows * (2 * window_size - 1) + d_cols


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, Hp, Wp, C), Hp and Wp multiples of ws -> (B, nH, nW, ws*ws, C), tokens row-major in each window.

    The window grid stays as two dimensions instead of being merged into the batch: fewer reshapes of
    symbolic sizes when exporting with dynamic H, W.
    """
    Hp, Wp = x.shape[1], x.shape[2]
    x = x.unflatten(1, (Hp // window_size, window_size)).unflatten(3, (Wp // window_size, window_size))
    return x.permute(0, 1, 3, 2, 4, 5).flatten(3, 4)  # (B, nH, nW, ws, ws, C) -> (B, nH, nW, N, C)


def window_merge(windows: Tensor, window_size: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B, nH, nW, ws*ws, C) -> (B, nH*ws, nW*ws, C)."""
    x = windows.unflatten(3, (window_size, window_size)).permute(0, 1, 3, 2, 4, 5).contiguous()
    return x.flatten(1, 2).flatten(2, 3)  # (B, nH, ws, nW, ws, C) -> (B, Hp, Wp, C)


def shifted_window_mask(
    Hp: int, Wp: int, window_size: int, shift_size: int, *, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """(nH, nW, ws*ws, ws*ws) additive mask for shifted windows on a padded (Hp, Wp) map: 0 or -100.

    After the cyclic shift by -shift, each axis splits into three regions, [0, L - ws), [L - ws, L - shift)
    and [L - shift, L); tokens may attend to each other only when they lie in the same region pair.
    """
    rows = torch.arange(Hp, device=device)
    cols = torch.arange(Wp, device=device)
    row_region = (rows >= Hp - window_size).long() + (rows >= Hp - shift_size).long()  # (Hp,) in {0, 1, 2}
    col_region = (cols >= Wp - window_size).long() + (cols >= Wp - shift_size).long()  # (Wp,)
    region = (row_region[:, None] * 3 + col_region[None, :])[None, :, :, None]  # (1, Hp, Wp, 1)
    region = window_partition(region, window_size)[0, ..., 0]  # (nH, nW, N)
    different = region[..., :, None] != region[..., None, :]  # (nH, nW, N, N)
    return different.to(dtype) * SHIFT_MASK_VALUE


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p and scale the rest
    by 1 / (1 - p). Identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob if keep_prob > 0.0 else x * keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias per head."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Persistent like the official buffer, so state_dict keys match the official checkpoints.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> Tensor:
        """(heads, N, N) with N = ws*ws."""
        N = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]  # (N*N, heads)
        return bias.reshape(N, N, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, nH, nW, N, C) windows; mask: (nH, nW, N, N) additive, or None. Returns (B, nH, nW, N, C)."""
        C = x.shape[-1]
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, C // self.num_heads))  # (B, nH, nW, N, 3, h, hd)
        q, k, v = qkv.permute(4, 0, 1, 2, 5, 3, 6).unbind(0)  # (B, nH, nW, h, N, hd) each
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, nH, nW, h, N, N)
        attn = attn + self.relative_position_bias()  # (h, N, N) broadcast over windows
        if mask is not None:
            attn = attn + mask.unsqueeze(-3)  # (nH, nW, 1, N, N)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(-3, -2).flatten(-2)  # (B, nH, nW, N, h*hd)
        return self.proj(out)


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention and MLP, both pre-norm residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ConfigError(f"shift_size must be in [0, window_size), got {shift_size} for window {window_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, shift_mask: Tensor | None) -> Tensor:
        """x: (B, H, W, C); shift_mask: (nH, nW, N, N) for the padded map, used when this block shifts."""
        H, W = x.shape[1], x.shape[2]
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x)
        # Zero-pad right / bottom to multiples of the window, after the norm (as the original).
        x = F.pad(x, (0, 0, 0, _round_up(W, ws) - W, 0, _round_up(H, ws) - H))
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.attn(window_partition(x, ws), mask=shift_mask if shift > 0 else None)
        x = window_merge(windows, ws)  # (B, Hp, Wp, C)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :H, :W]
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (odd sizes zero-padded) -> LayerNorm(4C) -> Linear(4C, 2C): (B, H, W, C) ->
    (B, ceil(H/2), ceil(W/2), 2C)."""

    def __init__(self, dim: int, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[1], x.shape[2]
        x = F.pad(x, (0, 0, 0, _round_up(W, 2) - W, 0, _round_up(H, 2) - H))
        # Order (row, col) = (0,0), (1,0), (0,1), (1,1), as the official concat.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating plain and shifted windows, then an optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: tuple[float, ...] | list[float] = (),
        layer_norm_eps: float = 1e-5,
        downsample: bool = False,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else self.shift_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_path[i],
                layer_norm_eps=layer_norm_eps,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, layer_norm_eps) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """x: (B, H, W, C) -> (stage output (B, H, W, C), merged (B, ceil(H/2), ceil(W/2), 2C) or None)."""
        H, W = x.shape[1], x.shape[2]
        ws = self.window_size
        shift_mask = None
        if self.shift_size > 0 and len(self.blocks) > 1:
            Hp, Wp = _round_up(H, ws), _round_up(W, ws)
            shift_mask = shifted_window_mask(Hp, Wp, ws, self.shift_size, device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, shift_mask)
        return x, (self.downsample(x) if self.downsample is not None else None)


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size conv (input zero-padded right / bottom), optional LayerNorm."""

    def __init__(
        self, patch_size: int = 4, in_channels: int = 3, embed_dim: int = 96, *, norm: bool = True,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, ceil(H/p), ceil(W/p), C)."""
        H, W = x.shape[2], x.shape[3]
        p = self.patch_size
        x = F.pad(x, (0, _round_up(W, p) - W, 0, _round_up(H, p) - H))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class SwinTransformer(nn.Module):
    """Swin backbone returning ``{"res2": (B, C, H/4, W/4), ..., "res5": (B, 8C, H/32, W/32)}`` (sizes rounded up)."""

    def __init__(
        self,
        *,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        patch_size: int = 4,
        pretrain_img_size: int = 224,
        drop_path_rate: float = 0.3,
        ape: bool = False,
        patch_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        in_channels: int = 3,
    ):
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ConfigError(
                f"Swin needs 4 stages (res2..res5); got depths={tuple(depths)}, num_heads={tuple(num_heads)}"
            )
        if min(depths) < 1:
            raise ConfigError(f"every Swin stage needs at least one block; got depths={tuple(depths)}")
        dims = [embed_dim * 2**i for i in range(4)]
        for dim, heads in zip(dims, num_heads):
            if heads < 1 or dim % heads:
                raise ConfigError(f"Swin stage width {dim} is not divisible by its num_heads {heads}; fix num_heads")
        if window_size < 1 or patch_size < 1:
            raise ConfigError(f"window_size and patch_size must be >= 1, got {window_size} and {patch_size}")
        if patch_size * 8 != STAGE_STRIDES["res5"]:
            raise ConfigError(f"patch_size must be 4 (res2..res5 at strides 4..32), got {patch_size}")

        self.ape = ape
        self.patch_embed = PatchEmbed(
            patch_size, in_channels, embed_dim, norm=patch_norm, layer_norm_eps=layer_norm_eps
        )
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)

        # Stochastic depth rises linearly from 0 to drop_path_rate over all blocks (torch.linspace in the original).
        total = sum(depths)
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.layers.append(
                BasicLayer(
                    dims[i],
                    depth,
                    heads,
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=rates[start : start + depth],
                    layer_norm_eps=layer_norm_eps,
                    downsample=i < 3,
                )
            )
        for i, dim in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(dim, eps=layer_norm_eps))
        self._init_weights()

        self.out_channels: dict[str, int] = dict(zip(STAGE_NAMES, dims))
        self.out_strides: dict[str, int] = dict(STAGE_STRIDES)

    def _init_weights(self) -> None:
        # Swin's init (truncated normal Linear weights, zero biases, unit LayerNorms); checkpoints overwrite it.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # x: (B, 3, H, W)
        x = self.patch_embed(x)  # (B, Wh, Ww, C)
        if self.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=(x.shape[1], x.shape[2]), mode="bicubic")
            x = x + pos.permute(0, 2, 3, 1)
        outputs = {}
        for i, (name, layer) in enumerate(zip(STAGE_NAMES, self.layers)):
            stage_out, x = layer(x)
            stage_out = getattr(self, f"norm{i}")(stage_out)  # (B, H_i, W_i, C_i)
            outputs[name] = stage_out.permute(0, 3, 1, 2).contiguous()  # (B, C_i, H_i, W_i)
        return outputs
