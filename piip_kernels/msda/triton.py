"""Triton backend of multi-scale deformable attention (forward and backward).

Kernel, launcher, wrapper, in that order. One program handles BLOCK_Q queries of one
(image, head): for every level and point it loads the locations and weights of its
queries, gathers the four bilinear corners as [BLOCK_Q, BLOCK_D] tiles of ``value`` and
accumulates in fp32. The arithmetic is the one of csrc/msda/msda_math.h (the grid_sample
convention: pixel = location * size - 0.5, corners outside the map read zero).

The head dim D is a compile-time constant. Triton then knows that row offsets are
multiples of D's power-of-two factor and that the channel mask is constant over such
groups, so it loads several channels per instruction: 8-byte loads instead of 2-byte ones
for bf16 head dims 12 to 100, and about 55 registers instead of 120 in the compiler's
report. It costs one compilation per head dim.

The backward scatters grad_value with atomics. By default they are fp32 atomics (the
order of additions varies between runs); with ``deterministic=True`` every contribution
is rounded to a 64-bit fixed-point integer whose scale is fixed by max|grad_output| and
the number of points per row, and integer addition is associative, so every run gives
the same bits.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


ELEMENTS_PER_THREAD = 4


def _configs():
    # The interpreter gets one big block (it costs about a millisecond per program). On a GPU
    # the candidates are pruned per head dim by _prune to three.
    if INTERPRET:
        return [triton.Config({"BLOCK_Q": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_Q": bq}, num_warps=w) for bq in (8, 16, 32, 64) for w in (1, 2, 4, 8)]


def _prune(configs, named_args, **kwargs):
    """Keeps, for the head dim's BLOCK_D, the configs that give every thread ELEMENTS_PER_THREAD
    elements (one per BLOCK_Q) and one that gives it twice as many (16-byte loads of 16-bit
    values): at most four configs, so first-call autotuning stays short. The compiler's report
    (ptxas) shows why: registers grow with the elements per thread, to 255 with spills at
    16; at 4 the kernels need 48 to 80 registers, at 8 up to about 140, with at most 8 warps
    (16 would cap a thread at 128). tests/test_triton.py checks for spills at every config
    kept here."""
    if INTERPRET:
        return configs
    block_d = kwargs["BLOCK_D"]

    def per_thread(c):
        return c.kwargs["BLOCK_Q"] * block_d / (32 * c.num_warps)

    def widest(cs):  # BLOCK_Q = 8 only where nothing else fits (its backward spilled a little)
        return [c for c in cs if c.kwargs["BLOCK_Q"] >= 16] or cs

    kept = widest([c for c in configs if per_thread(c) == ELEMENTS_PER_THREAD])
    double = widest([c for c in configs if per_thread(c) == 2 * ELEMENTS_PER_THREAD])
    kept += sorted(double, key=lambda c: c.kwargs["BLOCK_Q"])[-1:]
    kept = kept or [min(configs, key=lambda c: abs(per_thread(c) - ELEMENTS_PER_THREAD))]
    # PIIP_TRITON_AUTOTUNE=0: the first config only, no timing runs (correctness tests on a
    # GPU compile many head dims and dtypes; bench/gpu_check.sh sets it for them).
    return kept[:1] if os.environ.get("PIIP_TRITON_AUTOTUNE", "1") == "0" else kept


def autotuned(kernel, key, **kw):
    """`kernel` autotuned over _configs() pruned by _prune (the deformable kernels share this)."""
    return triton.autotune(configs=_configs(), key=key, prune_configs_by={"early_config_prune": _prune}, **kw)(kernel)


@triton.jit
def _corner(value_ptr, row0, H, W, hh, ww, valid, m, M, D, d, dmask):
    """[BLOCK_Q, BLOCK_D] tile of value at corner (hh, ww) of each query, zero outside."""
    inside = valid & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    row = row0 + (hh * W + ww).to(tl.int64)
    ptrs = value_ptr + (row * M + m)[:, None] * D + d[None, :]
    return tl.load(ptrs, mask=inside[:, None] & dmask[None, :], other=0.0).to(tl.float32), inside, row


@triton.jit
def _scatter(gv_ptr, row, inside, coef, g, m, M, D, d, dmask, scale, DETERMINISTIC: tl.constexpr):
    """grad_value[row] += coef * g for each query whose corner is inside the map."""
    contrib = coef[:, None] * g
    ptrs = gv_ptr + (row * M + m)[:, None] * D + d[None, :]
    mask = inside[:, None] & dmask[None, :]
    if DETERMINISTIC:
        # Fixed point: integer additions are associative, so every run gives the same bits.
        fixed = tl.floor(contrib.to(tl.float64) * scale + 0.5).to(tl.int64)
        tl.atomic_add(ptrs, fixed, mask=mask)
    else:
        tl.atomic_add(ptrs, contrib, mask=mask)


# CUDA caps a launch grid at 2**31 - 1 programs on axis 0 and 65535 on axes 1 and 2. The
# kernels put blocks of queries (or pixels) on axis 0 and fold their rows (image x head, or
# the N * C planes of a merge) over axes 1 and 2, so more than 65535 rows still launch.
GRID_X_LIMIT = 2 ** 31 - 1
GRID_YZ_LIMIT = 65535


def launch_grid(blocks: int, rows: int) -> tuple[int, int, int]:
    """The grid for ``blocks`` programs per row and ``rows`` rows: (blocks, min(rows, limit),
    ceil(rows / limit)), rows folded over axes 1 and 2 (a kernel finds its row with _row; the
    programs past the last row do nothing). The limits are read at each call, so a test can
    lower them to run a folded launch in the interpreter."""
    slabs = triton.cdiv(rows, GRID_YZ_LIMIT)
    if blocks > GRID_X_LIMIT or slabs > GRID_YZ_LIMIT:
        raise ValueError(f"a launch of {blocks} program blocks x {rows} rows exceeds CUDA's grid limits "
                         f"({GRID_X_LIMIT} x {GRID_YZ_LIMIT} x {GRID_YZ_LIMIT})")
    return blocks, min(rows, GRID_YZ_LIMIT), slabs


@triton.jit
def _row():
    """This program's row in a grid from launch_grid."""
    return tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)


