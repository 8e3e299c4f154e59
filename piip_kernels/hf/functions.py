"""Our versions of the two functions transformers' deformable detectors call by name:

- ``multi_scale_deformable_attention`` (Mask2Former, OneFormer): one point count for all levels;
- ``multi_scale_deformable_attention_v2`` (RT-DETRv2, D-FINE, DEIMv2): a point count per
  level and a sampling method, "default" (bilinear, ``grid_sample``) or "discrete" (the
  nearest pixel, rounded down from ``x * W + 0.5``).

Both take transformers' arguments and run ``piip_kernels.ms_deform_attn``. "discrete" is
not ours: it goes back to transformers' own function, with one log line.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from piip_kernels import _swap
from piip_kernels.compat import _level_starts
from piip_kernels.msda.api import ms_deform_attn

logger = logging.getLogger("piip_kernels.hf")


def log_once(message: str) -> None:
    """One warning per distinct message for the life of the process."""
    _swap.log_once(message, logger)


@functools.lru_cache(maxsize=64)
def _index_tensors(shapes: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    spatial = torch.tensor(shapes, dtype=torch.long, device=device)
    return spatial, _level_starts(spatial)


def level_tensors(value_spatial_shapes, device: torch.device) -> tuple[Tensor, Tensor]:
    """(spatial_shapes [L, 2] int64, level_start_index [L] int64) on ``device``, from
    transformers' list of (H, W) tuples or an [L, 2] tensor.

    From a list they are cached per (shapes, device): building them on a GPU is a copy
    from pageable host memory, which waits for the device, on every call otherwise. Not
    while compiling (they become graph constants) nor in inference mode (an inference
    tensor could not later be saved for a backward)."""
    if isinstance(value_spatial_shapes, Tensor):
        spatial = value_spatial_shapes.to(device=device, dtype=torch.long)
        return spatial, _level_starts(spatial)
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        spatial = torch.tensor([list(hw) for hw in value_spatial_shapes], dtype=torch.long, device=device)
        return spatial, _level_starts(spatial)
    return _index_tensors(tuple((int(h), int(w)) for h, w in value_spatial_shapes), device)


def multi_scale_deformable_attention(
    value: Tensor,
    value_spatial_shapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    msda=None,
) -> Tensor:
    """transformers' ``multi_scale_deformable_attention`` (Mask2Former, OneFormer).

    Args:
        value: [N, S, M, D].
        value_spatial_shapes: L pairs (H_l, W_l), a list or an [L, 2] tensor.
        sampling_locations: [N, Lq, M, L, P, 2], normalised (x, y).
        attention_weights: [N, Lq, M, L, P].
        msda: the core ``(value, shapes, starts, locations, weights) -> out`` (default
            ``piip_kernels.ms_deform_attn``; benchmarks pass other implementations).

    Returns:
        [N, Lq, M * D].
    """
    spatial, starts = level_tensors(value_spatial_shapes, value.device)
    return (msda or ms_deform_attn)(value, spatial, starts, sampling_locations, attention_weights)


def multi_scale_deformable_attention_v2(
    value: Tensor,
    value_spatial_shapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    num_points_list: list[int],
    method: str = "default",
    *,
    fallback=None,
    msda=None,
) -> Tensor:
    """transformers' ``multi_scale_deformable_attention_v2`` (RT-DETRv2, D-FINE, DEIMv2).

    Args:
        value: [N, S, M, D].
        value_spatial_shapes: L pairs (H_l, W_l), a list or an [L, 2] tensor.
        sampling_locations: [N, Lq, M, sum(P_l), 2], the points of level 0 first.
        attention_weights: [N, Lq, M, sum(P_l)].
        num_points_list: P_l, the points per level (equal or not).
        method: "default" (bilinear) runs ours; "discrete" runs ``fallback`` (transformers'
            own function) with one log line; anything else is a ValueError.
        fallback: transformers' function, for "discrete".
        msda: the core, as in :func:`multi_scale_deformable_attention`.

    Levels with fewer points than the most are padded to max(P_l) with zero attention
    weight at an in-range location: the padded terms add exactly zero to the output and
    to the value gradient, and their own gradients are dropped by the padding's backward,
    so outputs and gradients are those of the unpadded sum.

    Returns:
        [N, Lq, M * D].
    """
    name = "multi_scale_deformable_attention_v2"
    if method != "default":
        if method == "discrete" and fallback is not None:
            log_once(f"piip_kernels.hf: {name} with method='discrete' (nearest-pixel sampling) stays on transformers' "
                     "own code; ours implements the bilinear 'default' method")
            return fallback(value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list, method)
        raise ValueError(f"{name}: method must be 'default' (bilinear) or 'discrete' (transformers' own code), got {method!r}")
    spatial, starts = level_tensors(value_spatial_shapes, value.device)
    points = [int(p) for p in num_points_list]
    L = spatial.shape[0]
    if len(points) != L or min(points, default=0) <= 0:
        raise ValueError(f"{name}: num_points_list must hold one positive count per level ({L} levels), got {points}")
    if sampling_locations.dim() != 5 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"{name}: sampling_locations must be [N, Lq, M, sum(num_points_list), 2], "
                         f"got shape {tuple(sampling_locations.shape)}")
    N, Lq, M, total, _ = sampling_locations.shape
    if total != sum(points):
        raise ValueError(f"{name}: sampling_locations has {total} points per head, num_points_list {points} "
                         f"sums to {sum(points)}")
    if tuple(attention_weights.shape) != (N, Lq, M, total):
        raise ValueError(f"{name}: attention_weights must be [N, Lq, M, sum(num_points_list)] = {(N, Lq, M, total)}, "
                         f"got {tuple(attention_weights.shape)}")
    P = max(points)
    if all(p == P for p in points):
        loc = sampling_locations.reshape(N, Lq, M, L, P, 2)
        weights = attention_weights.reshape(N, Lq, M, L, P)
    else:
        loc = torch.stack([F.pad(part, (0, 0, 0, P - p), value=0.5)
                           for part, p in zip(sampling_locations.split(points, dim=3), points)], dim=3)
        weights = torch.stack([F.pad(part, (0, P - p)) for part, p in zip(attention_weights.split(points, dim=3), points)], dim=3)
    return (msda or ms_deform_attn)(value, spatial, starts, loc, weights)
