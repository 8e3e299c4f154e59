"""Variant 1 ("two_pass") of the deterministic MSDA backward (csrc/msda/msda_two_pass.cuh), run
under the CPU emulation of the CUDA execution model (tests/cuda_emulation/) and checked against
the float64 reference: grad_value gathered from a stably sorted list of contributions, with no
atomics, so the same bits every run and NaN exactly where the reference has it.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from piip_kernels.variants import VARIANTS

from helpers import (assert_msda_close, check_levels_outside_value, check_msda_nonfinite, msda_inputs,
                     msda_nonfinite_cases, run_with_grads)

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emulation"))
from emulated import NVCC  # noqa: E402  (the `emu` fixture is in conftest.py)

pytestmark = pytest.mark.skipif(NVCC is None and os.environ.get("PIIP_REQUIRE_NVCC") != "1",
                                reason="needs the CUDA headers (nvcc on PATH)")

TWO_PASS = VARIANTS["msda_backward_deterministic"].index("two_pass")


class EmulatedOp(torch.autograd.Function):
    """ms_deform_attn on the emulated kernels with a chosen deterministic backward variant."""

    @staticmethod
    def forward(ctx, emu, variant, value, shapes, starts, loc, attn):
        ctx.emu, ctx.variant = emu, variant
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        return emu.msda_forward(value, shapes, starts, loc, attn)

    @staticmethod
    def backward(ctx, grad_out):
        gv, gl, ga = ctx.emu.msda_backward(grad_out.contiguous(), *ctx.saved_tensors, deterministic=True,
                                           variant=ctx.variant)
        return None, None, gv, None, None, gl, ga


def two_pass(emu):
    return lambda *a: EmulatedOp.apply(emu, TWO_PASS, *a)


CASES = [  # (level grids, N, Lq, M, D, P)
    ([(5, 7)], 2, 9, 3, 6, 3),                            # 1 level, V = 2, 3 chunks per row
    ([(4, 4)], 3, 11, 5, 1, 4),                           # D = 1: one lane per row and cell
    ([(7, 11), (3, 5)], 2, 13, 2, 32, 4),                 # V = 4, 8 lanes
    ([(1, 1), (2, 3), (13, 17)], 1, 7, 2, 100, 2),        # 25 chunks; a 1 x 1 level: one long list per head
    ([(9, 9), (4, 4), (2, 2), (1, 1)], 2, 30, 8, 24, 4),  # 4 levels: 7680 entries (4 sort tiles), 1632 cells (3 passes)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{len(c[0])}-D{c[4]}")
def test_two_pass_matches_float64(emu, case):
    shapes, N, Lq, M, D, P = case
    inputs = msda_inputs(shapes, N=N, Lq=Lq, M=M, D=D, P=P, outside=0.3)
    got, grad_out = run_with_grads(two_pass(emu), inputs)
    assert_msda_close(got, grad_out, inputs, floor=1e-6)


@pytest.mark.parametrize("dtype,loc_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("D", [8, 24])
def test_two_pass_half_precision(emu, dtype, loc_dtype, D):
    inputs = msda_inputs([(7, 11), (3, 5)], N=2, Lq=11, M=2, D=D, P=4, dtype=dtype, loc_dtype=loc_dtype)
    got, grad_out = run_with_grads(two_pass(emu), inputs)
    assert got[1].dtype == dtype and got[2].dtype == loc_dtype and got[3].dtype == loc_dtype
    assert_msda_close(got, grad_out, inputs, floor=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_is_bit_identical_run_to_run(emu, dtype):
    # Many queries on a small map: dozens of contributions per value cell, whose float sum
    # would change with the order of atomics.
    inputs = msda_inputs([(6, 6), (2, 3)], N=2, Lq=40, M=4, D=8, P=4, dtype=dtype)
    runs = [run_with_grads(two_pass(emu), inputs, seed=3)[0] for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=lambda c: f"L{len(c[0])}-D{c[4]}")
def test_two_pass_agrees_with_fixed_point(emu, case):
    """Both are deterministic sums of the same contributions: grad_value agrees within fp32
    rounding, and the location and weight gradients (the same arithmetic in pass 1) are equal."""
    shapes, N, Lq, M, D, P = case
    inputs = msda_inputs(shapes, N=N, Lq=Lq, M=M, D=D, P=P, outside=0.3)
    fixed, grad_out = run_with_grads(lambda *a: EmulatedOp.apply(emu, 0, *a), inputs)
    got, _ = run_with_grads(two_pass(emu), inputs, grad_out)
    scale = fixed[1].abs().max().item()
    torch.testing.assert_close(got[1], fixed[1], rtol=0, atol=1e-5 * scale)
    assert not torch.equal(got[1], torch.zeros_like(got[1]))
    assert torch.equal(got[2], fixed[2]) and torch.equal(got[3], fixed[3])


# Unlike the fixed-point variant (NaN everywhere once a non-finite number reaches grad_value),
# these sums carry NaN and infinity exactly where the reference does.
@pytest.mark.parametrize("case", list(msda_nonfinite_cases()))
def test_two_pass_non_finite_numbers_as_in_the_reference(emu, case):
    check_msda_nonfinite(two_pass(emu), msda_nonfinite_cases()[case], torch.device("cpu"))


def test_two_pass_levels_outside_value_give_nan(emu):
    def backward(grad_out, value, shapes, starts, loc, attn):
        return emu.msda_backward(grad_out, value, shapes, starts, loc, attn, deterministic=True, variant=TWO_PASS)

    check_levels_outside_value(emu.msda_forward, backward, torch.device("cpu"))


def test_two_pass_sums_many_contributions_exactly(emu):
    """Every point of 64 queries on one pixel centre with weight 50 and grad_output 1: that pixel
    receives 256 contributions of 50 (a sum fp32 holds exactly), the others none."""
    H, W, Lq, P, D, big = 4, 4, 64, 4, 4, 50.0
    value = torch.randn(1, H * W, 1, D)
    loc = torch.empty(1, Lq, 1, 1, P, 2)
    loc[..., 0], loc[..., 1] = (2 + 0.5) / W, (1 + 0.5) / H
    attn = torch.full((1, Lq, 1, 1, P), big)
    gv, _, _ = emu.msda_backward(torch.ones(1, Lq, D), value, torch.tensor([[H, W]]), torch.tensor([0]), loc, attn,
                                 deterministic=True, variant=TWO_PASS)
    want = torch.zeros(1, H * W, 1, D)
    want[0, 1 * W + 2] = big * Lq * P
    assert torch.equal(gv, want)


@pytest.mark.parametrize("Lq,P", [(0, 3), (5, 0), (0, 0)])
def test_two_pass_empty_shapes(emu, Lq, P):
    value, shapes, starts, loc, attn = msda_inputs([(5, 7), (3, 4)], N=2, Lq=max(Lq, 1), M=2, D=8, P=max(P, 1))
    loc, attn = loc[:, :Lq, :, :, :P].contiguous(), attn[:, :Lq, :, :, :P].contiguous()
    grad_out = torch.randn(2, Lq, 2 * 8)
    gv, gl, ga = emu.msda_backward(grad_out, value, shapes, starts, loc, attn, deterministic=True, variant=TWO_PASS)
    assert torch.equal(gv, torch.zeros_like(value))  # every cell written, as zeros
    assert gl.shape == loc.shape and ga.shape == attn.shape


def test_unknown_deterministic_variant_is_refused(emu):
    inputs = msda_inputs([(5, 7)], N=1, Lq=3, M=2, D=8, P=2)
    value, shapes, starts, loc, attn = inputs
    grad_out = torch.randn(1, 3, 16)
    with pytest.raises(AssertionError, match="returned -2"):
        emu.msda_backward(grad_out, value, shapes, starts, loc, attn, deterministic=True,
                          variant=len(VARIANTS["msda_backward_deterministic"]))


def test_two_pass_refuses_what_its_int32_indices_cannot_hold(emu):
    """Sizes past int32 get no workspace size (-1; the glue raises a clear error there), and a
    workspace smaller than asked for is refused (cudaErrorInvalidValue) rather than overrun."""
    import ctypes

    from emulated import CODE, i64, p

    lib = emu.lib
    lib.piip_emu_msda_two_pass_workspace.restype = ctypes.c_int64
    assert lib.piip_emu_msda_two_pass_workspace(*i64(1, 2 ** 31, 1, 1, 1, 1)) == -1  # cells
    assert lib.piip_emu_msda_two_pass_workspace(*i64(1, 4, 8, 2 ** 26, 1, 1)) == -1  # 2^31 corners
    value, shapes, starts, loc, attn = msda_inputs([(5, 7)], N=1, Lq=3, M=2, D=8, P=2)
    size = lib.piip_emu_msda_two_pass_workspace(*i64(1, 35, 2, 3, 1, 2))
    assert size > 0
    workspace = torch.zeros(size, dtype=torch.uint8)
    grad_out = torch.randn(1, 3, 16)
    gv, gl, ga = (torch.full_like(t, float("nan")) for t in (value, loc, attn))
    rc = lib.piip_emu_msda_backward_two_pass(CODE[value.dtype], CODE[loc.dtype], p(grad_out), p(value), p(shapes), p(starts),
                                             p(loc), p(attn), p(workspace), ctypes.c_int64(size - 1), p(gv), p(gl), p(ga),
                                             *i64(1, 35, 2, 8, 3, 1, 2))
    assert rc == 1  # cudaErrorInvalidValue
    assert torch.isnan(gv).all()  # nothing ran