@triton.jit
def _tile(Lq, M, D, NM, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's image n, head m, BLOCK_Q queries and BLOCK_D channels (with masks);
    the grid is launch_grid(query blocks, NM = N * M)."""
    nm = _row()
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    return nm // M, nm % M, q, (q < Lq) & (nm < NM), d, d < D


@triton.jit
def _level(shapes_ptr, starts_ptr, lvl, n, S):
    """(H, W, first value row of level lvl in image n, whether the level lies inside value's
    S rows). As csrc/msda/msda_math.h's level_fits: index tensors on the GPU are not checked
    on the host (that would synchronise), so a level that does not fit is never read and
    poisons its outputs with NaN instead."""
    H = tl.load(shapes_ptr + 2 * lvl)
    W = tl.load(shapes_ptr + 2 * lvl + 1)
    start = tl.load(starts_ptr + lvl)
    fits = (H > 0) & (W > 0) & (H <= S) & (W <= S // tl.maximum(H, 1)) & (start >= 0) & (start <= S - H * W)
    return H, W, n * S + tl.where(fits, start, 0), fits


@triton.jit
def _bilinear(h_im, w_im, H, W, qmask):
    """Validity, top-left corner (h0, w0) and fractions (lh, lw) of pixel coordinates
    (h_im, w_im) = location * size - 0.5; the comparisons also reject NaN. An invalid point
    (no corner inside the map) gets corner (0, 0), never loaded, but keeps its fractions:
    NaN for a NaN or infinite coordinate, as the reference's bilinear weights. The sampling
    arithmetic then runs on its zero corners as the reference's does, and gives NaN where
    the reference does (see csrc/msda/msda_math.h)."""
    valid = qmask & (h_im > -1.0) & (w_im > -1.0) & (h_im < H) & (w_im < W)
    h0f = tl.floor(h_im)
    w0f = tl.floor(w_im)
    h0 = tl.where(valid, h0f, 0.0).to(tl.int32)
    w0 = tl.where(valid, w0f, 0.0).to(tl.int32)
    return valid, h0, w0, h_im - h0f, w_im - w0f


@triton.jit
def _point(loc_ptr, attn_ptr, n, q, m, Lq, M, L, P, lvl, p, H, W, qmask, fits):
    """Point p of level lvl for each query: its flat index, weight and bilinear setup
    (_bilinear's validity, corner and fractions; invalid where the level does not fit)."""
    pt = (((n * Lq + q) * M + m) * L + lvl) * P + p
    x = tl.load(loc_ptr + 2 * pt, mask=qmask, other=0.0).to(tl.float32)
    y = tl.load(loc_ptr + 2 * pt + 1, mask=qmask, other=0.0).to(tl.float32)
    a = tl.load(attn_ptr + pt, mask=qmask, other=0.0).to(tl.float32)
    valid, h0, w0, lh, lw = _bilinear(y * H - 0.5, x * W - 0.5, H, W, qmask & fits)
    return pt, a, valid, h0, w0, lh, lw


@triton.jit
def _sample(value_ptr, row0, H, W, h0, w0, lh, lw, a, valid, m, M, D, d, dmask):
    """a * bilinear sample of each query's point: [BLOCK_Q, BLOCK_D] fp32."""
    v00, _, _ = _corner(value_ptr, row0, H, W, h0, w0, valid, m, M, D, d, dmask)
    v01, _, _ = _corner(value_ptr, row0, H, W, h0, w0 + 1, valid, m, M, D, d, dmask)
    v10, _, _ = _corner(value_ptr, row0, H, W, h0 + 1, w0, valid, m, M, D, d, dmask)
    v11, _, _ = _corner(value_ptr, row0, H, W, h0 + 1, w0 + 1, valid, m, M, D, d, dmask)
    return ((1 - lh) * (1 - lw) * a)[:, None] * v00 + ((1 - lh) * lw * a)[:, None] * v01 \
        + (lh * (1 - lw) * a)[:, None] * v10 + (lh * lw * a)[:, None] * v11


@triton.jit
def _point_backward(value_ptr, gv_ptr, row0, H, W, h0, w0, lh, lw, a, valid, g, m, M, D, d, dmask, scale,
                    DETERMINISTIC: tl.constexpr):
    """Scatters a * w_c * g into grad_value and returns, per query, the derivatives of the
    sample with respect to its weight, w_im and h_im (msda_math.h's point_grads without the
    factors a * W and a * H): (g_attn, g_w, g_h). Corners outside the map read zero, so for
    an invalid point these are zero, or NaN where the reference's are (a non-finite
    coordinate or grad_output row)."""
    v00, i00, r00 = _corner(value_ptr, row0, H, W, h0, w0, valid, m, M, D, d, dmask)
    v01, i01, r01 = _corner(value_ptr, row0, H, W, h0, w0 + 1, valid, m, M, D, d, dmask)
    v10, i10, r10 = _corner(value_ptr, row0, H, W, h0 + 1, w0, valid, m, M, D, d, dmask)
    v11, i11, r11 = _corner(value_ptr, row0, H, W, h0 + 1, w0 + 1, valid, m, M, D, d, dmask)
    s00 = tl.sum(g * v00, axis=1)
    s01 = tl.sum(g * v01, axis=1)
    s10 = tl.sum(g * v10, axis=1)
    s11 = tl.sum(g * v11, axis=1)
    hh = 1 - lh
    hw = 1 - lw
    g_attn = hh * hw * s00 + hh * lw * s01 + lh * hw * s10 + lh * lw * s11
    g_w = -hh * s00 + hh * s01 - lh * s10 + lh * s11
    g_h = -hw * s00 - lw * s01 + hw * s10 + lw * s11
    _scatter(gv_ptr, r00, i00, a * hh * hw, g, m, M, D, d, dmask, scale, DETERMINISTIC)
    _scatter(gv_ptr, r01, i01, a * hh * lw, g, m, M, D, d, dmask, scale, DETERMINISTIC)
    _scatter(gv_ptr, r10, i10, a * lh * hw, g, m, M, D, d, dmask, scale, DETERMINISTIC)
    _scatter(gv_ptr, r11, i11, a * lh * lw, g, m, M, D, d, dmask, scale, DETERMINISTIC)
    return g_attn, g_w, g_h


@triton.jit
def _msda_fwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                     S, Lq, M, D: tl.constexpr, L, P, NM,
                     BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    # value [N, S, M, D]; shapes [L, 2]; starts [L]; loc [N, Lq, M, L, P, 2];
    # attn [N, Lq, M, L, P]; out [N, Lq, M, D]; NM = N * M
    n, m, q, qmask, d, dmask = _tile(Lq, M, D, NM, BLOCK_Q, BLOCK_D)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    unfit = 0
    for lvl in range(L):
        H, W, row0, fits = _level(shapes_ptr, starts_ptr, lvl, n, S)
        unfit += tl.where(fits, 0, 1)
        for p in range(P):
            pt, a, valid, h0, w0, lh, lw = _point(loc_ptr, attn_ptr, n, q, m, Lq, M, L, P, lvl, p, H, W, qmask, fits)
            acc += _sample(value_ptr, row0, H, W, h0, w0, lh, lw, a, valid, m, M, D, d, dmask)
    acc = tl.where(unfit > 0, float("nan"), acc)
    out = out_ptr + ((n * Lq + q) * M + m)[:, None] * D + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])


