"""Multi-scale deformable attention (Deformable DETR / Mask2Former pixel decoder).

* ``naive.py``          - the plain-PyTorch (grid_sample) reference every fast version is tested against.
* ``triton_kernels.py`` - the fused Triton forward / backward kernels and their launchers.
* ``op.py``             - ``torch.ops.m2f.ms_deform_attn``: the kernels as one custom op (fake impl + autograd).
* ``aot_build.py``      - ahead-of-time builds of both kernels for sm_90 / sm_87 (registers, shared memory, spills).

Dtypes of the "triton" backend: ``value`` float32, float16 or bfloat16; ``sampling_locations`` and
``attention_weights`` each either value's dtype or float32 (float32 locations keep sub-pixel precision on large
maps: bfloat16 has 8 significant bits; under autocast the model passes float16 value with float32 locations and
weights). Accumulation is float32; the output has value's dtype and each gradient its input's dtype. Offsets
inside one batch element are int32: S * M * D and Q * M * L * P * 2 must stay below 2^31.
"""
from __future__ import annotations

import functools

import torch

from m2f.errors import BackendUnavailableError, InputError

from .._backend import resolve_backend
from .naive import Shapes, level_shapes, ms_deform_attn_torch
from .op import ms_deform_attn_op

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def ms_deform_attn(
    value: torch.Tensor,  # (N, S, M, D)
    spatial_shapes: torch.Tensor | Shapes,  # (L, 2) int (H, W), or a sequence of (H, W)
    level_start_index: torch.Tensor | None,  # (L,) int: offset of each level in S (derived when None)
    sampling_locations: torch.Tensor,  # (N, Lq, M, L, P, 2), (x, y) in [0, 1]
    attention_weights: torch.Tensor,  # (N, Lq, M, L, P)
    backend: str = "auto",
) -> torch.Tensor:  # (N, Lq, M * D)
    """Multi-scale deformable attention with the official op's argument layout.

    Bilinear sampling with align_corners=False (pixel centres at (i + 0.5) / W), each corner outside its map
    contributing zero; differentiable in value, sampling_locations and attention_weights on both backends.
    """
    backend = resolve_backend(backend, value.device)
    if backend == "torch":
        return ms_deform_attn_torch(value, spatial_shapes, sampling_locations, attention_weights)
    shapes_t, starts_t = shape_tensors(spatial_shapes, level_start_index, value.device)
    check_inputs(value, shapes_t, starts_t, sampling_locations, attention_weights)
    if isinstance(spatial_shapes, (list, tuple)) and all(isinstance(x, int) for hw in spatial_shapes for x in hw):
        total = sum(h * w for h, w in spatial_shapes)
        if total != value.shape[1]:
            raise InputError(
                f"ms_deform_attn: value has {value.shape[1]} keys but the spatial shapes {list(spatial_shapes)} "
                f"hold {total}; pass the (H, W) of every level whose flattened maps make up value"
            )
    return ms_deform_attn_op(value, shapes_t, starts_t, sampling_locations, attention_weights)


