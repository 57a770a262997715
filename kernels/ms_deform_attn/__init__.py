"""Multi-scale deformable attention (Deformable DETR / Mask2Former pixel decoder).

* ``naive.py``          - the plain-PyTorch (grid_sample) reference every fast version is tested against.
* ``triton_kernels.py`` - the fused Triton forward / backward kernels and their launchers.
* ``op.py``             - ``torch.ops.m2f.ms_deform_attn``: the kernels as one custom op (fake impl + autograd).
* ``aot_build.py``      - ahead-of-time builds of both kernels for sm_90 / sm_87 (registers, shared memory, spills).

Dtypes (both backends): ``value`` float32, float16, bfloat16 or float64; ``sampling_locations`` and
``attention_weights`` each either value's dtype or float32 (float32 locations keep sub-pixel precision on large
maps: bfloat16 has 8 significant bits; under autocast the model passes float16 value with float32 locations and
weights). The Triton kernels accumulate in float32 (float64 for float64 value: slow, meant for gradcheck); the
output has value's dtype and each gradient its input's dtype. Offsets inside one batch element are int32:
S * M * D and Q * M * L * P * 2 must stay below 2^31.

Every input that sizes a memory access is checked before either backend runs (:func:`check_inputs`), including
the values of ``spatial_shapes`` / ``level_start_index`` (positive sizes, sum H * W = S, starts = running sums):
lists are checked on the host; tensors are read back once and the host copy is reused until the tensor changes
(:func:`host_values`), so the hot path does not synchronise with the device on every call.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

from m2f.errors import BackendUnavailableError, InputError

from .._backend import resolve_backend
from .naive import Shapes, level_shapes, ms_deform_attn_torch
from .op import ms_deform_attn_op

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


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
    contributing zero; a point whose sampling position lies wholly outside its map (or is NaN / inf) contributes
    nothing, not even through a non-finite weight (see ``naive.py``). Differentiable in value,
    sampling_locations and attention_weights on both backends.
    """
    backend = resolve_backend(backend, value.device)
    shapes = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend)
    if backend == "torch":
        return ms_deform_attn_torch(value, shapes or spatial_shapes, sampling_locations, attention_weights)
    shapes_t, starts_t = shape_tensors(spatial_shapes, level_start_index, value.device)
    return ms_deform_attn_op(value, shapes_t, starts_t, sampling_locations, attention_weights)


