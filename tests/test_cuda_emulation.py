"""The CUDA kernels of csrc/, run on the CPU under an emulation of the CUDA execution model
(tests/cuda_emulation/emulation.h: an OS thread per CUDA thread, warp shuffles through
barriers, atomics) and checked against the float64 reference.

The kernels are compiled unchanged, with the launch_* functions, vector-width choice and
parameter builders the glue uses, so this checks the GPU code's thread mapping, lane groups
and shuffle masks, vector loads, atomics, fixed-point accumulation and finishing kernels
without a GPU. It cannot check what only the hardware does (speed, the memory model beyond
atomics, the rounding of the fast-math intrinsics); tests/test_cuda.py does that on a GPU.
"""
import ctypes
import os
import sys
from pathlib import Path

import pytest
import torch

from piip_kernels.dca.reference import deform_cross_attn_reference
from piip_kernels.merge.reference import branch_merge_reference

from piip_kernels.variants import VARIANTS

from helpers import (assert_derived_close, assert_msda_close, check_dca_nonfinite, check_fixed_point_extremes, check_levels_outside_value,
                     check_merge_against_reference, check_merge_nonfinite, check_msda_nonfinite, dca_grads, dca_inputs,
                     dca_nonfinite_cases, merge_edge_cases, merge_grads, merge_inputs, merge_nonfinite_cases, msda_inputs,
                     msda_nonfinite_cases, run_with_grads)

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emulation"))
from emulated import NVCC  # noqa: E402  (the `emu` fixture is in conftest.py)

pytestmark = pytest.mark.skipif(NVCC is None and os.environ.get("PIIP_REQUIRE_NVCC") != "1",
                                reason="needs the CUDA headers (nvcc on PATH)")

class EmulatedOp(torch.autograd.Function):
    """ms_deform_attn on the emulated kernels (forward variant `fwd`, backward variant `bwd`), so
    the helpers' gradient runs apply."""

    @staticmethod
    def forward(ctx, emu, deterministic, value, shapes, starts, loc, attn, fwd=0, bwd=0):
        ctx.emu, ctx.deterministic, ctx.bwd = emu, deterministic, bwd
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        return emu.msda_forward(value, shapes, starts, loc, attn, variant=fwd)

    @staticmethod
    def backward(ctx, grad_out):
        gv, gl, ga = ctx.emu.msda_backward(grad_out.contiguous(), *ctx.saved_tensors, deterministic=ctx.deterministic,
                                           variant=ctx.bwd)
        return None, None, gv, None, None, gl, ga, None, None


# Every kernel variant of the msda ops (read from piip_kernels/variants.py, so a new one is tested
# without an edit here): each forward variant with backward 0, each other backward variant with
# forward 0, as (forward, backward).
FORWARDS, BACKWARDS = VARIANTS["msda_forward"], VARIANTS["msda_backward"]
VARIANT_PAIRS = [(f, 0) for f in range(len(FORWARDS))] + [(0, b) for b in range(1, len(BACKWARDS))]


def pair_id(pair):
    f, b = pair
    return f"fwd-{FORWARDS[f]}" if b == 0 else f"bwd-{BACKWARDS[b]}"


def msda_fn(emu, deterministic, pair):
    return lambda *a: EmulatedOp.apply(emu, deterministic, *a, *pair)  # noqa: E731


MSDA_CASES = [  # (level grids, N, Lq, M, D, P): D picks the vector width and the lanes per row
    ([(5, 7), (3, 4)], 2, 9, 3, 6, 3),           # V = 2, 3 chunks: a 4-lane group with an idle lane
    ([(7, 11), (3, 5)], 2, 13, 2, 32, 4),        # V = 4, 8 lanes
    ([(1, 1), (2, 3), (13, 17)], 1, 7, 2, 100, 2),  # 25 chunks: a full warp
    ([(6, 5)], 1, 5, 1, 300, 2),                 # 75 chunks: several per lane
    ([(4, 4)], 3, 11, 5, 1, 4),                  # V = 1, one lane per row
    ([(9, 9), (4, 4), (2, 2), (1, 1)], 2, 30, 8, 24, 4),  # 4 levels, many rows per block
]


# The deterministic (fixed-point) backward has variant 0 only in msda_cuda.cuh.
@pytest.mark.parametrize("pair,deterministic", [(p, False) for p in VARIANT_PAIRS] + [((0, 0), True)],
                         ids=lambda x: pair_id(x) if isinstance(x, tuple) else ("det" if x else "atomic"))
