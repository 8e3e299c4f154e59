"""Plain-PyTorch multi-scale deformable attention: the specification.

Every fast backend is tested against this function evaluated in float64. It
is deliberately short and uses only ordinary differentiable ops
(``grid_sample`` with ``align_corners=False`` and zero padding), so autograd
gives the gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: [N, S, M, D], the levels' feature maps flattened row-major and concatenated.
        spatial_shapes: [L, 2] int64, (H_l, W_l) of each level (or a list of (H_l, W_l)).
        level_start_index: [L] int64, first row of each level in ``value`` (or a list).
        sampling_locations: [N, Lq, M, L, P, 2], normalised (x, y); (0, 0) is the
            top-left corner of the map, (1, 1) the bottom-right. Points outside read zeros.
        attention_weights: [N, Lq, M, L, P].

    Returns:
        [N, Lq, M * D]: for each query and head, the sum over levels and points of
        ``attention_weight * bilinear_sample(value_level, location)``.
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    # grid_sample wants one dtype; the locations carry the precision.
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    grids = (2 * sampling_locations - 1).to(dtype)  # grid_sample's [-1, 1] coordinates
    per_level = []
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else spatial_shapes
    starts = level_start_index.tolist() if isinstance(level_start_index, torch.Tensor) else level_start_index
    for lvl, ((H, W), start) in enumerate(zip(shapes, starts)):
        # Under torch.compile, sizes read from tensors are unknown symbols: state what the
        # levels satisfy (checked in eager mode by the public function), so that slicing and
        # reshaping by them need no guard on their values.
        torch._check(H > 0)
        torch._check(W > 0)
        torch._check(start >= 0)
        torch._check(start + H * W <= S)
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = value[:, start : start + H * W].to(dtype).permute(0, 2, 3, 1).reshape(N * M, D, H, W)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(N * M, Lq, P, 2)
        per_level.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(per_level, dim=-2)  # [N*M, D, Lq, L, P]
    w = attention_weights.to(dtype).transpose(1, 2).reshape(N * M, 1, Lq, L, P)
    out = (sampled * w).sum(dim=(-1, -2))  # [N*M, D, Lq]
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous().to(value.dtype)