def shape_tensors(
    spatial_shapes: torch.Tensor | Shapes, level_start_index: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:  # (L, 2) and (L,) int64 on ``device``
    """``spatial_shapes`` as an (L, 2) int tensor on ``device`` and ``level_start_index`` (derived when None).

    Assumes :func:`check_inputs` accepted them.
    """
    if isinstance(spatial_shapes, torch.Tensor):
        shapes_t = spatial_shapes if spatial_shapes.device == device else spatial_shapes.to(device)
    else:
        pairs = [(h, w) for h, w in spatial_shapes]
        if level_start_index is None and not torch.compiler.is_compiling() and all(
            type(x) is int for hw in pairs for x in hw
        ):
            # Eager calls with plain ints (the model's, six times a forward): reuse the device tensors
            # instead of a host-to-device copy per call. Traced calls build them in the graph instead.
            return _cached_shape_tensors(tuple(pairs), device)
        shapes_t = torch.tensor(pairs, dtype=torch.int64, device=device)
        if level_start_index is None:  # plain (or symbolic) ints: a constant, no ops in an exported graph
            level_start_index = torch.tensor(_starts(pairs), dtype=torch.int64, device=device)
    if level_start_index is None:
        sizes = shapes_t[:, 0] * shapes_t[:, 1]
        level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    if level_start_index.device != device:
        level_start_index = level_start_index.to(device)
    return shapes_t, level_start_index


def _starts(pairs) -> list:
    """Offset of each level in S: the running sums of H * W."""
    starts = [0]
    for h, w in pairs[:-1]:
        starts.append(starts[-1] + h * w)
    return starts


@functools.lru_cache(maxsize=64)
def _cached_shape_tensors(
    pairs: tuple[tuple[int, int], ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(pairs, dtype=torch.int64, device=device),
            torch.tensor(_starts(pairs), dtype=torch.int64, device=device))


# Host copies of index tensors (spatial_shapes, level_start_index) already read back. Invalidation rule: an entry
# is keyed by the tensor object itself, held weakly (it dies with the tensor, so a new tensor that reuses a freed
# address never inherits it), and stamped with the tensor's version counter, which every in-place write made
# through torch bumps (views share it). A tensor written since it was read is therefore read again. Writes torch
# does not count (through ``.data``, a NumPy / DLPack alias, a raw kernel) go unnoticed; inference-mode tensors
# have no version counter and are read on every call.
_HOST_VALUES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def host_values(t: torch.Tensor) -> list[int]:
    """``t``'s values as Python ints (flattened), read back from the device only when ``t`` is new or changed."""
    if t.is_inference():
        return t.flatten().tolist()
    hit = _HOST_VALUES.get(t)
    if hit is not None and hit[0] == t._version:
        return hit[1]
    values = t.flatten().tolist()
    _HOST_VALUES[t] = (t._version, values)
    return values


def _fmt(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Shapes,
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str,
) -> list[tuple[int, int]] | None:
    """Raise InputError / BackendUnavailableError naming the argument, what it has and what it needs, for every
    input that sizes a memory access. Returns the (H, W) of every level as host ints when they are known without
    tracing (a list of ints, or a tensor read back once, see :func:`host_values`), None otherwise."""
    tensors = (("value", value), ("sampling_locations", sampling_locations), ("attention_weights", attention_weights))
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise InputError(f"ms_deform_attn: {name} must be a tensor, got {type(t).__name__}")
    if value.dim() != 4 or value.shape[2] == 0 or value.shape[3] == 0:
        raise InputError(f"ms_deform_attn: value must be (N, S, M, D) with M, D >= 1, got {tuple(value.shape)}")
    N, S, M, D = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise InputError(
            f"ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got {tuple(sampling_locations.shape)}"
        )
    _, Q, _, L, P, _ = sampling_locations.shape
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
    if value.dtype not in DTYPES:
        raise InputError(
            f"ms_deform_attn: value dtype {value.dtype} is not supported; use float32, float16, bfloat16 or float64"
        )
    for name, t in tensors[1:]:
        if t.dtype not in (value.dtype, torch.float32):
            raise InputError(
                f"ms_deform_attn: {name} is {t.dtype} but value is {value.dtype}; pass it as {value.dtype} or float32"
            )
    for name, t in (*tensors[1:], ("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if isinstance(t, torch.Tensor) and t.device != value.device and not (
            name in ("spatial_shapes", "level_start_index") and t.device.type == "cpu"
        ):
            raise InputError(f"ms_deform_attn: {name} is on {t.device} but value is on {value.device}; move it")

    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.dtype not in INDEX_DTYPES:
            raise InputError(
                "ms_deform_attn: spatial_shapes must be an (L, 2) int32/int64 tensor or a list of (H, W), got "
                f"{_fmt(spatial_shapes)}"
            )
        num_levels = spatial_shapes.shape[0]
    else:
        try:
            pairs = [(h, w) for h, w in spatial_shapes]
        except (TypeError, ValueError):
            raise InputError(
                "ms_deform_attn: spatial_shapes must be an (L, 2) int tensor or a list of (H, W) pairs, got "
                f"{spatial_shapes!r}"
            ) from None
        num_levels = len(pairs)
    if level_start_index is not None and (
        not isinstance(level_start_index, torch.Tensor) or level_start_index.dtype not in INDEX_DTYPES
        or tuple(level_start_index.shape) != (num_levels,)
    ):
        got = _fmt(level_start_index) if isinstance(level_start_index, torch.Tensor) else repr(level_start_index)
        raise InputError(
            f"ms_deform_attn: level_start_index must be None or an ({num_levels},) int32/int64 tensor (one start "
            f"per level of spatial_shapes), got {got}"
        )
    if num_levels != L or L == 0:
        raise InputError(
            f"ms_deform_attn: sampling_locations has {L} levels (dim 3) but spatial_shapes has {num_levels}; pass "
            "one (H, W) per level (at least one)"
        )

    shapes = _host_shapes(spatial_shapes)
    if shapes is not None:
        _check_shape_values(shapes, level_start_index, S)

    if backend == "triton":
        sizes = (S * M * D, Q * M * L * P * 2)
        if all(isinstance(x, int) for x in sizes) and max(sizes) >= 2**31:
            raise InputError(
                f"ms_deform_attn (triton): one batch element holds {max(sizes)} values, more than the kernel's "
                "int32 offsets reach (2^31); split the queries or the image into smaller pieces"
            )
        on_old_gpu = value.device.type == "cuda" and torch.cuda.get_device_capability(value.device) < (8, 0)
        if value.dtype == torch.bfloat16 and on_old_gpu:
            raise BackendUnavailableError(
                "ms_deform_attn (triton): bfloat16 needs an sm_80+ GPU; use float16 or float32 on this one"
            )
    return shapes


def _host_shapes(spatial_shapes: torch.Tensor | Shapes) -> list[tuple[int, int]] | None:
    """(H, W) of every level as Python ints, or None while tracing (fake tensors, symbolic sizes)."""
    if isinstance(spatial_shapes, torch.Tensor):
        if torch.compiler.is_compiling():
            return None
        flat = host_values(spatial_shapes)
        return list(zip(flat[0::2], flat[1::2]))
    pairs = [(h, w) for h, w in spatial_shapes]
    if not all(type(x) is int for hw in pairs for x in hw):
        return None  # symbolic sizes of a traced graph: they come from real feature maps
    return pairs


def _check_shape_values(shapes: list[tuple[int, int]], level_start_index: torch.Tensor | None, num_keys: int) -> None:
    for level, (h, w) in enumerate(shapes):
        if h < 1 or w < 1:
            raise InputError(
                f"ms_deform_attn: spatial_shapes level {level} is (H, W) = ({h}, {w}); every level needs H >= 1 "
                "and W >= 1"
            )
    total = sum(h * w for h, w in shapes)
    if total != num_keys:
        raise InputError(
            f"ms_deform_attn: value has {num_keys} keys (dim 1) but spatial_shapes {shapes} hold {total}; pass the "
            "(H, W) of every level whose flattened maps make up value"
        )
    if level_start_index is not None and not torch.compiler.is_compiling():
        starts = host_values(level_start_index)
        if starts != _starts(shapes):
            raise InputError(
                f"ms_deform_attn: level_start_index is {starts} but spatial_shapes {shapes} start their levels at "
                f"{_starts(shapes)}; pass the running sums of H * W, or None to derive them"
            )


__all__ = ["ms_deform_attn", "ms_deform_attn_torch", "ms_deform_attn_op", "level_shapes", "shape_tensors",
           "check_inputs", "host_values"]
