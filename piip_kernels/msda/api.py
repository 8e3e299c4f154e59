"""Public multi-scale deformable attention: input checks, backend choice, dispatch."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import backends
from ..ops import forward_mode, ms_deform_attn_op
from .reference import ms_deform_attn_reference

OP = "ms_deform_attn"
_HALF = (torch.float16, torch.bfloat16)

BACKENDS: dict[str, backends.WhyNot] = backends.standard_table("msda_forward")
backends.register_op(OP, BACKENDS)


def _shape_error(name: str, expected: str, got: Tensor) -> ValueError:
    return ValueError(f"{OP}: {name} must be {expected}, got shape {tuple(got.shape)} ({got.dtype})")


def check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Validates shapes, dtypes and devices; returns the inputs with index tensors as int64
    and locations/weights in a dtype the kernels take (their own, or fp32 beside 16-bit values).

    Value-dependent checks (levels tile ``value``) run in :func:`check_levels`.
    """
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, t in zip(names, args):
        if not isinstance(t, Tensor):
            raise ValueError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4 or not value.is_floating_point():
        raise _shape_error("value", "a floating tensor [N, S, M, D]", value)
    N, S, M, D = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2 or not sampling_locations.is_floating_point():
        raise _shape_error("sampling_locations", "a floating tensor [N, Lq, M, L, P, 2]", sampling_locations)
    Nl, Lq, Ml, L, P, _ = sampling_locations.shape
    if (Nl, Ml) != (N, M):
        raise ValueError(
            f"{OP}: sampling_locations {tuple(sampling_locations.shape)} must have N={N} and M={M} "
            f"like value {tuple(value.shape)}"
        )
    if tuple(attention_weights.shape) != (N, Lq, M, L, P) or not attention_weights.is_floating_point():
        raise _shape_error("attention_weights", f"a floating tensor [N, Lq, M, L, P] = {(N, Lq, M, L, P)}", attention_weights)
    if L == 0:
        raise ValueError(f"{OP}: at least one level is needed (sampling_locations has L = 0)")
    if tuple(spatial_shapes.shape) != (L, 2) or spatial_shapes.is_floating_point() or spatial_shapes.is_complex():
        raise _shape_error("spatial_shapes", f"an integer tensor [L, 2] = {(L, 2)} of (H, W)", spatial_shapes)
    if tuple(level_start_index.shape) != (L,) or level_start_index.is_floating_point() or level_start_index.is_complex():
        raise _shape_error("level_start_index", f"an integer tensor [L] = {(L,)}", level_start_index)
    devices = {name: t.device for name, t in zip(names, args)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{OP}: all inputs must be on one device, got " + ", ".join(f"{k}: {v}" for k, v in devices.items()))

    spatial_shapes = spatial_shapes.long()
    level_start_index = level_start_index.long()
    # Locations and weights share one dtype: their own if it matches value, fp32 beside
    # 16-bit values (keeps sub-pixel precision), value's dtype otherwise.
    loc_dtype = torch.promote_types(sampling_locations.dtype, attention_weights.dtype)
    if loc_dtype != value.dtype and not (value.dtype in _HALF and loc_dtype == torch.float32):
        loc_dtype = torch.float32 if value.dtype in _HALF else value.dtype
    return value, spatial_shapes, level_start_index, sampling_locations.to(loc_dtype), attention_weights.to(loc_dtype)


def check_levels(spatial_shapes: Tensor, level_start_index: Tensor, S: int) -> None:
    """Checks that the levels are non-empty and tile the S rows of value in order."""
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    total = 0
    for lvl, ((H, W), start) in enumerate(zip(shapes, starts)):
        if H <= 0 or W <= 0:
            raise ValueError(f"{OP}: level {lvl} is empty or negative: spatial_shapes[{lvl}] = ({H}, {W})")
        if start != total:
            raise ValueError(f"{OP}: level_start_index[{lvl}] = {start}, but the levels before it cover {total} rows")
        total += H * W
    if total != S:
        raise ValueError(f"{OP}: spatial_shapes {shapes} cover {total} rows, but value has S = {S}")


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: str | None = None,
    deterministic: bool | None = None,
) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR), differentiable in value,
    sampling_locations and attention_weights.

    Args:
        value: [N, S, M, D] float32/float64/float16/bfloat16; S = sum of H_l * W_l.
        spatial_shapes: [L, 2] integer, (H_l, W_l) of each level.
        level_start_index: [L] integer, first row of each level in ``value``. With the
            index tensors on the CPU the levels must tile ``value`` (ValueError otherwise);
            on a GPU they are not read on the host, and a level outside ``value`` gives NaN.
        sampling_locations: [N, Lq, M, L, P, 2], normalised (x, y) in [0, 1]; points
            outside read zeros (``grid_sample`` with ``align_corners=False``, zero padding);
            a NaN or inf location reads NaN, and a non-finite weight times such a zero is NaN,
            as in ``grid_sample`` and the reference.
        attention_weights: [N, Lq, M, L, P].
        backend: "reference", "cpu", "cuda" or "triton"; default: ``PIIP_KERNELS_BACKEND``
            if set, else the fastest available for the device. A requested backend
            that cannot run raises RuntimeError with the reasons.
        deterministic: bit-identical gradients across runs (default:
            ``torch.are_deterministic_algorithms_enabled()``). The CPU backward always is;
            the GPU backwards then accumulate grad_value in 64-bit fixed point instead of
            fp32 atomics, scaled so the largest possible sum fits; a non-finite
            grad_output or attention weight then makes all of grad_value NaN.

    Returns:
        [N, Lq, M * D] in value's dtype (accumulated in fp32, fp64 for fp64 inputs).
        Differentiable in reverse mode and in forward mode (``torch.func.jvp``,
        ``torch.autograd.forward_ad``; see :func:`ms_deform_attn_tangent`).
    """
    dual = forward_mode(ms_deform_attn, ms_deform_attn_tangent,
                        (value, spatial_shapes, level_start_index, sampling_locations, attention_weights), (0, 3, 4),
                        backend=backend, deterministic=deterministic)
    if dual is not None:
        return dual
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    if value.device.type == "meta":
        # Shape-only runs (parameter and FLOP counting, the GPU tests' dry run): the op's fake
        # kernel gives the output (and in the backward the gradients') shapes, and FLOP
        # counters see the op itself. A requested backend still refuses its unsupported dtypes.
        name = backends.select(OP, BACKENDS, value.device, value.dtype, backend)
        return ms_deform_attn_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, name,
                                 bool(deterministic))
    if spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling():
        # Needs the tensors' values: free on the CPU. On a GPU it would synchronise on every
        # call (and break CUDA graph capture), so there the kernels check that every level
        # lies inside value and write NaN for one that does not, instead of reading outside.
        check_levels(spatial_shapes, level_start_index, value.shape[1])
    name = backends.select(OP, BACKENDS, value.device, value.dtype, backend)
    if name == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return ms_deform_attn_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, name,
                             bool(deterministic))


def ms_deform_attn_tangent(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                           value_t, locations_t, weights_t, **kw) -> Tensor:
    """The forward-mode derivative of ms_deform_attn along the tangents ``value_t``,
    ``locations_t`` and ``weights_t`` (each None or shaped like its input; not all None):
    [N, Lq, M * D].

    The op is linear in value and in the weights, so those terms are the op itself on the
    tangents. Along a location, a bilinear sample is linear inside a pixel cell: its
    derivative in x is, at the point's row, the bilinear sample of the map's horizontal
    differences ``dx[h, j] = V[h, j] - V[h, j - 1]`` (zero outside, one column more than V)
    at the column ``j = floor(w_im) + 1`` of the point's cell, times W; in y likewise. So the
    location term is the op again, on difference maps, with each point moved to its cell's
    column (row) centre and weighted by ``weight * W * x_t`` (``weight * H * y_t``). Points
    outside a level have zero derivative here as there. The level sizes are read on the host.
    ``kw``: backend and deterministic.
    """
    op = functools.partial(ms_deform_attn, **kw)
    terms = []
    if value_t is not None:
        terms.append(op(value_t, spatial_shapes, level_start_index, sampling_locations, attention_weights))
    if weights_t is not None:
        terms.append(op(value, spatial_shapes, level_start_index, sampling_locations, weights_t))
    if locations_t is not None:
        terms += _location_terms(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                 locations_t, op)
    return sum(terms[1:], terms[0])


def _location_terms(value, spatial_shapes, level_start_index, loc, weights, loc_t, op) -> list:
    """The x and y terms of ms_deform_attn_tangent (see there)."""
    N, _, M, D = value.shape
    dtype = torch.float64 if loc.dtype == torch.float64 else torch.float32  # the kernels' pixel arithmetic
    shapes = spatial_shapes.long()
    H, W = shapes[:, :1].to(dtype), shapes[:, 1:].to(dtype)  # [L, 1]: broadcast over [..., L, P]
    x, y = loc.to(dtype).unbind(-1)
    x_cell = (torch.floor(x * W - 0.5) + 1.5) / (W + 1)  # column floor(w_im) + 1 of a map one column wider
    y_cell = (torch.floor(y * H - 0.5) + 1.5) / (H + 1)
    dx_maps, dy_maps = [], []
    for (h, w), start in zip(shapes.tolist(), level_start_index.tolist()):
        v = value[:, start:start + h * w].reshape(N, h, w, M, D)
        dx_maps.append(torch.diff(v, dim=2, prepend=v.new_zeros(N, h, 1, M, D), append=v.new_zeros(N, h, 1, M, D)))
        dy_maps.append(torch.diff(v, dim=1, prepend=v.new_zeros(N, 1, w, M, D), append=v.new_zeros(N, 1, w, M, D)))
    a = weights.to(dtype)
    terms = []
    for maps, grow, cell_loc, scale, t in ((dx_maps, [0, 1], torch.stack([x_cell, y], -1), W, loc_t[..., 0]),
                                          (dy_maps, [1, 0], torch.stack([x, y_cell], -1), H, loc_t[..., 1])):
        grown = shapes + torch.tensor(grow, device=shapes.device)
        starts = torch.cumsum(grown.prod(1), 0) - grown.prod(1)
        flat = torch.cat([m.reshape(N, -1, M, D) for m in maps], 1)
        terms.append(op(flat, grown, starts, cell_loc, a * scale * t.to(dtype)))
    return terms
