"""Public branch merge: input checks, backend choice, dispatch."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import backends
from ..ops import branch_merge_op, split_duals, with_tangent
from .reference import branch_merge_reference

OP = "branch_merge"

BACKENDS: dict[str, backends.WhyNot] = backends.standard_table("merge_forward")
backends.register_op(OP, BACKENDS)


def branch_merge(features, weights: Tensor, out_size, *, align_corners: bool = False,
                 backend: str | None = None) -> Tensor:
    """Bilinearly resize every branch map to ``out_size`` and take their weighted sum, in one pass.

    ``sum_i weights[i] * interpolate(features[i], out_size, mode="bilinear", align_corners=...)``
    with the interpolation in fp32. The backward gathers (no atomics), so it is deterministic,
    and gives gradients for every map and for the weights.

    Args:
        features: list of 1 to 8 maps [N, C, H_i, W_i] (contiguous or channels-last), one dtype.
        weights: [len(features)] per-branch scalars (a learnable parameter in PIIP).
        out_size: (Ho, Wo).
        align_corners: as in ``F.interpolate``.
        backend: "reference", "cpu", "cuda" or "triton" (default: the fastest available).

    Returns:
        [N, C, Ho, Wo] contiguous, dtype ``promote_types(features dtype, weights dtype)`` (computed
        in fp32, or fp64 for a float64 result on the cpu and reference backends).
        Differentiable in reverse mode and in forward mode (``torch.func.jvp``,
        ``torch.autograd.forward_ad``): the merge is linear in the maps and in the weights,
        so its tangent is ``branch_merge(maps_t, weights) + branch_merge(maps, weights_t)``.
    """
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)) or not features:
        raise ValueError(f"{OP}: features must be a non-empty list of [N, C, H, W] tensors")
    features = list(features)
    duals = split_duals([*features, weights]) if all(isinstance(t, Tensor) for t in features + [weights]) else None
    if duals is not None:
        (*features, weights), (*features_t, weights_t) = duals
        merge = functools.partial(branch_merge, out_size=out_size, align_corners=align_corners, backend=backend)
        out = merge(features, weights)
        terms = []
        if any(t is not None for t in features_t):
            terms.append(merge([torch.zeros_like(f) if t is None else t for f, t in zip(features, features_t)], weights))
        if weights_t is not None:
            terms.append(merge(features, weights_t))
        return with_tangent(out, sum(terms[1:], terms[0]))
    if len(features) > 8:
        raise ValueError(f"{OP}: at most 8 branches, got {len(features)}")
    f0 = features[0]
    for i, f in enumerate(features):
        if not isinstance(f, Tensor) or f.dim() != 4 or not f.is_floating_point():
            raise ValueError(f"{OP}: features[{i}] must be a floating [N, C, H, W] tensor, got "
                             f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
        if f.shape[:2] != f0.shape[:2]:
            raise ValueError(f"{OP}: features[{i}] has N, C = {tuple(f.shape[:2])}, features[0] has {tuple(f0.shape[:2])}")
        if f.shape[2] == 0 or f.shape[3] == 0:
            raise ValueError(f"{OP}: features[{i}] is empty: {tuple(f.shape)}")
        if f.device != f0.device:
            raise ValueError(f"{OP}: all features must be on one device")
    dtype = f0.dtype
    features = [f.to(dtype) for f in features]
    if not isinstance(weights, Tensor) or weights.dim() != 1 or weights.shape[0] != len(features) or not weights.is_floating_point():
        raise ValueError(f"{OP}: weights must be a floating [{len(features)}] tensor, got "
                         f"{tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__}")
    weights = weights.to(f0.device)
    try:
        Ho, Wo = (int(v) for v in out_size)
    except (TypeError, ValueError):
        raise ValueError(f"{OP}: out_size must be a pair (Ho, Wo), got {out_size!r}") from None
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"{OP}: out_size must be positive, got {(Ho, Wo)}")
    name = backends.select(OP, BACKENDS, f0.device, dtype, backend)
    if weights.dtype == torch.float64 and dtype != torch.float64:
        # promote_types makes the merged map float64, and the reference computes it so.
        # Backends with float64 kernels merge float64 maps; the GPU kernels (fp32 at most)
        # merge in fp32 and cast. Autograd gives each gradient its input's dtype.
        if backends.BACKEND_DTYPES[name] is None:
            features = [f.to(torch.float64) for f in features]
        else:
            return branch_merge(features, weights.float(), (Ho, Wo), align_corners=align_corners,
                                backend=name).to(torch.float64)
    if f0.device.type == "meta":  # the fake kernel: shapes only (see backends.select)
        return branch_merge_op(features, weights, [Ho, Wo], align_corners, name)
    if name == "reference":
        return branch_merge_reference(features, weights, (Ho, Wo), align_corners)
    return branch_merge_op(features, weights, [Ho, Wo], align_corners, name)
