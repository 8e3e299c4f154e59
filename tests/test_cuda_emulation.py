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
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from piip_kernels.dca.reference import deform_cross_attn_reference
from piip_kernels.merge.reference import branch_merge_reference
from piip_kernels.msda.reference import ms_deform_attn_reference
from piip_kernels.msda.triton import fixed_point_scale, softmax_bound

from helpers import (assert_derived_close, check_dca_nonfinite, check_fixed_point_extremes, check_levels_outside_value,
                     check_merge_against_reference, check_merge_nonfinite, check_msda_nonfinite, dca_grads, dca_inputs,
                     dca_nonfinite_cases, merge_edge_cases, merge_grads, merge_inputs, merge_nonfinite_cases, msda_inputs,
                     msda_nonfinite_cases, reference64, run_with_grads)

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None and os.environ.get("PIIP_REQUIRE_NVCC") != "1",
                                reason="needs the CUDA headers (nvcc on PATH)")
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def cuda_include_dirs() -> list[str]:
    """The include folders nvcc itself uses (from its dry run)."""
    probe = subprocess.run([NVCC or "nvcc", "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
    dirs = re.findall(r'INCLUDES="-I([^"]+?)"', probe.stderr) + re.findall(r'SYSTEM_INCLUDES="-isystem" "([^"]+)"', probe.stderr)
    assert dirs, f"no include folder in nvcc's dry run:\n{probe.stderr[-2000:]}"
    return [d.strip() for d in dirs]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    import torch.utils.cpp_extension as ext

    lib = tmp_path_factory.mktemp("emu") / "kernels.so"
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas",
           # torch's extension build disables the implicit 16-bit conversions; so does this one
           *[f for f in ext.COMMON_NVCC_FLAGS if f.startswith("-D")],
           "-I", str(ROOT / "csrc"), *[f"-I{d}" for d in cuda_include_dirs()],
           str(ROOT / "tests" / "cuda_emulation" / "kernels.cpp"), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "warning" not in res.stderr, res.stderr[-4000:]
    return Emulated(ctypes.CDLL(str(lib)))


def p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def i64(*values):
    return [ctypes.c_int64(v) for v in values]


class Emulated:
    """The emulated kernels with the glue's buffers: the shapes of the public ops."""

    def __init__(self, lib):
        self.lib = lib

    def _run(self, name, *args):
        rc = getattr(self.lib, name)(*args)
        errors = self.lib.piip_emu_errors()
        assert rc == 0, f"{name} returned {rc}"
        assert errors == 0, f"{name}: {errors} undefined warp shuffles (lane or source outside the mask, or exited)"

    def msda_forward(self, value, shapes, starts, loc, attn):
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        out = torch.full((N, Lq, M * D), float("nan"), dtype=value.dtype)
        self._run("piip_emu_msda_forward", CODE[value.dtype], CODE[loc.dtype], p(value), p(shapes), p(starts), p(loc), p(attn),
                  p(out), *i64(N, S, M, D, Lq, L, P))
        return out

    def msda_backward(self, grad_out, value, shapes, starts, loc, attn, deterministic=False):
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        acc, scale = self._accumulator(value, grad_out, attn, Lq * P, deterministic)
        gv, gl, ga = (torch.full_like(t, float("nan")) for t in (value, loc, attn))
        self._run("piip_emu_msda_backward", CODE[value.dtype], CODE[loc.dtype], p(grad_out), p(value), p(shapes), p(starts), p(loc),
                  p(attn), p(None if deterministic else acc), p(acc if deterministic else None), p(scale), p(gv), p(gl), p(ga),
                  *i64(N, S, M, D, Lq, L, P))
        return gv, gl, ga

    @staticmethod
    def _accumulator(value, grad_out, weights, points, deterministic):
        # As csrc/common/cuda_glue.h's GradValueAccumulator.
        if deterministic:
            return torch.zeros(value.shape, dtype=torch.int64), fixed_point_scale(grad_out, points, weights).reshape(1)
        return torch.zeros(value.shape, dtype=torch.float32), None

    def dca_forward(self, value, value_hw, offsets, logits, query_hw):
        N, _, M, D = value.shape
        P = offsets.shape[3]
        out = torch.full((N, offsets.shape[1], M * D), float("nan"), dtype=value.dtype)
        self._run("piip_emu_dca_forward", CODE[value.dtype], CODE[offsets.dtype], p(value), p(offsets), p(logits), p(out),
                  *i64(N, *value_hw, *query_hw, M, D, P))
        return out

    def dca_backward(self, grad_out, value, value_hw, offsets, logits, query_hw, deterministic=False):
        N, _, M, D = value.shape
        P = offsets.shape[3]
        acc, scale = self._accumulator(value, grad_out, softmax_bound(logits), query_hw[0] * query_hw[1] * P, deterministic)
        gv, go, gl = (torch.full_like(t, float("nan")) for t in (value, offsets, logits))
        self._run("piip_emu_dca_backward", CODE[value.dtype], CODE[offsets.dtype], p(grad_out), p(value), p(offsets), p(logits),
                  p(None if deterministic else acc), p(acc if deterministic else None), p(scale), p(gv), p(go), p(gl),
                  *i64(N, *value_hw, *query_hw, M, D, P))
        return gv, go, gl

    def merge_forward(self, feats, weights, out_size, align_corners, out_dtype):
        N, C = feats[0].shape[:2]
        maps = (ctypes.c_void_p * len(feats))(*[f.data_ptr() for f in feats])
        H = (ctypes.c_int64 * len(feats))(*[f.shape[2] for f in feats])
        W = (ctypes.c_int64 * len(feats))(*[f.shape[3] for f in feats])
        w = weights.float().contiguous()
        out = torch.full((N, C, *out_size), float("nan"), dtype=out_dtype)
        self._run("piip_emu_merge_forward", CODE[feats[0].dtype], CODE[out_dtype], len(feats), maps, H, W, p(w), p(out),
                  *i64(N * C, *out_size), int(align_corners))
        return out

    def merge_backward(self, grad_out, feats, weights, align_corners):
        N, C, Ho, Wo = grad_out.shape
        w = weights.float().contiguous()
        grads, shares = [], []
        for b, f in enumerate(feats):
            H, W = f.shape[2:]
            partial = torch.full((self.lib.piip_emu_merge_backward_blocks(*i64(N * C, H, W)),), float("nan"))
            gf = torch.full_like(f, float("nan"))
            self._run("piip_emu_merge_backward", CODE[f.dtype], CODE[grad_out.dtype], p(grad_out), p(f), p(gf), p(partial),
                      ctypes.c_void_p(w.data_ptr() + 4 * b), *i64(N * C, H, W, Ho, Wo), int(align_corners))
            grads.append(gf)
            shares.append(partial.double().sum())  # as the glue: block shares summed in double
        return grads, torch.stack(shares).to(weights.dtype)


class EmulatedOp(torch.autograd.Function):
    """ms_deform_attn on the emulated kernels, so the helpers' gradient runs apply."""

    @staticmethod
    def forward(ctx, emu, deterministic, value, shapes, starts, loc, attn):
        ctx.emu, ctx.deterministic = emu, deterministic
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        return emu.msda_forward(value, shapes, starts, loc, attn)

    @staticmethod
    def backward(ctx, grad_out):
        gv, gl, ga = ctx.emu.msda_backward(grad_out.contiguous(), *ctx.saved_tensors, deterministic=ctx.deterministic)
        return None, None, gv, None, None, gl, ga


MSDA_CASES = [  # (level grids, N, Lq, M, D, P): D picks the vector width and the lanes per row
    ([(5, 7), (3, 4)], 2, 9, 3, 6, 3),           # V = 2, 3 chunks: a 4-lane group with an idle lane
    ([(7, 11), (3, 5)], 2, 13, 2, 32, 4),        # V = 4, 8 lanes
    ([(1, 1), (2, 3), (13, 17)], 1, 7, 2, 100, 2),  # 25 chunks: a full warp
    ([(6, 5)], 1, 5, 1, 300, 2),                 # 75 chunks: several per lane
    ([(4, 4)], 3, 11, 5, 1, 4),                  # V = 1, one lane per row
    ([(9, 9), (4, 4), (2, 2), (1, 1)], 2, 30, 8, 24, 4),  # 4 levels, many rows per block
]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", MSDA_CASES, ids=lambda c: f"L{len(c[0])}-D{c[4]}")
def test_emulated_msda_matches_float64(emu, case, deterministic):
    shapes, N, Lq, M, D, P = case
    inputs = msda_inputs(shapes, N=N, Lq=Lq, M=M, D=D, P=P, outside=0.3)
    fn = lambda *a: EmulatedOp.apply(emu, deterministic, *a)  # noqa: E731
    got, grad_out = run_with_grads(fn, inputs)
    ref, _ = run_with_grads(ms_deform_attn_reference, inputs, grad_out)
    truth = reference64(inputs, grad_out)
    for name, g, r, t in zip(["out", "grad_value", "grad_loc", "grad_attn"], got, ref, truth):
        assert_derived_close(name, g, r, t, floor=1e-6)


@pytest.mark.parametrize("dtype,loc_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("D", [8, 12, 24, 40])
def test_emulated_msda_half_precision(emu, dtype, loc_dtype, D):
    inputs = msda_inputs([(7, 11), (3, 5)], N=2, Lq=11, M=2, D=D, P=4, dtype=dtype, loc_dtype=loc_dtype)
    got, grad_out = run_with_grads(lambda *a: EmulatedOp.apply(emu, False, *a), inputs)
    ref, _ = run_with_grads(ms_deform_attn_reference, inputs, grad_out)
    truth = reference64(inputs, grad_out)
    assert got[0].dtype == dtype and got[2].dtype == loc_dtype
    for name, g, r, t in zip(["out", "grad_value", "grad_loc", "grad_attn"], got, ref, truth):
        assert_derived_close(name, g, r, t, floor=1e-3)


def test_emulated_msda_deterministic_is_bit_identical(emu):
    inputs = msda_inputs([(6, 6)], N=2, Lq=40, M=4, D=8, P=4)
    runs = [run_with_grads(lambda *a: EmulatedOp.apply(emu, True, *a), inputs, seed=3)[0] for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_emulated_msda_fixed_point_extremes(emu):
    check_fixed_point_extremes(lambda v, s, st, loc, a, go: emu.msda_backward(go, v, s, st, loc, a, deterministic=True)[0],
                               torch.device("cpu"))


def test_emulated_msda_levels_outside_value_give_nan(emu):
    check_levels_outside_value(emu.msda_forward, emu.msda_backward, torch.device("cpu"))


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
    def forward(ctx, emu, align_corners, out_size, weights, *feats):
        ctx.emu, ctx.align = emu, align_corners
        ctx.save_for_backward(weights, *feats)
        return emu.merge_forward(list(feats), weights, out_size, align_corners, torch.promote_types(feats[0].dtype, weights.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        weights, *feats = ctx.saved_tensors
        grads, gw = ctx.emu.merge_backward(grad_out.contiguous(), feats, weights, ctx.align)
        return (None, None, None, gw, *grads)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("case", [([(3, 3), (4, 4), (6, 6)], (6, 6)), ([(5, 7), (9, 11), (13, 17), (13, 17)], (13, 17)),
                                  ([(8, 8), (3, 5)], (5, 6)), ([(1, 1)], (4, 3)), ([(7, 7), (12, 12), (20, 20)], (20, 20))],
                         ids=lambda c: f"{len(c[0])}br-{c[1][0]}x{c[1][1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_branch_merge_matches_float64(emu, case, dtype, align_corners):
    sizes, out_size = case
    feats, weights = merge_inputs(sizes, N=2, C=3, dtype=dtype)
    fn = lambda f, w, s, a: EmulatedMerge.apply(emu, a, s, w, *f)  # noqa: E731
    got, grad_out = merge_grads(fn, feats, weights, out_size, align_corners)
    ref, _ = merge_grads(branch_merge_reference, feats, weights, out_size, align_corners, grad_out)
    truth, _ = merge_grads(branch_merge_reference, [f.double() for f in feats], weights.double(), out_size, align_corners,
                           grad_out)
    for g, r, t in zip(got, ref, truth):
        assert g.dtype == r.dtype
        assert_derived_close("branch_merge", g, r, t, floor=1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("case", merge_edge_cases(), ids=lambda c: f"{c[0]}-{c[1]}-ac{int(c[2])}")
def test_emulated_branch_merge_edge_sizes(emu, case):
    sizes, out_size, align_corners = case
    feats, weights = merge_inputs(sizes, N=1, C=2)
    fn = lambda f, w, s, a: EmulatedMerge.apply(emu, a, s, w, *f)  # noqa: E731
    check_merge_against_reference(fn, branch_merge_reference, feats, weights, out_size, align_corners, torch.device("cpu"))


# Deterministic grad_value is NaN everywhere once a non-finite number reaches it (a fixed-point
# sum cannot hold one), a superset of where the reference has NaN.
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", list(msda_nonfinite_cases()))
def test_emulated_msda_non_finite_numbers_as_in_the_reference(emu, case, deterministic):
    fn = lambda *a: EmulatedOp.apply(emu, deterministic, *a)  # noqa: E731
    check_msda_nonfinite(fn, msda_nonfinite_cases()[case], torch.device("cpu"),
                         superset=("grad_value",) if deterministic else ())


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", list(dca_nonfinite_cases()))
def test_emulated_dca_non_finite_numbers_as_in_the_reference(emu, case, deterministic):
    fn = lambda v, vhw, o, lg, qhw: EmulatedDCA.apply(emu, deterministic, v, vhw, o, lg, qhw)  # noqa: E731
    check_dca_nonfinite(fn, dca_nonfinite_cases()[case], torch.device("cpu"),
                        superset=("grad_value",) if deterministic else ())


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("case", list(merge_nonfinite_cases()))
def test_emulated_merge_non_finite_numbers_as_in_the_reference(emu, case, align_corners):
    fn = lambda f, w, s, a: EmulatedMerge.apply(emu, a, s, w, *f)  # noqa: E731
    check_merge_nonfinite(fn, merge_nonfinite_cases()[case], align_corners, torch.device("cpu"))


def test_launch_refuses_grids_past_cudas_limit(emu):
    """Every CUDA launch is one-dimensional (grid axes y and z stay 1); piip::launch refuses more
    than 2**31 - 1 blocks on x (cudaErrorInvalidConfiguration) rather than let the count wrap."""
    counted = ctypes.c_ulonglong(0)
    assert emu.lib.piip_emu_launch_blocks(ctypes.c_int64(3), ctypes.byref(counted)) == 0 and counted.value == 3
    counted.value = 0
    for blocks in (2 ** 32 + 3, 2 ** 31):  # 2**32 + 3 blocks used to become 3
        assert emu.lib.piip_emu_launch_blocks(ctypes.c_int64(blocks), ctypes.byref(counted)) == 9  # invalid configuration
        assert counted.value == 0