@triton.jit
def _msda_bwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                     grad_value_ptr, grad_loc_ptr, grad_attn_ptr, scale_ptr,
                     S, Lq, M, D: tl.constexpr, L, P, NM,
                     DETERMINISTIC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    # grad_out [N, Lq, M, D]; grad_value [N, S, M, D] fp32 (or int64 fixed point when
    # DETERMINISTIC); grad_loc [N, Lq, M, L, P, 2] and grad_attn [N, Lq, M, L, P] fp32.
    n, m, q, qmask, d, dmask = _tile(Lq, M, D, NM, BLOCK_Q, BLOCK_D)
    g = tl.load(grad_out_ptr + ((n * Lq + q) * M + m)[:, None] * D + d[None, :],
                mask=qmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr)
    for lvl in range(L):
        H, W, row0, fits = _level(shapes_ptr, starts_ptr, lvl, n, S)
        poison = tl.where(fits, 0.0, float("nan"))  # added to the gradients of a level that does not fit
        for p in range(P):
            pt, a, valid, h0, w0, lh, lw = _point(loc_ptr, attn_ptr, n, q, m, Lq, M, L, P, lvl, p, H, W, qmask, fits)
            g_attn, g_w, g_h = _point_backward(value_ptr, grad_value_ptr, row0, H, W, h0, w0, lh, lw, a, valid, g,
                                               m, M, D, d, dmask, scale, DETERMINISTIC)
            tl.store(grad_attn_ptr + pt, g_attn + poison, mask=qmask)
            tl.store(grad_loc_ptr + 2 * pt, a * W * g_w + poison, mask=qmask)
            tl.store(grad_loc_ptr + 2 * pt + 1, a * H * g_h + poison, mask=qmask)


