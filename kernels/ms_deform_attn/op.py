"""``m2f::ms_deform_attn``: the Triton kernels as one ``torch.library`` custom op, with a fake (meta) kernel and
autograd, so torch.compile, torch.export and the ONNX exporter see a single opaque node.

Schema (the official op's / TensorRT plugin's layout; every argument a tensor):
    m2f::ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index,
                        Tensor sampling_locations, Tensor attention_weights) -> Tensor
    m2f::ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes,
                                 Tensor level_start_index, Tensor sampling_locations,
                                 Tensor attention_weights) -> (Tensor, Tensor, Tensor)

The op runs the Triton kernels on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1``; it raises
BackendUnavailableError anywhere else (use the "torch" backend there). Input checking lives in the public
dispatcher ``m2f.kernels.ms_deform_attn``; the op trusts its caller.
"""
from __future__ import annotations

import torch

from m2f.errors import BackendUnavailableError

from .._backend import triton_interpreter_enabled


def _check_runnable(device: torch.device) -> None:
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise BackendUnavailableError(
            f"m2f::ms_deform_attn runs its Triton kernels on CUDA tensors (got {device.type}); use backend='torch' "
            "on the CPU, or set TRITON_INTERPRET=1 to run them in Triton's (slow) interpreter"
        )


@torch.library.custom_op("m2f::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(
    value: torch.Tensor,  # (N, S, M, D)
    spatial_shapes: torch.Tensor,  # (L, 2) int (H, W)
    level_start_index: torch.Tensor,  # (L,) int
    sampling_locations: torch.Tensor,  # (N, Q, M, L, P, 2)
    attention_weights: torch.Tensor,  # (N, Q, M, L, P)
) -> torch.Tensor:  # (N, Q, M * D) in value's dtype
    _check_runnable(value.device)
    from .triton_kernels import ms_deform_attn_fwd

    return ms_deform_attn_fwd(
        value.contiguous(),
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )


@ms_deform_attn_op.register_fake
def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], M * D))


@torch.library.custom_op("m2f::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(
    grad_output: torch.Tensor,  # (N, Q, M * D)
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # grads of value, locations, weights (their dtypes)
    _check_runnable(value.device)
    from .triton_kernels import ms_deform_attn_bwd

    return ms_deform_attn_bwd(
        grad_output.contiguous(),
        value.contiguous(),
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )


@ms_deform_attn_backward_op.register_fake
def _ms_deform_attn_backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output) -> None:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = ms_deform_attn_backward_op(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_locations, grad_weights


ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)