def shape_tensors(
    spatial_shapes: torch.Tensor | Shapes, level_start_index: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:  # (L, 2) and (L,) int64 on ``device``
    """``spatial_shapes`` as an (L, 2) int tensor on ``device`` and ``level_start_index`` (derived when None)."""
    if isinstance(spatial_shapes, torch.Tensor):
        shapes_t = spatial_shapes if spatial_shapes.device == device else spatial_shapes.to(device)
    else:
        try:
            pairs = [(h, w) for h, w in spatial_shapes]
        except (TypeError, ValueError):
            raise InputError(
                f"ms_deform_attn: spatial_shapes must be an (L, 2) int tensor or a list of (H, W) pairs, got "
                f"{spatial_shapes!r}"
            ) from None
        if level_start_index is None and not torch.compiler.is_compiling() and all(
            type(x) is int for hw in pairs for x in hw
        ):
            # Eager calls with plain ints (the model's, six times a forward): reuse the device tensors
            # instead of a host-to-device copy per call. Traced calls build them in the graph instead.
            return _cached_shape_tensors(tuple(pairs), device)
        shapes_t = torch.tensor(pairs, dtype=torch.int64, device=device)
        if level_start_index is None:  # plain (or symbolic) ints: a constant, no ops in an exported graph
            starts = [0]
            for h, w in pairs[:-1]:
                starts.append(starts[-1] + h * w)
            level_start_index = torch.tensor(starts, dtype=torch.int64, device=device)
    if shapes_t.dim() != 2 or shapes_t.shape[-1] != 2 or shapes_t.dtype not in (torch.int32, torch.int64):
        raise InputError(
            f"ms_deform_attn: spatial_shapes must be an (L, 2) int32/int64 tensor or a list of (H, W), got "
            f"{tuple(shapes_t.shape)} {shapes_t.dtype}"
        )
    if level_start_index is None:
        sizes = shapes_t[:, 0] * shapes_t[:, 1]
        level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    if level_start_index.device != device:
        level_start_index = level_start_index.to(device)
    return shapes_t, level_start_index


@functools.lru_cache(maxsize=64)
def _cached_shape_tensors(
    pairs: tuple[tuple[int, int], ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = [0]
    for h, w in pairs[:-1]:
        starts.append(starts[-1] + h * w)
    return (torch.tensor(pairs, dtype=torch.int64, device=device),
            torch.tensor(starts, dtype=torch.int64, device=device))


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Shapes, dtypes and devices the Triton op accepts; raises InputError / BackendUnavailableError naming the fix."""
    if value.dim() != 4:
        raise InputError(f"ms_deform_attn: value must be (N, S, M, D), got shape {tuple(value.shape)}")
    N, _, M, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise InputError(
            f"ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got {tuple(sampling_locations.shape)}"
        )
    _, _, _, L, _, _ = sampling_locations.shape
    if sampling_locations.shape[0] != N or sampling_locations.shape[2] != M:
        raise InputError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} in batch (dim 0) or heads (dim 2)"
        )
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:-1]):
        raise InputError(
            f"ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = {tuple(sampling_locations.shape[:-1])}, "
            f"got {tuple(attention_weights.shape)}"
        )
    if spatial_shapes.shape[0] != L or tuple(level_start_index.shape) != (L,):
        raise InputError(
            f"ms_deform_attn: sampling_locations has {L} levels but spatial_shapes is {tuple(spatial_shapes.shape)} "
            f"and level_start_index {tuple(level_start_index.shape)}; pass one (H, W) and one start per level"
        )
    _, S, _, D = value.shape
    _, Q, _, _, P, _ = sampling_locations.shape
    sizes = (S * M * D, Q * M * L * P * 2)
    if all(isinstance(x, int) for x in sizes) and max(sizes) >= 2**31:
        raise InputError(
            f"ms_deform_attn (triton): one batch element holds {max(sizes)} values, more than the kernel's int32 "
            "offsets reach (2^31); split the queries or the image into smaller pieces"
        )
    if value.dtype not in TRITON_DTYPES:
        raise InputError(
            f"ms_deform_attn (triton): value dtype {value.dtype} is not supported; use float32, float16 or bfloat16"
        )
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.dtype not in (value.dtype, torch.float32):
            raise InputError(
                f"ms_deform_attn (triton): {name} is {t.dtype} but value is {value.dtype}; pass it as "
                f"{value.dtype} or float32"
            )
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index),
                    ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.device != value.device:
            raise InputError(f"ms_deform_attn: {name} is on {t.device} but value is on {value.device}; move it")
    on_old_gpu = value.device.type == "cuda" and torch.cuda.get_device_capability(value.device) < (8, 0)
    if value.dtype == torch.bfloat16 and on_old_gpu:
        raise BackendUnavailableError(
            "ms_deform_attn (triton): bfloat16 needs an sm_80+ GPU; use float16 or float32 on this one"
        )


__all__ = ["ms_deform_attn", "ms_deform_attn_torch", "ms_deform_attn_op", "level_shapes", "shape_tensors"]