def query_grid(Lq, rows):
    """The autotuned kernels' grid: blocks of BLOCK_Q queries, for each of ``rows`` rows."""
    return lambda meta: launch_grid(triton.cdiv(Lq, meta["BLOCK_Q"]), rows)


_fwd = autotuned(_msda_fwd_kernel, ["Lq", "M", "D", "L", "P"])
_bwd = autotuned(_msda_bwd_kernel, ["Lq", "M", "D", "L", "P"], reset_to_zero=["grad_value_ptr"])


def check_shapes(op: str, want: dict) -> None:
    """{name: (tensor, shape)}: raises ValueError naming the first tensor of another shape. The
    Triton wrappers check the shapes that keep the kernels' reads and writes inside their
    tensors: torch.ops.piip.* reaches them without the public functions' checks."""
    for name, (t, shape) in want.items():
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _sizes(value, spatial_shapes, level_start_index, loc, attn, grad_output=None):
    """(N, S, M, D, Lq, L, P) of a call, after check_shapes (the levels' fit inside value is
    checked by the kernels)."""
    if value.dim() != 4 or loc.dim() != 6:
        raise ValueError(f"ms_deform_attn (triton): value must be [N, S, M, D] and sampling_locations "
                         f"[N, Lq, M, L, P, 2], got {tuple(value.shape)} and {tuple(loc.shape)}")
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    want = {"sampling_locations": (loc, (N, Lq, M, L, P, 2)), "attention_weights": (attn, (N, Lq, M, L, P)),
            "spatial_shapes": (spatial_shapes, (L, 2)), "level_start_index": (level_start_index, (L,))}
    if grad_output is not None:
        want["grad_output"] = (grad_output, (N, Lq, M * D))
    check_shapes("ms_deform_attn (triton)", want)
    return N, S, M, D, Lq, L, P


def msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Shapes as in piip_kernels.ms_deform_attn; returns [N, Lq, M*D] in value's dtype."""
    value = value.contiguous()
    loc = sampling_locations.contiguous()
    attn = attention_weights.contiguous()
    N, S, M, D, Lq, L, P = _sizes(value, spatial_shapes, level_start_index, loc, attn)
    out = torch.empty(N, Lq, M, D, device=value.device, dtype=value.dtype)
    if out.numel() == 0:
        return out.view(N, Lq, M * D)
    if L * P == 0:
        return out.zero_().view(N, Lq, M * D)
    _fwd[query_grid(Lq, N * M)](value, spatial_shapes.contiguous(), level_start_index.contiguous(), loc, attn, out,
                                S, Lq, M, D, L, P, N * M, BLOCK_D=triton.next_power_of_2(D))
    return out.view(N, Lq, M * D)


def fixed_point_scale(grad_output: torch.Tensor, points_per_entry: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Scale of the deterministic fixed-point accumulation, as a device scalar (no host sync).

    Every point adds ``weight * w_c * grad_output`` (bilinear ``w_c <= 1``) to a grad_value
    entry at most once, so no entry's sum exceeds ``points_per_entry x max|weight| x
    max|grad_output|``; that bound maps to 2**62, half the int64 range. ``weights=None``
    means weights bounded by 1 (a softmax). A non-finite grad_output or weight makes the
    scale non-finite or zero, and ``fixed_point_result`` then returns NaN everywhere
    instead of a wrapped integer sum.
    """
    bound = grad_output.detach().abs().amax().double()
    if weights is not None:
        bound = bound * weights.detach().abs().amax().double()
    return 2.0 ** 62 / (bound.clamp_min(1e-30) * max(1, points_per_entry))


def softmax_bound(logits: torch.Tensor) -> torch.Tensor:
    """The ``weights`` to give ``fixed_point_scale`` for softmax weights over the last axis of
    ``logits``: 1 per head (softmax weights are at most 1), or NaN for a head whose softmax is
    not finite (a NaN or +inf logit, or every logit -inf), so that grad_value is NaN rather
    than a sum of rounded NaNs."""
    return logits.detach().amax(-1) * 0 + 1


def fixed_point_result(acc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float64 sums of an int64 fixed-point accumulator (NaN where the scale is unusable)."""
    usable = torch.isfinite(scale) & (scale > 0)
    return torch.where(usable, acc.double() / scale, torch.full_like(scale, float("nan")))


def msda_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  deterministic: bool = False):
    """Gradients (value, sampling_locations, attention_weights)."""
    value = value.contiguous()
    loc = sampling_locations.contiguous()
    attn = attention_weights.contiguous()
    go = grad_output.contiguous()
    N, S, M, D, Lq, L, P = _sizes(value, spatial_shapes, level_start_index, loc, attn, go)
    if N * Lq * M * D * L * P == 0:
        return torch.zeros_like(value), torch.zeros_like(loc), torch.zeros_like(attn)
    gv = torch.zeros(value.shape, device=value.device, dtype=torch.int64 if deterministic else torch.float32)
    gl = torch.empty(loc.shape, device=value.device, dtype=torch.float32)
    ga = torch.empty(attn.shape, device=value.device, dtype=torch.float32)
    # An entry of level l can receive one contribution from each of the Lq * P points on that level.
    scale = fixed_point_scale(go, Lq * P, attn) if deterministic else torch.ones((), dtype=torch.float64, device=value.device)
    _bwd[query_grid(Lq, N * M)](value, spatial_shapes.contiguous(), level_start_index.contiguous(), loc, attn, go,
                                gv, gl, ga, scale.reshape(1), S, Lq, M, D, L, P, N * M,
                                DETERMINISTIC=deterministic, BLOCK_D=triton.next_power_of_2(D))
    if deterministic:
        gv = fixed_point_result(gv, scale)
    return gv.to(value.dtype), gl.to(loc.dtype), ga.to(attn.dtype)
