"""``ms_deform_attn`` of this kernels-hub build of piip-kernels, on its own op namespace.

Generated into every variant by scripts/build_hub.py, beside ``_ops.py`` (the variant's
namespace and ops), ``reference.py`` (the plain-PyTorch specification, copied from
piip_kernels/msda/reference.py) and, in the Triton variant, ``triton_msda.py`` (copied
from piip_kernels/msda/triton.py). It needs nothing of piip_kernels, so the build can sit
beside a pip-installed piip-kernels in one process: its ops live under
``torch.ops.<namespace>``, not ``torch.ops.piip_C``.

The compiled variants register the piip-kernels binaries (CPU, and CUDA in the cu variant)
under the namespace; the Triton variant defines the same two ops on the Triton kernels.
Either way the forward op gets a fake kernel and an autograd formula here, so the layer
trains and runs under ``torch.compile``. Inputs no kernel of the variant takes (CPU
tensors in the Triton variant, float64 on a GPU) run the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._ops import KERNEL_DEVICES, NAMESPACE, ops
from .reference import ms_deform_attn_reference

_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if "triton" in KERNEL_DEVICES:
    from . import triton_msda

    def _triton_variant(variant: int) -> None:
        # The same schema as the compiled variants (their `int variant`); Triton has one kernel each.
        if variant != 0:
            raise ValueError(f"{NAMESPACE}: the Triton kernels have one variant (0), not {variant}")

    @torch.library.custom_op(f"{NAMESPACE}::msda_forward", mutates_args=())
    def _forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                 attention_weights: Tensor, variant: int = 0) -> Tensor:
        _triton_variant(variant)
        return triton_msda.msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @torch.library.custom_op(f"{NAMESPACE}::msda_backward", mutates_args=())
    def _backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                  sampling_locations: Tensor, attention_weights: Tensor, variant: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        _triton_variant(variant)
        return triton_msda.msda_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights)


@torch.library.register_fake(f"{NAMESPACE}::msda_forward")
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, variant=0):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


@torch.library.register_fake(f"{NAMESPACE}::msda_backward")
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, variant=0):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    # The five tensors; the last input is the kernel variant (an int, as every op of the schemas
    # in csrc/registration.cpp takes), which the backward's default kernel does not need.
    ctx.save_for_backward(*inputs[:5])


def _grads(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = ops.msda_backward(grad_output.contiguous(), value, spatial_shapes,
                                                        level_start_index, sampling_locations, attention_weights)
    return grad_value, None, None, grad_loc, grad_attn, None


torch.library.register_autograd(f"{NAMESPACE}::msda_forward", _grads, setup_context=_setup_context)


def _kernel_runs(value: Tensor, sampling_locations: Tensor) -> bool:
    """True when a kernel of this variant takes these inputs (the reference runs otherwise)."""
    lt, vt = sampling_locations.dtype, value.dtype
    pair = lt == vt or (lt == torch.float32 and vt in (torch.float16, torch.bfloat16))
    if value.device.type == "cpu":
        return "cpu" in KERNEL_DEVICES and pair and vt in _GPU_DTYPES + (torch.float64,)
    if value.device.type == "cuda":
        return ("cuda" in KERNEL_DEVICES or "triton" in KERNEL_DEVICES) and pair and vt in _GPU_DTYPES
    return value.device.type == "meta"


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention (piip_kernels.ms_deform_attn's arguments and result).

    Args:
        value: [N, S, M, D], the levels flattened row-major and concatenated.
        spatial_shapes: [L, 2] int64, (H_l, W_l).
        level_start_index: [L] int64.
        sampling_locations: [N, Lq, M, L, P, 2], normalised (x, y).
        attention_weights: [N, Lq, M, L, P].

    Returns:
        [N, Lq, M * D] in value's dtype.
    """
    if _kernel_runs(value, sampling_locations):
        return ops.msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