@pytest.mark.parametrize("case", MSDA_CASES, ids=lambda c: f"L{len(c[0])}-D{c[4]}")
def test_emulated_msda_matches_float64(emu, case, pair, deterministic):
    shapes, N, Lq, M, D, P = case
    inputs = msda_inputs(shapes, N=N, Lq=Lq, M=M, D=D, P=P, outside=0.3)
    fn = msda_fn(emu, deterministic, pair)
    got, grad_out = run_with_grads(fn, inputs)
    assert_msda_close(got, grad_out, inputs, floor=1e-6)


@pytest.mark.parametrize("dtype,loc_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("D", [8, 12, 24, 40])
@pytest.mark.parametrize("pair", VARIANT_PAIRS, ids=pair_id)
def test_emulated_msda_half_precision(emu, dtype, loc_dtype, D, pair):
    inputs = msda_inputs([(7, 11), (3, 5)], N=2, Lq=11, M=2, D=D, P=4, dtype=dtype, loc_dtype=loc_dtype)
    got, grad_out = run_with_grads(msda_fn(emu, False, pair), inputs)
    assert got[0].dtype == dtype and got[2].dtype == loc_dtype
    assert_msda_close(got, grad_out, inputs, floor=1e-3)


def test_emulated_msda_deterministic_is_bit_identical(emu):
    inputs = msda_inputs([(6, 6)], N=2, Lq=40, M=4, D=8, P=4)
    runs = [run_with_grads(lambda *a: EmulatedOp.apply(emu, True, *a), inputs, seed=3)[0] for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_emulated_msda_fixed_point_extremes(emu):
    check_fixed_point_extremes(lambda v, s, st, loc, a, go: emu.msda_backward(go, v, s, st, loc, a, deterministic=True)[0],
                               torch.device("cpu"))


@pytest.mark.parametrize("pair", VARIANT_PAIRS, ids=pair_id)
def test_emulated_msda_levels_outside_value_give_nan(emu, pair):
    f, b = pair
    check_levels_outside_value(lambda *a: emu.msda_forward(*a, variant=f),
                               lambda *a: emu.msda_backward(*a, variant=b), torch.device("cpu"))


def test_msda_variant_counts_match_the_names():
    """msda_cuda.cuh's kForwardVariants / kBackwardVariants (what the glue and the emulation
    accept) equal the number of names in piip_kernels/variants.py."""
    import re

    header = (Path(__file__).resolve().parents[1] / "csrc" / "msda" / "msda_cuda.cuh").read_text()
    for const, op in (("kForwardVariants", "msda_forward"), ("kBackwardVariants", "msda_backward")):
        m = re.search(rf"constexpr int {const} = (\d+);", header)
        assert m, f"{const} not found in msda_cuda.cuh"
        assert int(m.group(1)) == len(VARIANTS[op]), f"{const} = {m.group(1)}, but {op} names {VARIANTS[op]}"


def coincident_inputs(D, level=(4, 4), Lq=64, M=2, spread=0.1):
    """Many queries of a head sampling the same few cells of one small map: every location
    within `spread` of the map's centre (spread 1: anywhere in it). As on PIIP's query grids,
    where neighbouring queries sample neighbouring cells, only more so."""
    value, shapes, starts, loc, attn = msda_inputs([level], N=1, Lq=Lq, M=M, D=D, P=4, outside=0.0, seed=4)
    jitter = torch.rand(loc.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 0.5
    return value, shapes, starts, (0.5 + spread * jitter).to(loc.dtype), attn


@pytest.mark.parametrize("b", range(1, len(BACKWARDS)), ids=lambda b: BACKWARDS[b])
@pytest.mark.parametrize("D", [8, 6, 1])
def test_emulated_msda_backward_variants_combine_coincident_atomics(emu, b, D):
    """Where many queries sample the same cells, the aggregating / privatizing backwards issue
    far fewer atomics into grad_value than variant 0 (one per corner, chunk and point), and
    still give the reference's gradients."""
    inputs = coincident_inputs(D)
    counts = {}
    for variant in (0, b):
        got, grad_out = run_with_grads(msda_fn(emu, False, (0, variant)), inputs)
        counts[variant] = emu.last_atomics
        assert_msda_close(got, grad_out, inputs, floor=1e-6)
    # Variant 0: one atomic per (query, head, point, inside corner, vector of channels).
    assert counts[0] > 1000
    assert counts[b] * 3 < counts[0], f"{BACKWARDS[b]}: {counts[b]} atomics against {counts[0]} for variant 0"


def test_emulated_msda_privatized_falls_back_for_large_levels(emu):
    """A level whose band of touched rows does not fit the shared budget (6 rows x 5 x 300 fp32
    > 8192) is scattered with global atomics as variant 0: the same count, the same gradients."""
    b = BACKWARDS.index("shared_privatized")
    inputs = coincident_inputs(300, level=(6, 5), Lq=16, M=1, spread=1.0)
    results = {}
    for variant in (0, b):
        results[variant] = run_with_grads(msda_fn(emu, False, (0, variant)), inputs)[0], emu.last_atomics
    assert results[0][1] == results[b][1] > 0
    for g0, gb in zip(results[0][0], results[b][0]):
        torch.testing.assert_close(gb, g0, rtol=1e-5, atol=1e-6)


class EmulatedDCA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emu, deterministic, value, value_hw, offsets, logits, query_hw):
        ctx.emu, ctx.deterministic, ctx.hw = emu, deterministic, (value_hw, query_hw)
        ctx.save_for_backward(value, offsets, logits)
        return emu.dca_forward(value, value_hw, offsets, logits, query_hw)

    @staticmethod
    def backward(ctx, grad_out):
        value, offsets, logits = ctx.saved_tensors
        gv, go, gl = ctx.emu.dca_backward(grad_out.contiguous(), value, ctx.hw[0], offsets, logits, ctx.hw[1],
                                          deterministic=ctx.deterministic)
        return None, None, gv, None, go, gl, None


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", [((5, 7), (3, 4), 4, 6, 4), ((9, 9), (4, 4), 3, 100, 3), ((1, 1), (2, 3), 2, 40, 1),
                                  ((8, 6), (5, 5), 16, 12, 4), ((4, 4), (3, 3), 2, 32, 8)],
                         ids=lambda c: f"v{c[0][0]}x{c[0][1]}-D{c[3]}-P{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_deform_cross_attn_matches_float64(emu, case, dtype, deterministic):
    # P = 4 runs the unrolled kernels, other point counts the run-time ones.
    value_hw, query_hw, M, D, P = case
    inputs = dca_inputs(N=2, value_hw=value_hw, query_hw=query_hw, M=M, D=D, P=P, dtype=dtype,
                        off_dtype=torch.float32 if dtype != torch.float32 else None)
    fn = lambda v, vhw, o, lg, qhw: EmulatedDCA.apply(emu, deterministic, v, vhw, o, lg, qhw)  # noqa: E731
    got, grad_out = dca_grads(fn, inputs, value_hw, query_hw)
    ref, _ = dca_grads(deform_cross_attn_reference, inputs, value_hw, query_hw, grad_out)
    truth, _ = dca_grads(deform_cross_attn_reference, [t.double() for t in inputs], value_hw, query_hw, grad_out)
    for name, g, r, t in zip(["out", "grad_value", "grad_offsets", "grad_logits"], got, ref, truth):
        assert_derived_close(name, g, r, t, floor=1e-6 if dtype == torch.float32 else 1e-3)


class EmulatedMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emu, variants, align_corners, out_size, weights, *feats):
        ctx.emu, ctx.variants, ctx.align = emu, variants, align_corners
        ctx.save_for_backward(weights, *feats)
        return emu.merge_forward(list(feats), weights, out_size, align_corners, torch.promote_types(feats[0].dtype, weights.dtype),
                                 variant=variants[0])

    @staticmethod
    def backward(ctx, grad_out):
        weights, *feats = ctx.saved_tensors
        grads, gw = ctx.emu.merge_backward(grad_out.contiguous(), feats, weights, ctx.align, variant=ctx.variants[1])
        return (None, None, None, None, gw, *grads)


