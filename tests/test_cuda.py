"""The CUDA backends (ms_deform_attn, deform_cross_attn, branch_merge) against the float64
reference (needs a GPU; bench/gpu_check.sh runs these on a lent GPU). With
PIIP_GPU_TEST_DEVICE=meta the same tests run on the meta device (the CPU dry run of
gpu_check.sh): devices, shapes and dtypes checked, values not (tests/helpers.py)."""
import pytest
import torch

import piip_kernels
from piip_kernels import ms_deform_attn

from helpers import (assert_close, assert_derived_close, check_bit_identical, check_dca_nonfinite,
                     check_fixed_point_extremes, check_gpu_tangents, check_levels_outside_value,
                     check_merge_against_reference, check_merge_nonfinite, check_msda_nonfinite, dca_grads, dca_inputs,
                     dca_nonfinite_cases, deterministic_grad_value, gpu_test_device, gpu_tests_can_run, holds, host,
                     merge_grads, merge_inputs, merge_nonfinite_cases, msda_inputs, msda_nonfinite_cases, reference64,
                     run_with_grads, same)
from piip_kernels.dca.reference import deform_cross_attn_reference
from piip_kernels.merge.reference import branch_merge_reference

DEV = gpu_test_device()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_tests_can_run(DEV), reason="needs a CUDA GPU (bench/gpu_check.sh)")]


def cuda_fn(deterministic=False):
    return lambda *a: ms_deform_attn(*a, backend="cuda", deterministic=deterministic)


def reference_fn(*a):
    # The public op on the reference backend: the plain-PyTorch reference on a GPU, its fake on meta.
    return ms_deform_attn(*a, backend="reference")


def check(inputs, floor, deterministic=False):
    """inputs: on the CPU (the float64 truth is computed from them), moved to DEV here."""
    dev_inputs = [t.to(DEV) for t in inputs]
    got, grad_out = run_with_grads(cuda_fn(deterministic), dev_inputs)
    ref, _ = run_with_grads(reference_fn, dev_inputs, grad_out)
    truth = reference64(inputs, grad_out)
    for name, g, r, t in zip(["out", "grad_value", "grad_loc", "grad_attn"], got, ref, truth):
        assert g.dtype == r.dtype and g.device == DEV
        assert_derived_close(name, host(g), host(r), t, floor=floor)
    return got


def test_cuda_backend_is_available():
    # Raises with the reasons when the CUDA kernels cannot run (say the build skipped them).
    for api in (piip_kernels.msda.api, piip_kernels.dca.api, piip_kernels.merge.api):
        assert piip_kernels.backends.select(api.OP, api.BACKENDS, DEV, torch.float32, "cuda") == "cuda"


