"""Plain-PyTorch branch merge: the specification."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def branch_merge_reference(features: list[Tensor], weights: Tensor, out_size, align_corners: bool = False) -> Tensor:
    """``sum_i weights[i] * interpolate(features[i], out_size, bilinear)`` with the
    interpolation in fp32 (fp64 for fp64 maps).

    Args:
        features: 1 to 8 maps [N, C, H_i, W_i] (any memory format).
        weights: [len(features)].
        out_size: (Ho, Wo).

    Returns:
        [N, C, Ho, Wo], dtype ``promote_types(features dtype, weights dtype)``.
    """
    out_dtype = torch.promote_types(features[0].dtype, weights.dtype)
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    total = None
    for f, w in zip(features, weights.to(acc).unbind(0)):
        y = f.to(acc)
        if tuple(y.shape[-2:]) != tuple(out_size):
            y = F.interpolate(y, size=tuple(out_size), mode="bilinear", align_corners=align_corners)
        total = w * y if total is None else total + w * y
    return total.to(out_dtype).contiguous()
