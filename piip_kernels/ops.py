"""Every public op of piip_kernels in one place: schema, fake kernel, autograd
and FLOP formula.

The ops take the backend name as their last argument so that one schema
serves every compiled backend; the user-facing functions (``piip_kernels.ms_deform_attn``
and friends) check inputs, choose the backend and call these ops. The
``reference`` backend never comes here: it is plain PyTorch and differentiates
through ordinary ops.

Ops:
  piip::ms_deform_attn(value [N,S,M,D], spatial_shapes [L,2], level_start_index [L],
                       sampling_locations [N,Lq,M,L,P,2], attention_weights [N,Lq,M,L,P],
                       backend) -> [N, Lq, M*D]
  piip::ms_deform_attn_backward(grad_output [N,Lq,M*D], <the five inputs>, backend)
                       -> (grad_value, grad_sampling_locations, grad_attention_weights)

FLOP formulas count multiply-accumulates (MACs) in ``*_macs`` (the convention of
fvcore and the PIIP paper); ``torch.utils.flop_counter`` wants FLOPs, registered
as 2 x MACs.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

# --- kernels of the compiled and Triton backends ------------------------------


def _msda_kernels(backend: str):
    """(forward, backward) callables of a compiled backend of ms_deform_attn."""
    if backend in ("cpu", "cuda"):
        from . import _ext  # noqa: F401  (loads the piip_C registrations)

        return torch.ops.piip_C.msda_forward, torch.ops.piip_C.msda_backward
    raise RuntimeError(f"ms_deform_attn: no compiled kernels for backend {backend!r}")


# --- multi-scale deformable attention --------------------------------------


def msda_macs(value_shape, sampling_locations_shape) -> int:
    """Forward MACs: per query, head, level and point, 4 bilinear corners plus the
    attention weight, on each of the D channels."""
    N, _, M, D = value_shape
    _, Lq, _, L, P, _ = sampling_locations_shape
    return 5 * N * Lq * M * L * P * D


def msda_backward_macs(value_shape, sampling_locations_shape) -> int:
    """Backward MACs: per point and channel, 4 corner dot products with grad_output
    (for the location and weight gradients) and 4 corner scatters into grad_value."""
    N, _, M, D = value_shape
    _, Lq, _, L, P, _ = sampling_locations_shape
    return 8 * N * Lq * M * L * P * D


@torch.library.custom_op("piip::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str,
) -> Tensor:
    forward, _ = _msda_kernels(backend)
    return forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


@torch.library.custom_op("piip::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _, backward = _msda_kernels(backend)
    return backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _msda_setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.backend = backend


def _msda_backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = ms_deform_attn_backward_op(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights, ctx.backend
    )
    return grad_value, None, None, grad_loc, grad_attn, None


ms_deform_attn_op.register_autograd(_msda_backward, setup_context=_msda_setup_context)


@register_flop_formula(torch.ops.piip.ms_deform_attn)
def _(value_shape, spatial_shapes_shape, level_start_index_shape, loc_shape, *args, **kwargs) -> int:
    return 2 * msda_macs(value_shape, loc_shape)


@register_flop_formula(torch.ops.piip.ms_deform_attn_backward)
def _(grad_output_shape, value_shape, spatial_shapes_shape, level_start_index_shape, loc_shape, *args, **kwargs) -> int:
    return 2 * msda_backward_macs(value_shape, loc_shape)
