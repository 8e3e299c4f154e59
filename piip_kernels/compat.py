"""One-import-line switches for repositories that use the usual deformable-attention entry points.

Deformable DETR / ViT-Adapter / DINO::

    # from models.ops.functions import MSDeformAttnFunction
    from piip_kernels.compat import MSDeformAttnFunction

mmcv / mmdet::

    # from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch
    from piip_kernels.compat import multi_scale_deformable_attn_pytorch
"""
from __future__ import annotations

import torch
from torch import Tensor

from .msda.api import ms_deform_attn
from .msda.module import MSDeformAttn

__all__ = ["MSDeformAttn", "MSDeformAttnFunction", "multi_scale_deformable_attn_pytorch", "ms_deform_attn_core_pytorch"]


class MSDeformAttnFunction:
    """Stand-in for Deformable DETR's ``MSDeformAttnFunction``: only ``apply`` is used by callers."""

    @staticmethod
    def apply(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights, im2col_step=64):
        """Same signature as Deformable DETR; ``im2col_step`` is accepted and ignored
        (our kernels have no batch-chunking restriction). Returns [N, Lq, M*D]."""
        return ms_deform_attn(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights)


def _level_starts(spatial_shapes: Tensor) -> Tensor:
    sizes = spatial_shapes.long().prod(1)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def multi_scale_deformable_attn_pytorch(value: Tensor, value_spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """mmcv's signature: value [bs, num_keys, num_heads, dims], shapes [L, 2],
    locations [bs, num_queries, num_heads, L, P, 2], weights [bs, num_queries, num_heads, L, P]
    -> [bs, num_queries, num_heads * dims]. Runs the fastest available backend."""
    if not isinstance(value_spatial_shapes, Tensor):
        value_spatial_shapes = torch.as_tensor(value_spatial_shapes, dtype=torch.long, device=value.device)
    return ms_deform_attn(value, value_spatial_shapes, _level_starts(value_spatial_shapes), sampling_locations, attention_weights)


# Deformable DETR's name for the same function.
ms_deform_attn_core_pytorch = multi_scale_deformable_attn_pytorch
