"""Plain-PyTorch fused deformable cross-attention: the specification.

It is exactly ``ms_deform_attn`` on one level, with the query grid's cell centres as
reference points, the raw offsets divided by the value grid size, and a softmax over
the points of each head.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..msda.reference import ms_deform_attn_reference


def grid_reference_points(query_hw, device=None, dtype=torch.float32) -> Tensor:
    """[Hq*Wq, 2]: point (i, j) of the query grid is ((j + 0.5) / Wq, (i + 0.5) / Hq)."""
    Hq, Wq = query_hw
    ys = (torch.arange(Hq, device=device, dtype=dtype) + 0.5) / Hq
    xs = (torch.arange(Wq, device=device, dtype=dtype) + 0.5) / Wq
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], -1)


def sampling_locations(value_hw, offsets: Tensor, query_hw) -> Tensor:
    """[N, Hq*Wq, M, P, 2]: each query's grid reference point plus its raw offsets (value
    pixels) over the value grid size (Wv, Hv)."""
    Hv, Wv = value_hw
    ref = grid_reference_points(query_hw, offsets.device, offsets.dtype)
    return ref[None, :, None, None, :] + offsets / offsets.new_tensor([Wv, Hv])


def deform_cross_attn_reference(value: Tensor, value_hw, offsets: Tensor, logits: Tensor, query_hw) -> Tensor:
    """
    Args:
        value: [N, Hv*Wv, M, D].
        value_hw: (Hv, Wv).
        offsets: [N, Hq*Wq, M, P, 2] raw (x, y) offsets in value-grid pixels.
        logits: [N, Hq*Wq, M, P] raw attention logits.
        query_hw: (Hq, Wq).

    Returns:
        [N, Hq*Wq, M*D].
    """
    Hv, Wv = value_hw
    loc = sampling_locations(value_hw, offsets, query_hw)
    weights = logits.softmax(-1)
    # The level as Python ints: nothing for torch.compile to read from a tensor.
    return ms_deform_attn_reference(value, [(Hv, Wv)], [0], loc[:, :, :, None], weights[:, :, :, None])