@pytest.mark.parametrize("D", [1, 6, 12, 24, 32, 40, 64, 100, 128, 256, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_head_dims_and_dtypes(D, dtype):
    loc = torch.float32 if dtype != torch.float32 else None
    check(msda_inputs([(7, 11), (3, 5)], N=2, Lq=37, M=3, D=D, P=4, dtype=dtype, loc_dtype=loc, outside=0.3),
          floor=1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_dtype_locations(dtype):
    check(msda_inputs([(9, 9)], N=1, Lq=20, M=2, D=24, P=4, dtype=dtype), floor=1e-3)


@pytest.mark.parametrize("shapes", [[(1, 1)], [(1, 1), (2, 3), (13, 17)], [(100, 152), (50, 76), (25, 38), (13, 19)]])
def test_awkward_and_detr_levels(shapes):
    check(msda_inputs(shapes, N=2, Lq=123, M=8, D=32, P=4, outside=0.3), floor=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_mode_is_bit_identical(dtype):
    inputs = msda_inputs([(70, 70)], N=2, Lq=1764, M=16, D=32, P=4, dtype=dtype,
                         loc_dtype=torch.float32 if dtype != torch.float32 else None)
    check_bit_identical("cuda", [t.to(DEV) for t in inputs], runs=3)
    check(inputs, floor=1e-6 if dtype == torch.float32 else 1e-3, deterministic=True)


def test_cuda_fixed_point_extremes():
    check_fixed_point_extremes(deterministic_grad_value("cuda"), DEV)


def test_cuda_levels_outside_value_give_nan():
    # Through the public API: with CUDA index tensors nothing is checked on the host.
    fwd = lambda *a: ms_deform_attn(*a, backend="cuda")  # noqa: E731
    bwd = lambda go, *a: torch.ops.piip.ms_deform_attn_backward(go, *a, "cuda")  # noqa: E731  (piip_C's kernel)
    check_levels_outside_value(fwd, bwd, DEV)


def test_nan_poisoned_memory_and_non_contiguous_inputs():
    value, shapes, starts, loc, attn = msda_inputs([(13, 17), (5, 3)], N=2, Lq=40, M=4, D=24, P=4)
    # The view is made on the device: moving a non-contiguous CPU view with .to() would
    # compact it and test nothing.
    poisoned = torch.full((2, value.shape[1], 4, 40), float("nan"), device=DEV)
    poisoned[..., :24] = value.to(DEV)
    nc = poisoned[..., :24]  # NaN right beside every row: any over-read shows
    assert not nc.is_contiguous() and nc.device == DEV
    outs = [run_with_grads(cuda_fn(), [nc, shapes.to(DEV), starts.to(DEV), loc.to(DEV), attn.to(DEV)])[0] for _ in range(2)]
    for t in outs[0]:
        assert holds(torch.isfinite(t))
    assert same(outs[0][0], outs[1][0])
    want = ms_deform_attn(value.to(DEV), shapes.to(DEV), starts.to(DEV), loc.to(DEV), attn.to(DEV), backend="reference")
    assert_close(outs[0][0], want, rtol=1e-5, atol=1e-5)


def test_large_batch_no_im2col_limit():
    check(msda_inputs([(8, 8)], N=96, Lq=144, M=16, D=12, P=4), floor=1e-6)


def test_triton_matches_cuda():
    inputs = [t.to(DEV) for t in msda_inputs([(42, 42)], N=2, Lq=500, M=16, D=24, P=4, dtype=torch.bfloat16, loc_dtype=torch.float32)]
    a = run_with_grads(cuda_fn(), inputs)[0]
    b, _ = run_with_grads(lambda *x: ms_deform_attn(*x, backend="triton"), inputs)
    for x, y in zip(a, b):
        assert_close(x.float(), y.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [((98, 98), (70, 70), 16, 12, 4), ((70, 70), (42, 42), 16, 32, 4), ((5, 7), (3, 4), 4, 6, 4),
                                  ((9, 9), (4, 4), 3, 100, 3), ((1, 1), (2, 3), 2, 40, 1)],
                         ids=lambda c: f"v{c[0][0]}-q{c[1][0]}-D{c[3]}-P{c[4]}")
def test_cuda_deform_cross_attn(case, dtype, deterministic):
    value_hw, query_hw, M, D, P = case
    cpu_inputs = dca_inputs(N=2, value_hw=value_hw, query_hw=query_hw, M=M, D=D, P=P, dtype=dtype,
                            off_dtype=torch.float32 if dtype != torch.float32 else None)
    inputs = [t.to(DEV) for t in cpu_inputs]
    fn = lambda *a: piip_kernels.deform_cross_attn(*a, backend="cuda", deterministic=deterministic)  # noqa: E731
    got, grad_out = dca_grads(fn, inputs, value_hw, query_hw)
    ref, _ = dca_grads(lambda *a: piip_kernels.deform_cross_attn(*a, backend="reference"), inputs, value_hw, query_hw, grad_out)
    truth, _ = dca_grads(deform_cross_attn_reference, [t.double() for t in cpu_inputs], value_hw, query_hw, grad_out)
    for name, g, r, t in zip(["out", "grad_value", "grad_offsets", "grad_logits"], got, ref, truth):
        assert g.device == DEV
        assert_derived_close(name, host(g), host(r), t, floor=1e-6 if dtype == torch.float32 else 1e-3)
    if deterministic:
        again, _ = dca_grads(fn, inputs, value_hw, query_hw, grad_out)
        for a, b in zip(got, again):
            assert same(a, b)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [([(42, 42), (70, 70), (98, 98)], (98, 98)), ([(28, 28), (56, 56), (112, 112)], (112, 112)),
                                  ([(8, 8), (3, 5)], (5, 6)), ([(5, 7), (9, 11), (13, 17), (13, 17), (2, 2)], (13, 17))],
                         ids=lambda c: f"{len(c[0])}br-{c[1][0]}x{c[1][1]}")
def test_cuda_branch_merge(case, dtype, align_corners):
    sizes, out_size = case
    cpu_feats, cpu_weights = merge_inputs(sizes, N=2, C=8, dtype=dtype)
    feats, weights = [f.to(DEV) for f in cpu_feats], cpu_weights.to(DEV)
    fn = lambda f, w, s, a: piip_kernels.branch_merge(f, w, s, align_corners=a, backend="cuda")  # noqa: E731
    got, grad_out = merge_grads(fn, feats, weights, out_size, align_corners)
    ref, _ = merge_grads(lambda f, w, s, a: piip_kernels.branch_merge(f, w, s, align_corners=a, backend="reference"), feats,
                         weights, out_size, align_corners, grad_out)
    truth, _ = merge_grads(branch_merge_reference, [f.double() for f in cpu_feats], cpu_weights.double(), out_size,
                           align_corners, grad_out)
    for g, r, t in zip(got, ref, truth):
        assert g.dtype == r.dtype and g.device == DEV
        assert_derived_close("branch_merge", host(g), host(r), t, floor=1e-6 if dtype == torch.float32 else 1e-3)
    again, _ = merge_grads(fn, feats, weights, out_size, align_corners, grad_out)
    for a, b in zip(got, again):
        assert same(a, b)


def test_cuda_branch_merge_float64_weights_promote():
    feats, weights = merge_inputs([(3, 3), (5, 4), (6, 6)])
    fn = lambda f, w, s, a: piip_kernels.branch_merge(f, w, s, align_corners=a, backend="cuda")  # noqa: E731
    ref = lambda f, w, s, a: piip_kernels.branch_merge(f, w, s, align_corners=a, backend="reference")  # noqa: E731
    # The GPU kernels merge in fp32 and give the float64 map promote_types asks for.
    check_merge_against_reference(fn, ref, feats, weights.double(), (6, 6), False, DEV)


# Deterministic grad_value is NaN everywhere once a non-finite number reaches it (a fixed-point
# sum cannot hold one), a superset of where the reference has NaN.
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", list(msda_nonfinite_cases()))
def test_cuda_msda_non_finite_numbers_as_in_the_reference(case, deterministic):
    check_msda_nonfinite(cuda_fn(deterministic), msda_nonfinite_cases()[case], DEV,
                         superset=("grad_value",) if deterministic else ())


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", list(dca_nonfinite_cases()))
def test_cuda_dca_non_finite_numbers_as_in_the_reference(case, deterministic):
    fn = lambda *a: piip_kernels.deform_cross_attn(*a, backend="cuda", deterministic=deterministic)  # noqa: E731
    check_dca_nonfinite(fn, dca_nonfinite_cases()[case], DEV, superset=("grad_value",) if deterministic else ())


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("case", list(merge_nonfinite_cases()))
def test_cuda_merge_non_finite_numbers_as_in_the_reference(case, align_corners):
    fn = lambda f, w, s, a: piip_kernels.branch_merge(f, w, s, align_corners=a, backend="cuda")  # noqa: E731
    check_merge_nonfinite(fn, merge_nonfinite_cases()[case], align_corners, DEV)


@pytest.mark.skipif(DEV.type == "meta", reason="tangents along locations need the level sizes' values")
def test_cuda_forward_mode_ad():
    """Tangents of the three ops on the cuda backend against the reference backend's in float64."""
    value, shapes, starts, loc, attn = msda_inputs([(3, 4), (2, 5)], N=2, Lq=5, M=2, D=8, P=2, dtype=torch.float64)
    check_gpu_tangents(lambda v, lc, a: ms_deform_attn(v, shapes.to(DEV), starts.to(DEV), lc, a, backend="cuda"),
                       lambda v, lc, a: ms_deform_attn(v, shapes, starts, lc, a, backend="reference"), [value, loc, attn], DEV)
    check_gpu_tangents(lambda *a: piip_kernels.deform_cross_attn(a[0], (5, 7), a[1], a[2], (3, 4), backend="cuda"),
                       lambda *a: piip_kernels.deform_cross_attn(a[0], (5, 7), a[1], a[2], (3, 4), backend="reference"),
                       list(dca_inputs(dtype=torch.float64)), DEV)
    feats, weights = merge_inputs([(3, 3), (4, 5), (6, 6)], dtype=torch.float64)
    check_gpu_tangents(lambda *a: piip_kernels.branch_merge(list(a[:3]), a[3], (6, 6), backend="cuda"),
                       lambda *a: piip_kernels.branch_merge(list(a[:3]), a[3], (6, 6), backend="reference"),
                       [*feats, weights.double()], DEV)
