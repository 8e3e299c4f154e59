"""Triton backend of the fused deformable cross-attention (forward and backward).

Kernel, launcher, wrapper, in that order. One program handles BLOCK_Q queries of one
(image, head). The reference points come from the query index, the softmax over the
P points runs on a [BLOCK_Q, BLOCK_P] tile in registers, and the sampling is the
one-level case of piip_kernels/msda/triton.py (same corner helper, same conventions).
The backward returns offset and logit gradients directly (softmax backward fused);
grad_value is scattered with fp32 atomics, or 64-bit fixed-point atomics when
deterministic.
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from ..msda.triton import (_bilinear, _point_backward, _sample, _tile, autotuned, check_shapes, fixed_point_result,
                           fixed_point_scale, query_grid, softmax_bound)


@triton.jit
def _softmax_tile(logits_ptr, base, qmask, P, BLOCK_P: tl.constexpr):
    """softmax over the P points of each query: [BLOCK_Q, BLOCK_P] (zero past P)."""
    pcol = tl.arange(0, BLOCK_P)
    pmask = pcol < P
    lg = tl.load(logits_ptr + base[:, None] + pcol[None, :], mask=qmask[:, None] & pmask[None, :], other=-float("inf")).to(tl.float32)
    lg = tl.where(pmask[None, :], lg, -float("inf"))
    mx = tl.max(lg, axis=1)
    mx = tl.where(qmask, mx, 0.0)
    e = tl.exp(lg - mx[:, None])
    e = tl.where(pmask[None, :], e, 0.0)
    s = tl.sum(e, axis=1)
    s = tl.where(qmask, s, 1.0)  # queries past the end have no points; a NaN sum stays NaN
    return e / s[:, None]


@triton.jit
def _point(off_ptr, w, pcol, base, p, rx, ry, Hv, Wv, qmask):
    """Weight and bilinear setup of point p: the location is the reference plus the raw
    offset over the value grid size."""
    a = tl.sum(tl.where(pcol[None, :] == p, w, 0.0), axis=1)
    ox = tl.load(off_ptr + 2 * (base + p), mask=qmask, other=0.0).to(tl.float32)
    oy = tl.load(off_ptr + 2 * (base + p) + 1, mask=qmask, other=0.0).to(tl.float32)
    valid, h0, w0, lh, lw = _bilinear((ry + oy / Hv) * Hv - 0.5, (rx + ox / Wv) * Wv - 0.5, Hv, Wv, qmask)
    return a, valid, h0, w0, lh, lw


@triton.jit
def _rows(logits_ptr, Hv, Wv, Hq, Wq, M, D: tl.constexpr, P, NM, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
          BLOCK_P: tl.constexpr):
    """This program's queries as _tile gives them, plus their reference points (the cell
    centres of the Hq x Wq grid), the softmax weights [BLOCK_Q, BLOCK_P] of their points,
    the point columns, the base index of their points and the first value row of image n."""
    Lq = Hq * Wq
    n, m, q, qmask, d, dmask = _tile(Lq, M, D, NM, BLOCK_Q, BLOCK_D)
    rx = ((q % Wq).to(tl.float32) + 0.5) / Wq
    ry = ((q // Wq).to(tl.float32) + 0.5) / Hq
    base = ((n * Lq + q) * M + m) * P
    w = _softmax_tile(logits_ptr, base, qmask, P, BLOCK_P)
    return Lq, n, m, q, qmask, d, dmask, rx, ry, base, w, tl.arange(0, BLOCK_P), n * Hv * Wv


@triton.jit
def _dca_fwd_kernel(value_ptr, off_ptr, logits_ptr, out_ptr, Hv, Wv, Hq, Wq, M, D: tl.constexpr, P, NM,
                    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    # value [N, Hv*Wv, M, D]; offsets [N, Lq, M, P, 2]; logits [N, Lq, M, P]; out [N, Lq, M, D]; NM = N * M
    Lq, n, m, q, qmask, d, dmask, rx, ry, base, w, pcol, row0 = _rows(logits_ptr, Hv, Wv, Hq, Wq, M, D, P, NM,
                                                                      BLOCK_Q, BLOCK_D, BLOCK_P)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for p in range(P):
        a, valid, h0, w0, lh, lw = _point(off_ptr, w, pcol, base, p, rx, ry, Hv, Wv, qmask)
        acc += _sample(value_ptr, row0, Hv, Wv, h0, w0, lh, lw, a, valid, m, M, D, d, dmask)
    out = out_ptr + ((n * Lq + q) * M + m)[:, None] * D + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])


@triton.jit
def _dca_bwd_kernel(value_ptr, off_ptr, logits_ptr, grad_out_ptr, grad_value_ptr, grad_off_ptr, grad_logits_ptr,
                    scale_ptr, Hv, Wv, Hq, Wq, M, D: tl.constexpr, P, NM,
                    DETERMINISTIC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    Lq, n, m, q, qmask, d, dmask, rx, ry, base, w, pcol, row0 = _rows(logits_ptr, Hv, Wv, Hq, Wq, M, D, P, NM,
                                                                      BLOCK_Q, BLOCK_D, BLOCK_P)
    g = tl.load(grad_out_ptr + ((n * Lq + q) * M + m)[:, None] * D + d[None, :],
                mask=qmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr)
    gw = tl.zeros([BLOCK_Q, BLOCK_P], dtype=tl.float32)  # dL/d(softmax weight) per point
    for p in range(P):
        a, valid, h0, w0, lh, lw = _point(off_ptr, w, pcol, base, p, rx, ry, Hv, Wv, qmask)
        g_a, g_w, g_h = _point_backward(value_ptr, grad_value_ptr, row0, Hv, Wv, h0, w0, lh, lw, a, valid, g,
                                        m, M, D, d, dmask, scale, DETERMINISTIC)
        gw += tl.where(pcol[None, :] == p, g_a[:, None], 0.0)
        # x = rx + off_x / Wv and w_im = x * Wv - 0.5: d w_im / d off_x = 1.
        tl.store(grad_off_ptr + 2 * (base + p), a * g_w, mask=qmask)
        tl.store(grad_off_ptr + 2 * (base + p) + 1, a * g_h, mask=qmask)
    # Softmax backward: dL/dlogit_p = w_p * (dL/dw_p - sum_k w_k dL/dw_k).
    dot = tl.sum(w * gw, axis=1)
    glog = w * (gw - dot[:, None])
    tl.store(grad_logits_ptr + base[:, None] + pcol[None, :], glog, mask=qmask[:, None] & (pcol < P)[None, :])


_fwd = autotuned(_dca_fwd_kernel, ["Hq", "Wq", "M", "D", "P"])
_bwd = autotuned(_dca_bwd_kernel, ["Hq", "Wq", "M", "D", "P"], reset_to_zero=["grad_value_ptr"])


def _sizes(value, offsets, logits, value_hw, query_hw, grad_output=None):
    """(N, M, D, P, (Hv, Wv), (Hq, Wq)) of a call, after check_shapes."""
    if value.dim() != 4 or offsets.dim() != 5:
        raise ValueError(f"deform_cross_attn (triton): value must be [N, Hv*Wv, M, D] and offsets [N, Hq*Wq, M, P, 2], "
                         f"got {tuple(value.shape)} and {tuple(offsets.shape)}")
    N, _, M, D = value.shape
    P = offsets.shape[3]
    (Hv, Wv), (Hq, Wq) = value_hw, query_hw
    want = {"value": (value, (N, Hv * Wv, M, D)), "offsets": (offsets, (N, Hq * Wq, M, P, 2)),
            "logits": (logits, (N, Hq * Wq, M, P))}
    if grad_output is not None:
        want["grad_output"] = (grad_output, (N, Hq * Wq, M * D))
    check_shapes("deform_cross_attn (triton)", want)
    return N, M, D, P, (Hv, Wv), (Hq, Wq)


def dca_forward(value, offsets, logits, value_hw, query_hw):
    """Shapes as in piip_kernels.deform_cross_attn; returns [N, Hq*Wq, M*D]."""
    value, offsets, logits = value.contiguous(), offsets.contiguous(), logits.contiguous()
    N, M, D, P, (Hv, Wv), (Hq, Wq) = _sizes(value, offsets, logits, value_hw, query_hw)
    out = torch.empty(N, Hq * Wq, M, D, device=value.device, dtype=value.dtype)
    if out.numel() == 0:
        return out.view(N, Hq * Wq, M * D)
    _fwd[query_grid(Hq * Wq, N * M)](value, offsets, logits, out, Hv, Wv, Hq, Wq, M, D, P, N * M,
                                     BLOCK_D=triton.next_power_of_2(D), BLOCK_P=triton.next_power_of_2(P))
    return out.view(N, Hq * Wq, M * D)


def dca_backward(grad_output, value, offsets, logits, value_hw, query_hw, deterministic: bool = False):
    """Gradients (value, offsets, logits)."""
    value, offsets, logits, go = value.contiguous(), offsets.contiguous(), logits.contiguous(), grad_output.contiguous()
    N, M, D, P, (Hv, Wv), (Hq, Wq) = _sizes(value, offsets, logits, value_hw, query_hw, go)
    if N * Hq * Wq * M * D == 0:
        return torch.zeros_like(value), torch.zeros_like(offsets), torch.zeros_like(logits)
    gv = torch.zeros(value.shape, device=value.device, dtype=torch.int64 if deterministic else torch.float32)
    goff = torch.empty(offsets.shape, device=value.device, dtype=torch.float32)
    glog = torch.empty(logits.shape, device=value.device, dtype=torch.float32)
    # Softmax weights are at most 1, and each of the Hq * Wq * P points reaches an entry at most once.
    scale = fixed_point_scale(go, Hq * Wq * P, softmax_bound(logits)) if deterministic else torch.ones((), dtype=torch.float64, device=value.device)
    _bwd[query_grid(Hq * Wq, N * M)](value, offsets, logits, go, gv, goff, glog, scale.reshape(1), Hv, Wv, Hq, Wq, M, D,
                                     P, N * M, DETERMINISTIC=deterministic, BLOCK_D=triton.next_power_of_2(D),
                                     BLOCK_P=triton.next_power_of_2(P))
    if deterministic:
        gv = fixed_point_result(gv, scale)
    return gv.to(value.dtype), goff.to(offsets.dtype), glog.to(logits.dtype)
