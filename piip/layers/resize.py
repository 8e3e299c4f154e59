"""Separable resizing with the interpolation weights of ``F.interpolate``, as small matmuls.

A bicubic or bilinear resize is linear and separable: ``out = Wh @ x @ Ww^T`` with one
[out, in] weight matrix per axis. PyTorch computes those weights in its kernels
(``aten/src/ATen/native/UpSample.h``): the scale ``area_pixel_compute_scale`` (in / out when
sizes are given, 1 / scale_factor otherwise), the source coordinate
``area_pixel_compute_source_index`` (``scale * (dst + 0.5) - 0.5``, clamped at 0 for linear
modes only), ``guard_index_and_lambda`` (index = min(floor, in - 1), fraction clamped to
[0, 1]), the cubic convolution with A = -0.75 (``get_cubic_upsample_coefficients``), and taps
outside the map read the border pixel. :func:`reference_matrix` writes that arithmetic out.

The kernels differ from it, and from each other, in the last bit of the source coordinate:
the compiler fuses ``scale * (dst + 0.5) - 0.5`` into one multiply-add in some kernels and
not in others (on x86 CPUs the vectorised forward does, the backward does not), which moves a
weight by up to about 1e-6 (fp32) at 30-pixel grids. So the matrices used here are read from
``F.interpolate`` itself, on the same device and dtype: the forward weights from resizing a
batch of one-hot rows, the backward weights from its backward on one-hot gradients
(:func:`interpolation_matrices`, cached). The matmuls then equal ``F.interpolate`` and its
backward to the rounding of the sums (tests/test_resize.py: every preset's position-embedding
shape, forward and backward, fp32 and fp64).

Why: every ViT/CLIP branch resizes its position embedding each step. The bicubic kernel's
backward scatters with atomics (on a GPU, milliseconds per call at PIIP sizes); here the
backward is two more small dense matmuls, deterministic.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("bicubic", "bilinear")
_A = -0.75  # PyTorch's cubic convolution constant


def _cubic1(x: Tensor) -> Tensor:
    # |x| <= 1 branch of the cubic convolution kernel, in PyTorch's operation order.
    return ((_A + 2) * x - (_A + 3)) * x * x + 1


def _cubic2(x: Tensor) -> Tensor:
    # 1 < |x| < 2 branch.
    return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A


def _check(in_size: int, out_size: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"resize: mode must be one of {MODES}, got {mode!r}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize: sizes must be positive, got {in_size} -> {out_size}")


def reference_matrix(in_size: int, out_size: int, mode: str = "bicubic", align_corners: bool = False,
                     scale: float | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """[out_size, in_size] weights of a 1-D resize, written out from PyTorch's formulas and
    computed in ``dtype`` operation by operation (no fused multiply-adds). ``scale`` is the
    ``scale_factor`` F.interpolate would be given (None: sizes given, scale = in / out).
    This is the specification :func:`interpolation_matrices` is checked against."""
    _check(in_size, out_size, mode)
    dt = dtype
    if align_corners:
        s = torch.tensor((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0, dtype=dt)
    elif scale is not None and scale > 0:
        s = torch.tensor(1.0 / scale, dtype=dt)
    else:
        s = torch.tensor(float(in_size), dtype=dt) / out_size  # static_cast<scalar_t>(in) / out
    dst = torch.arange(out_size, dtype=dt)
    real = s * dst if align_corners else s * (dst + 0.5) - 0.5
    if mode == "bilinear":
        real = real.clamp(min=0)  # linear modes clamp the coordinate at 0; cubic does not
    idx = real.floor().clamp(max=in_size - 1)
    lam = (real - idx).clamp(0, 1)
    idx = idx.long()
    W = torch.zeros(out_size, in_size, dtype=dt)
    rows = torch.arange(out_size)
    if mode == "bicubic":
        taps = [(idx - 1 + k).clamp(0, in_size - 1) for k in range(4)]
        coeffs = (_cubic2(lam + 1.0), _cubic1(lam), _cubic1(1.0 - lam), _cubic2((1.0 - lam) + 1.0))
    else:
        taps = [idx, idx + (idx < in_size - 1).long()]
        coeffs = (1.0 - lam, lam)
    for t, c in zip(taps, coeffs):
        W.index_put_((rows, t), c, accumulate=True)  # border taps add up on the border pixel
    return W


@functools.lru_cache(maxsize=512)
def interpolation_matrices(in_size: int, out_size: int, mode: str = "bicubic", align_corners: bool = False,
                           dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """(forward, backward) [out_size, in_size] weights of ``F.interpolate`` along one axis on
    ``device`` in ``dtype``: ``F.interpolate(x)`` equals ``W_fwd @ x`` and its backward
    ``W_bwd^T @ grad`` up to the order of the additions.

    Read from F.interpolate: a batch of ``in_size`` one-hot columns resized to ``out_size``
    gives W_fwd column by column (the other axis is 1 -> 1, whose weights are exactly 0, 1,
    0, 0), and the backward of ``out_size`` one-hot gradients gives W_bwd row by row.
    Cached: the matrices are constants (callers must not modify them), built once per
    device, so later calls and CUDA-graph captures copy nothing from the host.
    """
    _check(in_size, out_size, mode)
    kw = dict(mode=mode, align_corners=align_corners)
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
        eye = torch.eye(in_size, dtype=dtype, device=device).reshape(in_size, 1, in_size, 1)
        fwd = F.interpolate(eye, size=(out_size, 1), **kw).reshape(in_size, out_size).T.contiguous()
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
        x = torch.zeros(out_size, 1, in_size, 1, dtype=dtype, device=device, requires_grad=True)
        y = F.interpolate(x, size=(out_size, 1), **kw)
        (bwd,) = torch.autograd.grad(y, x, torch.eye(out_size, dtype=dtype, device=device).reshape(y.shape))
    return fwd, bwd.reshape(out_size, in_size).contiguous()


class _GridTokensResize(torch.autograd.Function):
    """tokens [B, gh*gw, C] on a row-major grid -> [B, h*w, C]: along the width, then the height
    (the order of PyTorch's separable kernels); the backward applies the backward weights."""

    @staticmethod
    def forward(ctx, tokens, grid, size, Wh, Ww, Wh_b, Ww_b):
        B, _, C = tokens.shape
        (gh, gw), (h, w) = grid, size
        ctx.shapes = (B, C, gh, gw, h, w)
        ctx.save_for_backward(Wh_b, Ww_b)
        t = Ww @ tokens.reshape(B * gh, gw, C)           # [B*gh, w, C]
        return (Wh @ t.reshape(B, gh, w * C)).reshape(B, h * w, C)

    @staticmethod
    def backward(ctx, grad):
        B, C, gh, gw, h, w = ctx.shapes
        Wh_b, Ww_b = ctx.saved_tensors
        g = Wh_b.T @ grad.reshape(B, h, w * C)             # [B, gh, w*C]
        g = Ww_b.T @ g.reshape(B * gh, w, C)               # [B*gh, gw, C]
        return g.reshape(B, gh * gw, C), None, None, None, None, None, None


def _matrices(n_in: int, n_out: int, mode: str, align_corners: bool, t: Tensor):
    if not t.is_floating_point():
        raise ValueError(f"resize: a floating-point input is needed, got {t.dtype}")
    return interpolation_matrices(n_in, n_out, mode, bool(align_corners), t.dtype, str(t.device))


def resize_grid_tokens(tokens: Tensor, grid: tuple[int, int], size: tuple[int, int], mode: str = "bicubic",
                       align_corners: bool = False) -> Tensor:
    """Tokens of a row-major grid [B, gh*gw, C] -> [B, h*w, C]: equal (to rounding) to
    permuting them to a [B, C, gh, gw] map, ``F.interpolate(map, size, mode, align_corners)``
    and flattening back, forward and backward, without the permutes."""
    B, n, C = tokens.shape
    (gh, gw), (h, w) = tuple(grid), tuple(size)
    if n != gh * gw:
        raise ValueError(f"resize_grid_tokens: {n} tokens do not form the {gh}x{gw} grid")
    Wh, Wh_b = _matrices(gh, h, mode, align_corners, tokens)
    Ww, Ww_b = _matrices(gw, w, mode, align_corners, tokens)
    return _GridTokensResize.apply(tokens, (gh, gw), (h, w), Wh, Ww, Wh_b, Ww_b)


def resize_2d(x: Tensor, size: tuple[int, int], mode: str = "bicubic", align_corners: bool = False) -> Tensor:
    """``F.interpolate(x, size, mode=mode, align_corners=align_corners)`` for a map
    x [B, C, H, W] -> [B, C, h, w], through :func:`resize_grid_tokens`."""
    B, C, H, W = x.shape
    out = resize_grid_tokens(x.flatten(2).transpose(1, 2), (H, W), size, mode, align_corners)
    return out.transpose(1, 2).reshape(B, C, *size)