def merge_variants():
    """(forward variant, backward variant) numbers: every pair of piip_kernels/variants.py's names."""
    from piip_kernels.variants import VARIANTS

    fwd, bwd = VARIANTS["merge_forward"], VARIANTS["merge_backward"]
    return [pytest.param((i, j), id=f"{f}-{b}") for i, f in enumerate(fwd) for j, b in enumerate(bwd)]


def emulated_merge(emu, variants):
    return lambda f, w, s, a: EmulatedMerge.apply(emu, variants, a, s, w, *f)  # noqa: E731


@pytest.mark.parametrize("variants", merge_variants())
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("case", [([(3, 3), (4, 4), (6, 6)], (6, 6)), ([(5, 7), (9, 11), (13, 17), (13, 17)], (13, 17)),
                                  ([(8, 8), (3, 5)], (5, 6)), ([(1, 1)], (4, 3)), ([(7, 7), (12, 12), (20, 20)], (20, 20))],
                         ids=lambda c: f"{len(c[0])}br-{c[1][0]}x{c[1][1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_branch_merge_matches_float64(emu, case, dtype, align_corners, variants):
    sizes, out_size = case
    feats, weights = merge_inputs(sizes, N=2, C=3, dtype=dtype)
    fn = emulated_merge(emu, variants)
    got, grad_out = merge_grads(fn, feats, weights, out_size, align_corners)
    ref, _ = merge_grads(branch_merge_reference, feats, weights, out_size, align_corners, grad_out)
    truth, _ = merge_grads(branch_merge_reference, [f.double() for f in feats], weights.double(), out_size, align_corners,
                           grad_out)
    for g, r, t in zip(got, ref, truth):
        assert g.dtype == r.dtype
        assert_derived_close("branch_merge", g, r, t, floor=1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("variants", merge_variants())
@pytest.mark.parametrize("case", merge_edge_cases(), ids=lambda c: f"{c[0]}-{c[1]}-ac{int(c[2])}")
def test_emulated_branch_merge_edge_sizes(emu, case, variants):
    sizes, out_size, align_corners = case
    feats, weights = merge_inputs(sizes, N=1, C=2)
    check_merge_against_reference(emulated_merge(emu, variants), branch_merge_reference, feats, weights, out_size,
                                  align_corners, torch.device("cpu"))


MERGE_STAGING_CASES = [  # (sizes, out_size, N, C): the staging variants' bands, tiles and vector stores
    ([(14, 14), (29, 31), (42, 61)], (42, 61), 1, 3),  # Wo = 61: odd, so bands start off 16-byte boundaries
    ([(3, 2), (5, 7)], (37, 9), 2, 11),                  # 22 planes of 37 short rows: many rows per block
    ([(25, 3), (50, 6)], (9, 1), 1, 2),                  # Wo = 1; maps taller and wider than the output
    ([(2, 700), (3, 1400)], (3, 6999), 1, 1),            # rows wider than the stage: read from global memory
    ([(1, 1), (2, 3), (3, 4), (4, 6), (5, 8), (6, 9), (7, 12), (9, 13)], (9, 13), 1, 2),  # 8 branches
    ([(40, 3)], (1, 5), 2, 2),                           # Ho = 1 from 40 rows
]


@pytest.mark.parametrize("variants", merge_variants())
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("case", MERGE_STAGING_CASES, ids=lambda c: f"{len(c[0])}br-{c[1][0]}x{c[1][1]}")
def test_emulated_branch_merge_staging_sizes(emu, case, align_corners, variants):
    sizes, out_size, N, C = case
    feats, weights = merge_inputs(sizes, N=N, C=C)
    check_merge_against_reference(emulated_merge(emu, variants), branch_merge_reference, feats, weights, out_size,
                                  align_corners, torch.device("cpu"))


@pytest.mark.parametrize("variants", merge_variants())
@pytest.mark.parametrize("out_16bit", [False, True], ids=["out_fp32", "out_16bit"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_branch_merge_half_precision(emu, dtype, out_16bit, variants):
    # 16-bit maps with fp32 weights give an fp32 output (promote_types); with 16-bit weights, a 16-bit one.
    feats, weights = merge_inputs([(9, 7), (17, 13), (35, 27)], N=2, C=3, dtype=dtype)
    weights = weights.to(dtype) if out_16bit else weights
    check_merge_against_reference(emulated_merge(emu, variants), branch_merge_reference, feats, weights, (35, 27), False,
                                  torch.device("cpu"), floor=1e-3)


def test_emulated_merge_variants_are_deterministic(emu):
    feats, weights = merge_inputs([(7, 7), (12, 12), (20, 20)], N=2, C=4, dtype=torch.bfloat16)
    for variants in [(1, 1), (0, 1)]:
        runs = [merge_grads(emulated_merge(emu, variants), feats, weights, (20, 20), True)[0] for _ in range(2)]
        for a, b in zip(*runs):
            assert torch.equal(a, b)


def test_merge_variant_counts_match_the_names():
    """merge_cuda.cuh's k*Variants are the lengths of piip_kernels/variants.py's lists."""
    import re

    from piip_kernels.variants import VARIANTS

    text = (Path(__file__).resolve().parents[1] / "csrc" / "merge" / "merge_cuda.cuh").read_text()
    counts = {name: int(n) for name, n in re.findall(r"constexpr int (k\w+Variants) = (\d+);", text)}
    assert counts == {"kForwardVariants": len(VARIANTS["merge_forward"]), "kBackwardVariants": len(VARIANTS["merge_backward"])}


def test_emulated_merge_unknown_variant_is_refused(emu):
    from piip_kernels.variants import VARIANTS

    feats, weights = merge_inputs([(3, 3), (5, 5)], N=1, C=2)
    grad_out = torch.randn(1, 2, 5, 5)
    for bad in (len(VARIANTS["merge_forward"]), -1):
        with pytest.raises(AssertionError, match="returned -2"):
            emu.merge_forward(feats, weights, (5, 5), False, torch.float32, variant=bad)
    for bad in (len(VARIANTS["merge_backward"]), -1):
        with pytest.raises(AssertionError, match="returned -2"):
            emu.merge_backward(grad_out, feats, weights, False, variant=bad)


# Deterministic grad_value is NaN everywhere once a non-finite number reaches it (a fixed-point
# sum cannot hold one), a superset of where the reference has NaN.
@pytest.mark.parametrize("pair,deterministic", [(p, False) for p in VARIANT_PAIRS] + [((0, 0), True)],
                         ids=lambda x: pair_id(x) if isinstance(x, tuple) else ("det" if x else "atomic"))
@pytest.mark.parametrize("case", list(msda_nonfinite_cases()))
def test_emulated_msda_non_finite_numbers_as_in_the_reference(emu, case, pair, deterministic):
    fn = msda_fn(emu, deterministic, pair)
    check_msda_nonfinite(fn, msda_nonfinite_cases()[case], torch.device("cpu"),
                         superset=("grad_value",) if deterministic else ())


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", list(dca_nonfinite_cases()))
def test_emulated_dca_non_finite_numbers_as_in_the_reference(emu, case, deterministic):
    fn = lambda v, vhw, o, lg, qhw: EmulatedDCA.apply(emu, deterministic, v, vhw, o, lg, qhw)  # noqa: E731
    check_dca_nonfinite(fn, dca_nonfinite_cases()[case], torch.device("cpu"),
                        superset=("grad_value",) if deterministic else ())


@pytest.mark.parametrize("variants", merge_variants())
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("case", list(merge_nonfinite_cases()))
def test_emulated_merge_non_finite_numbers_as_in_the_reference(emu, case, align_corners, variants):
    check_merge_nonfinite(emulated_merge(emu, variants), merge_nonfinite_cases()[case], align_corners, torch.device("cpu"))


def test_launch_refuses_grids_past_cudas_limit(emu):
    """Every CUDA launch is one-dimensional (grid axes y and z stay 1); piip::launch refuses more
    than 2**31 - 1 blocks on x (cudaErrorInvalidConfiguration) rather than let the count wrap."""
    counted = ctypes.c_ulonglong(0)
    assert emu.lib.piip_emu_launch_blocks(ctypes.c_int64(3), ctypes.byref(counted)) == 0 and counted.value == 3
    counted.value = 0
    for blocks in (2 ** 32 + 3, 2 ** 31):  # 2**32 + 3 blocks used to become 3
        assert emu.lib.piip_emu_launch_blocks(ctypes.c_int64(blocks), ctypes.byref(counted)) == 9  # invalid configuration
        assert counted.value == 0


def test_emulated_unknown_variant_is_refused(emu):
    """A variant number past the op's list is an error (-2), as the glue's check_variant."""
    from piip_kernels.variants import VARIANTS

    inputs = msda_inputs([(5, 7)], N=1, Lq=3, M=2, D=8, P=2)
    value, shapes, starts, loc, attn = inputs
    with pytest.raises(AssertionError, match="returned -2"):
        emu.msda_forward(value, shapes, starts, loc, attn, variant=len(VARIANTS["msda_forward"]))
    with pytest.raises(AssertionError, match="returned -2"):
        emu.msda_forward(value, shapes, starts, loc, attn, variant=-1)
    grad_out = torch.ones(1, 3, 2 * 8)
    with pytest.raises(AssertionError, match="returned -2"):
        emu.msda_backward(grad_out, value, shapes, starts, loc, attn, variant=len(VARIANTS["msda_backward"]))
    with pytest.raises(AssertionError, match="returned -2"):  # past fixed_point and two_pass
        emu.msda_backward(grad_out, value, shapes, starts, loc, attn, deterministic=True,
                          variant=len(VARIANTS["msda_backward_deterministic"]))
