"""Triton backend of branch_merge (forward and gather-only backward).

Kernel, launcher, wrapper, in that order. Maps are stacks of planes (N * C of them).
The block size and warp count of both kernels are autotuned per size (FORWARD_CONFIGS,
BACKWARD_CONFIGS; the interpreter gets one config each).
Forward: one program writes BLOCK output pixels of one plane, computing each branch's
bilinear taps in registers (the rule of csrc/merge/merge_math.h, i.e. torch's
upsample_bilinear2d with an output size) and summing the weighted samples: every map is
read once and the output written once. Backward, per branch: one program owns BLOCK
input pixels and gathers from the output pixels whose taps touch them (a few rows and
columns, bounded by the scale), so there are no atomics; the weight gradient is summed
from per-program partial sums in a fixed order. Both are deterministic.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..msda.triton import INTERPRET, _row, check_shapes, launch_grid


def _configs(candidates):
    # The interpreter gets one big block (it costs about a millisecond per program).
    if INTERPRET:
        return [triton.Config({"BLOCK": 1024}, num_warps=4)]
    return [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in candidates]


# (BLOCK, num_warps) candidates: 2 to 8 pixels per thread (the backward's gather loop is
# longer per pixel, so it leans to fewer pixels per thread).
FORWARD_CONFIGS = _configs([(256, 2), (256, 4), (512, 4), (512, 8), (1024, 4), (1024, 8)])
BACKWARD_CONFIGS = _configs([(128, 2), (256, 2), (256, 4), (512, 4), (512, 8), (1024, 8)])


def _prune(configs, named_args, **kwargs):
    # PIIP_TRITON_AUTOTUNE=0: the first config only, no timing runs (as msda/triton.py).
    return configs[:1] if os.environ.get("PIIP_TRITON_AUTOTUNE", "1") == "0" else configs


@triton.jit
def _tap(o, size_in, scale, ALIGN: tl.constexpr):
    """(i0, i1, l): input indices read by output index o and the weight of i1."""
    of = o.to(tl.float32)
    if ALIGN:
        src = scale * of
    else:
        src = tl.maximum(scale * (of + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), size_in - 1)  # src >= 0: truncation is floor
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.where(i0 < size_in - 1, i0 + 1, i0)
    return i0, i1, lam


@triton.jit
def _sample(f_ptr, plane, H, W, sy, sx, oy, ox, mask, ALIGN: tl.constexpr, IDENTITY: tl.constexpr):
    if IDENTITY:  # a map of the output's size is read, not resampled (as the reference does)
        return tl.load(f_ptr + plane * H * W + oy * W + ox, mask=mask, other=0.0).to(tl.float32)
    y0, y1, ly = _tap(oy, H, sy, ALIGN)
    x0, x1, lx = _tap(ox, W, sx, ALIGN)
    base = f_ptr + plane * H * W
    v00 = tl.load(base + y0 * W + x0, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(base + y0 * W + x1, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(base + y1 * W + x0, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(base + y1 * W + x1, mask=mask, other=0.0).to(tl.float32)
    top = v00 + lx * (v01 - v00)
    bot = v10 + lx * (v11 - v10)
    return top + ly * (bot - top)


@triton.jit
def _merge_fwd_kernel(out_ptr, w_ptr, f0, f1, f2, f3, H0, W0, H1, W1, H2, W2, H3, W3,
                      sy0, sx0, sy1, sx1, sy2, sx2, sy3, sx3, Ho, Wo, planes,
                      NB: tl.constexpr, ALIGN: tl.constexpr, ID0: tl.constexpr, ID1: tl.constexpr, ID2: tl.constexpr,
                      ID3: tl.constexpr, BLOCK: tl.constexpr):
    # f_i [planes, H_i, W_i]; out [planes, Ho, Wo]; weights [NB] fp32; ID_i: map i has the output's size;
    # the grid is launch_grid(pixel blocks, planes)
    plane = _row()
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = (k < Ho * Wo) & (plane < planes)
    oy = k // Wo
    ox = k % Wo
    acc = tl.load(w_ptr).to(tl.float32) * _sample(f0, plane, H0, W0, sy0, sx0, oy, ox, mask, ALIGN, ID0)
    if NB > 1:
        acc += tl.load(w_ptr + 1).to(tl.float32) * _sample(f1, plane, H1, W1, sy1, sx1, oy, ox, mask, ALIGN, ID1)
    if NB > 2:
        acc += tl.load(w_ptr + 2).to(tl.float32) * _sample(f2, plane, H2, W2, sy2, sx2, oy, ox, mask, ALIGN, ID2)
    if NB > 3:
        acc += tl.load(w_ptr + 3).to(tl.float32) * _sample(f3, plane, H3, W3, sy3, sx3, oy, ox, mask, ALIGN, ID3)
    tl.store(out_ptr + plane * Ho * Wo + k, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _axis_read(o, i, size_in, scale, ALIGN: tl.constexpr):
    """(weight with which output index o reads input index i, whether it reads it at all). A
    tap of weight 0 is a read all the same: the reference multiplies its gradient by 0, so a
    NaN in grad_output reaches that input (0 * NaN) there too."""
    i0, i1, lam = _tap(o, size_in, scale, ALIGN)
    return tl.where(i0 == i, 1.0 - lam, 0.0) + tl.where(i1 == i, lam, 0.0), (i0 == i) | (i1 == i)


@triton.jit
def _merge_bwd_kernel(grad_out_ptr, f_ptr, grad_f_ptr, partial_ptr, weight_ptr, H, W, Ho, Wo, sy, sx, inv_sy, inv_sx,
                      KY, KX, planes, SHARES, ALIGN: tl.constexpr, IDENTITY: tl.constexpr, BLOCK: tl.constexpr):
    # grad_out [planes, Ho, Wo]; f, grad_f [planes, H, W]; partial [planes, SHARES] fp32, zeros
    # past this config's programs;
    # IDENTITY: the map has the output's size (its gradient is grad_out itself, as the reference's);
    # the grid is launch_grid(pixel blocks, planes)
    plane = _row()
    pid = tl.program_id(0)
    k = pid * BLOCK + tl.arange(0, BLOCK)
    mask = (k < H * W) & (plane < planes)
    iy = k // W
    ix = k % W
    g_base = grad_out_ptr + plane * Ho * Wo
    if IDENTITY:
        G = tl.load(g_base + k, mask=mask, other=0.0).to(tl.float32)
    else:
        G = _gather(g_base, iy, ix, mask, H, W, Ho, Wo, sy, sx, inv_sy, inv_sx, KY, KX, ALIGN, BLOCK)
    w = tl.load(weight_ptr).to(tl.float32)
    f = tl.load(f_ptr + plane * H * W + k, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_f_ptr + plane * H * W + k, (w * G).to(grad_f_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + plane * SHARES + pid, tl.sum(f * G, axis=0), mask=plane < planes)


@triton.jit
def _gather(g_base, iy, ix, mask, H, W, Ho, Wo, sy, sx, inv_sy, inv_sx, KY, KX, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """Sum over the output pixels that read input pixel (iy, ix) of their tap weight times
    grad_out: the unweighted gradient of the resampled map at each input pixel."""
    # First output index that can read input index i: where the source coordinate passes i - 1.
    if ALIGN:
        ly = tl.maximum(((iy - 1).to(tl.float32) * inv_sy).to(tl.int32) - 1, 0)
        lx = tl.maximum(((ix - 1).to(tl.float32) * inv_sx).to(tl.int32) - 1, 0)
    else:
        ly = tl.maximum(((iy.to(tl.float32) - 0.5) * inv_sy - 0.5).to(tl.int32) - 1, 0)
        lx = tl.maximum(((ix.to(tl.float32) - 0.5) * inv_sx - 0.5).to(tl.int32) - 1, 0)
    G = tl.zeros([BLOCK], dtype=tl.float32)
    for a in range(KY):
        oy = ly + a
        wy, ry = _axis_read(oy, iy, H, sy, ALIGN)
        for b in range(KX):
            ox = lx + b
            wx, rx = _axis_read(ox, ix, W, sx, ALIGN)
            g = tl.load(g_base + oy * Wo + ox, mask=mask & ry & rx & (oy < Ho) & (ox < Wo), other=0.0).to(tl.float32)
            G += wy * wx * g
    return G


# The kernels autotuned per size (the sizes of the key, and the dtypes). The backward's
# partial is zeroed again after the timing runs: a config of bigger blocks writes fewer shares.
_fwd = triton.autotune(configs=FORWARD_CONFIGS, key=["Ho", "Wo", "planes", "H0", "W0", "H1", "W1", "H2", "W2", "H3", "W3"],
                       prune_configs_by={"early_config_prune": _prune})(_merge_fwd_kernel)
_bwd = triton.autotune(configs=BACKWARD_CONFIGS, key=["H", "W", "Ho", "Wo", "planes"], reset_to_zero=["partial_ptr"],
                       prune_configs_by={"early_config_prune": _prune})(_merge_bwd_kernel)


def _scales(H, W, Ho, Wo, align_corners):
    if align_corners:
        return ((H - 1) / (Ho - 1) if Ho > 1 else 0.0), ((W - 1) / (Wo - 1) if Wo > 1 else 0.0)
    return H / Ho, W / Wo


def _candidates(scale, out):
    # Output indices whose source coordinate lies within one pixel of an input index: at
    # most 2 / scale + 1 of them; the search starts one early, hence the margin; never more
    # than the axis' `out`. A zero scale (align_corners with an input side of 1, or an
    # output side of 1) has every output read input 0: all `out` are candidates.
    return out if scale <= 0 else min(out, int(math.ceil(2.0 / scale)) + 4)


def _check_maps(features, weights, grad_output=None):
    """check_shapes for a merge: every map [N, C, H_i, W_i] with the first map's N and C,
    weights [len(features)], grad_output [N, C, Ho, Wo]."""
    if any(t.dim() != 4 for t in features + ([] if grad_output is None else [grad_output])):
        raise ValueError("branch_merge (triton): every map (and grad_output) must be [N, C, H, W]")
    N, C = features[0].shape[:2]
    want = {f"features[{i}]": (f, (N, C, *f.shape[2:])) for i, f in enumerate(features)}
    want["weights"] = (weights, (len(features),))
    if grad_output is not None:
        want["grad_output"] = (grad_output, (N, C, *grad_output.shape[2:]))
    check_shapes("branch_merge (triton)", want)


def merge_forward(features, weights, out_size, align_corners):
    """Shapes as in piip_kernels.branch_merge; at most 4 maps per launch."""
    _check_maps(list(features), weights)
    if len(features) > 4:
        # One launch takes 4 maps; more are merged in groups and summed.
        parts = [merge_forward(features[i:i + 4], weights[i:i + 4], out_size, align_corners) for i in range(0, len(features), 4)]
        return torch.stack(parts).sum(0)
    feats = [f.contiguous() for f in features]
    N, C = feats[0].shape[:2]
    Ho, Wo = out_size
    out_dtype = torch.promote_types(feats[0].dtype, weights.dtype)
    out = torch.empty(N, C, Ho, Wo, device=feats[0].device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    w = weights.float().contiguous()
    args, scales = [], []
    for i in range(4):
        f = feats[min(i, len(feats) - 1)]
        H, W = f.shape[2:]
        args += [f]
        scales += [H, W]
    sc, identity = [], {}
    for i in range(4):
        H, W = feats[min(i, len(feats) - 1)].shape[2:]
        sc += list(_scales(H, W, Ho, Wo, align_corners))
        identity[f"ID{i}"] = (H, W) == (Ho, Wo)
    grid = lambda meta: launch_grid(triton.cdiv(Ho * Wo, meta["BLOCK"]), N * C)  # noqa: E731
    _fwd[grid](out, w, *args, *scales, *sc, Ho, Wo, N * C, NB=len(feats), ALIGN=bool(align_corners), **identity)
    return out


def merge_backward(grad_output, features, weights, align_corners):
    """(grad of every map, grad of the weights)."""
    _check_maps(list(features), weights, grad_output)
    go = grad_output.contiguous()
    N, C, Ho, Wo = go.shape
    grads, gw = [], []
    for i, f in enumerate(features):
        f = f.contiguous()
        H, W = f.shape[2:]
        sy, sx = _scales(H, W, Ho, Wo, align_corners)
        gf = torch.empty_like(f, memory_format=torch.contiguous_format)
        # One share per program of the smallest block; bigger blocks leave zeros at the end.
        shares = triton.cdiv(H * W, min(c.kwargs["BLOCK"] for c in BACKWARD_CONFIGS))
        partial = torch.zeros(N * C, shares, device=f.device, dtype=torch.float32)
        if f.numel():
            _bwd[lambda meta: launch_grid(triton.cdiv(H * W, meta["BLOCK"]), N * C)](
                go, f, gf, partial, weights[i:i + 1].float().contiguous(), H, W, Ho, Wo, sy, sx,
                1.0 / sy if sy > 0 else 0.0, 1.0 / sx if sx > 0 else 0.0, _candidates(sy, Ho), _candidates(sx, Wo), N * C,
                shares, ALIGN=bool(align_corners), IDENTITY=(H, W) == (Ho, Wo))
        grads.append(gf)
        gw.append(partial.double().sum())
    return grads, torch.stack(gw).to(weights.dtype)
