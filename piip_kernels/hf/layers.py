"""The ``layers`` module of our kernel repository (the `kernels` library's layout): one
layer, ``MultiScaleDeformableAttention``, whose ``forward`` replaces the forward of the
module of that name in transformers' deformable detectors.

The `kernels` library swaps only ``forward`` into the model's own module (its
parameters and attributes stay), and accepts a layer with no ``__init__`` and no members
besides ``forward``, ``has_backward`` and ``can_torch_compile``, whose ``forward`` has the
signature of the module it replaces. So this class holds nothing else; the op chooses the
backend (C++ on the CPU, CUDA or Triton on a GPU) from the tensors.
"""
from __future__ import annotations

from torch import Tensor, nn

from piip_kernels.msda.api import ms_deform_attn


class MultiScaleDeformableAttention(nn.Module):
    """transformers' ``MultiScaleDeformableAttention.forward``, on ``piip_kernels.ms_deform_attn``.

    Args (transformers' names):
        value: [N, S, M, D], the levels flattened and concatenated.
        value_spatial_shapes: [L, 2] int64, (H_l, W_l).
        value_spatial_shapes_list: the same as a list of tuples (unused: the tensor is
            used, so a GPU run never reads shapes on the host).
        level_start_index: [L] int64.
        sampling_locations: [N, Lq, M, L, P, 2], normalised (x, y).
        attention_weights: [N, Lq, M, L, P].
        im2col_step: the Deformable DETR kernel's batch chunking (unused: ours needs none).

    Returns:
        [N, Lq, M * D] in value's dtype.
    """

    # Read by the `kernels` library: our op has a backward and a fake kernel.
    has_backward = True
    can_torch_compile = True

    def forward(
        self,
        value: Tensor,
        value_spatial_shapes: Tensor,
        value_spatial_shapes_list: list[tuple],
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        im2col_step: int,
    ) -> Tensor:
        return ms_deform_attn(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)
