"""Public fused deformable cross-attention: input checks, backend choice, dispatch."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..msda.api import ms_deform_attn_tangent
from ..ops import deform_cross_attn_op, forward_mode
from .reference import deform_cross_attn_reference, sampling_locations

OP = "deform_cross_attn"
_HALF = (torch.float16, torch.bfloat16)

BACKENDS: dict[str, backends.WhyNot] = backends.standard_table("dca_forward")
backends.register_op(OP, BACKENDS)


def _hw(name, hw) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError):
        raise ValueError(f"{OP}: {name} must be a pair (H, W), got {hw!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{OP}: {name} must be positive, got {(h, w)}")
    return h, w


def deform_cross_attn(value: Tensor, value_hw, offsets: Tensor, logits: Tensor, query_hw, *,
                      backend: str | None = None, deterministic: bool | None = None) -> Tensor:
    """Deformable cross-attention of an Hq x Wq query grid into one Hv x Wv value map,
    from raw offsets and logits (PIIP's interaction units).

    Equal to ``ms_deform_attn`` with the query grid's cell centres
    ``((j + 0.5) / Wq, (i + 0.5) / Hq)`` as reference points, ``offsets / (Wv, Hv)``
    added to them, and ``softmax(logits)`` over the P points of each head, but in one
    pass: the reference grid, offset scaling and softmax never touch memory, and the
    backward returns the offset and logit gradients directly.

    Args:
        value: [N, Hv*Wv, M, D] float32/float64/float16/bfloat16.
        value_hw: (Hv, Wv).
        offsets: [N, Hq*Wq, M, P, 2] raw (x, y) offsets in value-grid pixels.
        logits: [N, Hq*Wq, M, P] raw attention logits.
        query_hw: (Hq, Wq).
        backend: "reference", "cpu", "cuda" or "triton" (default: the fastest available).
        deterministic: bit-identical gradients across runs (default:
            ``torch.are_deterministic_algorithms_enabled()``; the CPU backward always is).

    Returns:
        [N, Hq*Wq, M*D] in value's dtype (accumulated in fp32, fp64 for fp64).
        Differentiable in reverse mode and in forward mode (``torch.func.jvp``,
        ``torch.autograd.forward_ad``; see :func:`deform_cross_attn_tangent`).
    """
    dual = forward_mode(deform_cross_attn, deform_cross_attn_tangent, (value, value_hw, offsets, logits, query_hw),
                        (0, 2, 3), backend=backend, deterministic=deterministic)
    if dual is not None:
        return dual
    for name, t in (("value", value), ("offsets", offsets), ("logits", logits)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{OP}: {name} must be a floating torch.Tensor")
    Hv, Wv = _hw("value_hw", value_hw)
    Hq, Wq = _hw("query_hw", query_hw)
    if value.dim() != 4 or value.shape[1] != Hv * Wv:
        raise ValueError(f"{OP}: value must be [N, Hv*Wv, M, D] = [N, {Hv * Wv}, M, D], got {tuple(value.shape)}")
    N, _, M, D = value.shape
    if offsets.dim() != 5 or offsets.shape[-1] != 2 or tuple(offsets.shape[:3]) != (N, Hq * Wq, M):
        raise ValueError(f"{OP}: offsets must be [N, Hq*Wq, M, P, 2] = [{N}, {Hq * Wq}, {M}, P, 2], got {tuple(offsets.shape)}")
    if tuple(logits.shape) != tuple(offsets.shape[:4]):
        raise ValueError(f"{OP}: logits must be [N, Hq*Wq, M, P] = {tuple(offsets.shape[:4])}, got {tuple(logits.shape)}")
    if offsets.shape[3] == 0:
        raise ValueError(f"{OP}: at least one point per head is needed (P = 0)")
    if len({value.device, offsets.device, logits.device}) > 1:
        raise ValueError(f"{OP}: value, offsets and logits must be on one device")
    # Offsets and logits share a dtype: value's, or fp32 beside 16-bit values.
    dt = torch.promote_types(offsets.dtype, logits.dtype)
    if dt != value.dtype and not (value.dtype in _HALF and dt == torch.float32):
        dt = torch.float32 if value.dtype in _HALF else value.dtype
    offsets, logits = offsets.to(dt), logits.to(dt)
    name = backends.select(OP, BACKENDS, value.device, value.dtype, backend)
    if value.device.type == "meta":  # the fake kernel: shapes only (see backends.select)
        return deform_cross_attn_op(value, offsets, logits, [Hv, Wv], [Hq, Wq], name, bool(deterministic))
    if name == "reference":
        return deform_cross_attn_reference(value, (Hv, Wv), offsets, logits, (Hq, Wq))
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return deform_cross_attn_op(value, offsets, logits, [Hv, Wv], [Hq, Wq], name, bool(deterministic))


def deform_cross_attn_tangent(value, value_hw, offsets, logits, query_hw, value_t, offsets_t, logits_t, **kw) -> Tensor:
    """The forward-mode derivative of deform_cross_attn along the tangents ``value_t``,
    ``offsets_t`` and ``logits_t`` (each None or shaped like its input): [N, Hq*Wq, M*D].
    The value term is the op on ``value_t``; offsets and logits move the locations
    (``offsets_t / (Wv, Hv)``) and the softmax weights (``w * (logits_t - sum(w * logits_t))``)
    of the one-level ms_deform_attn the op equals, whose tangent gives the rest. ``kw``:
    backend and deterministic."""
    terms = []
    if value_t is not None:
        terms.append(deform_cross_attn(value_t, value_hw, offsets, logits, query_hw, **kw))
    if offsets_t is not None or logits_t is not None:
        Hv, Wv = _hw("value_hw", value_hw)
        weights = logits.softmax(-1)
        weights_t = None if logits_t is None else weights * (logits_t - (weights * logits_t).sum(-1, keepdim=True))
        loc_t = None if offsets_t is None else offsets_t / offsets.new_tensor([Wv, Hv])

        def level(t):  # [N, Lq, M, P, ...] -> [N, Lq, M, 1, P, ...]: the one level of ms_deform_attn
            return None if t is None else t[:, :, :, None]

        loc = sampling_locations((Hv, Wv), offsets, _hw("query_hw", query_hw))
        terms.append(ms_deform_attn_tangent(value, torch.tensor([[Hv, Wv]], device=value.device),
                                            torch.zeros(1, dtype=torch.long, device=value.device), level(loc),
                                            level(weights), None, level(loc_t), level(weights_t), **kw))
    return sum(terms[1:], terms[0])
