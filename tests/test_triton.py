"""The Triton backends (ms_deform_attn, deform_cross_attn, branch_merge) against the float64 reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), on small shapes; with one they run on CUDA tensors.
With PIIP_GPU_TEST_DEVICE=meta (the CPU dry run of bench/gpu_check.sh) the harness runs on
the meta device: devices, shapes and dtypes are checked as on a GPU, values are not.
A separate check compiles every kernel to sm_90 code without a GPU.
"""
import os
import subprocess
import sys

import pytest
import torch

import piip_kernels
from piip_kernels import ms_deform_attn
from piip_kernels.dca.reference import deform_cross_attn_reference

from helpers import (assert_derived_close, check_bit_identical, check_dca_nonfinite, check_fixed_point_extremes,
                     check_gpu_tangents, check_levels_outside_value, check_merge_against_reference,
                     check_merge_nonfinite, check_msda_nonfinite, dca_grads, dca_inputs, dca_nonfinite_cases,
                     deterministic_grad_value, host, merge_edge_cases, merge_grads, merge_inputs, merge_nonfinite_cases,
                     msda_inputs, msda_nonfinite_cases, reference64, run_with_grads, same)

pytestmark = pytest.mark.triton
DEVICE = torch.device(os.environ.get("PIIP_GPU_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
try:  # raises with the reasons when Triton cannot run here (on meta, the fake kernels run)
    for _api in (piip_kernels.msda.api, piip_kernels.dca.api, piip_kernels.merge.api):
        piip_kernels.backends.select(_api.OP, _api.BACKENDS, DEVICE, torch.float32, "triton")
except RuntimeError as err:
    pytest.fail(f"the Triton backend cannot run here: {err}", pytrace=False)

CASES = [([(5, 7)], 9, 2, 1, 3), ([(7, 11), (3, 5)], 13, 3, 6, 2), ([(1, 1), (2, 3), (13, 17)], 5, 2, 12, 4),
         ([(9, 5)], 4, 1, 100, 2), ([(6, 7), (3, 5), (1, 1), (2, 2)], 6, 2, 32, 3)]


def on_device(inputs):
    return [t.to(DEVICE) for t in inputs]


def reference_fn(*a):
    # The public op on the reference backend: the plain-PyTorch reference, its fake on meta.
    return ms_deform_attn(*a, backend="reference")


def dca_reference_fn(*a):
    return piip_kernels.deform_cross_attn(*a, backend="reference")


def merge_reference_fn(f, w, s, a):
    return piip_kernels.branch_merge(f, w, s, align_corners=a, backend="reference")


def triton_fn(deterministic=False):
    return lambda *a: ms_deform_attn(*a, backend="triton", deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{len(c[0])}-D{c[3]}")
def test_triton_matches_float64_reference(case, deterministic):
    shapes, Lq, M, D, P = case
    cpu_inputs = msda_inputs(shapes, Lq=Lq, M=M, D=D, P=P, outside=0.4)
    inputs = on_device(cpu_inputs)
    got, grad_out = run_with_grads(triton_fn(deterministic), inputs)
    ref, _ = run_with_grads(reference_fn, inputs, grad_out)
    truth = reference64(cpu_inputs, grad_out)
    for name, g, r, t in zip(["out", "grad_value", "grad_loc", "grad_attn"], got, ref, truth):
        assert g.dtype == r.dtype and g.device == DEVICE
        assert_derived_close(name, host(g), host(r), t, floor=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision(dtype):
    cpu_inputs = msda_inputs([(7, 11), (3, 5)], Lq=11, M=2, D=24, P=4, dtype=dtype, loc_dtype=torch.float32)
    inputs = on_device(cpu_inputs)
    got, grad_out = run_with_grads(triton_fn(), inputs)
    ref, _ = run_with_grads(reference_fn, inputs, grad_out)
    truth = reference64(cpu_inputs, grad_out)
    assert got[0].dtype == dtype
    for name, g, r, t in zip(["out", "grad_value", "grad_loc", "grad_attn"], got, ref, truth):
        assert_derived_close(name, host(g), host(r), t, floor=1e-3)


def test_triton_deterministic_mode_is_bit_identical():
    check_bit_identical("triton", on_device(msda_inputs([(9, 13)], N=2, Lq=70, M=2, D=8, P=4)))


def test_triton_fixed_point_extremes():
    check_fixed_point_extremes(deterministic_grad_value("triton"), DEVICE)


def test_triton_levels_outside_value_give_nan():
    # The private ops on the Triton backend: the kernels below the public API's host-side checks.
    fwd = lambda *a: torch.ops.piip.ms_deform_attn(*a, "triton")  # noqa: E731
    bwd = lambda go, *a: torch.ops.piip.ms_deform_attn_backward(go, *a, "triton")  # noqa: E731
    check_levels_outside_value(fwd, bwd, DEVICE)


def test_triton_empty_sizes():
    empty = on_device(msda_inputs([(3, 4)], N=2, Lq=0, M=2, D=4, P=2))
    assert ms_deform_attn(*empty, backend="triton").shape == (2, 0, 8)


# Deterministic grad_value is NaN everywhere once a non-finite number reaches it (a fixed-point
# sum cannot hold one), a superset of where the reference has NaN.
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", list(msda_nonfinite_cases()))
def test_triton_msda_non_finite_numbers_as_in_the_reference(case, deterministic):
    check_msda_nonfinite(triton_fn(deterministic), msda_nonfinite_cases()[case], DEVICE,
                         superset=("grad_value",) if deterministic else ())


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", list(dca_nonfinite_cases()))
def test_triton_dca_non_finite_numbers_as_in_the_reference(case, deterministic):
    fn = lambda *a: piip_kernels.deform_cross_attn(*a, backend="triton", deterministic=deterministic)  # noqa: E731
    check_dca_nonfinite(fn, dca_nonfinite_cases()[case], DEVICE, superset=("grad_value",) if deterministic else ())


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("case", list(merge_nonfinite_cases()))
def test_triton_merge_non_finite_numbers_as_in_the_reference(case, align_corners):
    fn = lambda f, w, s, a: piip_kernels.branch_merge(f, w, s, align_corners=a, backend="triton")  # noqa: E731
    check_merge_nonfinite(fn, merge_nonfinite_cases()[case], align_corners, DEVICE)


@pytest.mark.skipif(DEVICE.type == "meta", reason="the checks run with the kernels; meta runs the fake kernels")
def test_triton_kernels_check_shapes_themselves():
    """torch.ops.piip.* reach the Triton kernels without the public functions' checks: shapes
    that would send the kernels outside their tensors raise instead."""
    value, shapes, starts, loc, attn = on_device(msda_inputs([(5, 7), (3, 4)], N=2, Lq=6, M=2, D=8, P=3))
    with pytest.raises(ValueError, match="sampling_locations must have shape"):
        torch.ops.piip.ms_deform_attn(value, shapes, starts, loc[:1], attn, "triton")
    with pytest.raises(ValueError, match="grad_output must have shape"):
        torch.ops.piip.ms_deform_attn_backward(torch.ones(2, 6, 8, device=DEVICE), value, shapes, starts, loc, attn, "triton")
    value, offsets, logits = on_device(dca_inputs())
    with pytest.raises(ValueError, match="value must have shape"):
        torch.ops.piip.deform_cross_attn(value, offsets, logits, [5, 8], [3, 4], "triton")
    with pytest.raises(ValueError, match="offsets must have shape"):
        torch.ops.piip.deform_cross_attn(value, offsets, logits, [5, 7], [4, 4], "triton")
    feats, weights = merge_inputs([(3, 3), (6, 6)])
    feats, weights = on_device(feats), weights.to(DEVICE)
    with pytest.raises(ValueError, match="weights must have shape"):
        torch.ops.piip.branch_merge(feats, weights[:1], [6, 6], False, "triton")
    with pytest.raises(ValueError, match=r"features\[1\] must have shape"):
        torch.ops.piip.branch_merge([feats[0], feats[1][:1]], weights, [6, 6], False, "triton")


def test_triton_rejects_float64():
    inputs = on_device(msda_inputs([(3, 4)], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="triton"):
        ms_deform_attn(*inputs, backend="triton")


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", [((5, 7), (3, 4), 4, 6, 4), ((1, 1), (2, 3), 2, 12, 2), ((9, 9), (4, 4), 3, 100, 3),
                                  ((6, 5), (6, 5), 1, 32, 1)], ids=lambda c: f"v{c[0][0]}x{c[0][1]}-D{c[3]}-P{c[4]}")
def test_triton_deform_cross_attn(case, deterministic):
    value_hw, query_hw, M, D, P = case
    cpu_inputs = dca_inputs(value_hw=value_hw, query_hw=query_hw, M=M, D=D, P=P)
    inputs = on_device(cpu_inputs)
    fn = lambda *a: piip_kernels.deform_cross_attn(*a, backend="triton", deterministic=deterministic)  # noqa: E731
    got, grad_out = dca_grads(fn, inputs, value_hw, query_hw)
    ref, _ = dca_grads(dca_reference_fn, inputs, value_hw, query_hw, grad_out)
    truth, _ = dca_grads(deform_cross_attn_reference, [t.double() for t in cpu_inputs], value_hw, query_hw, grad_out)
    for name, g, r, t in zip(["out", "grad_value", "grad_offsets", "grad_logits"], got, ref, truth):
        assert g.dtype == r.dtype and g.device == DEVICE
        assert_derived_close(name, host(g), host(r), t, floor=1e-6)


def test_triton_deform_cross_attn_bf16():
    cpu_inputs = dca_inputs(value_hw=(9, 11), query_hw=(5, 6), M=4, D=24, dtype=torch.bfloat16, off_dtype=torch.float32)
    inputs = on_device(cpu_inputs)
    fn = lambda *a: piip_kernels.deform_cross_attn(*a, backend="triton")  # noqa: E731
    got, grad_out = dca_grads(fn, inputs, (9, 11), (5, 6))
    ref, _ = dca_grads(dca_reference_fn, inputs, (9, 11), (5, 6), grad_out)
    truth, _ = dca_grads(deform_cross_attn_reference, [t.double() for t in cpu_inputs], (9, 11), (5, 6), grad_out)
    for name, g, r, t in zip(["out", "grad_value", "grad_offsets", "grad_logits"], got, ref, truth):
        assert_derived_close(name, host(g), host(r), t, floor=1e-3)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("case", [([(3, 3), (4, 4), (6, 6)], (6, 6)), ([(8, 8), (3, 5)], (5, 6)), ([(1, 1)], (4, 3)),
                                  ([(5, 7), (9, 11), (13, 17), (13, 17), (2, 2)], (13, 17)), ([(21, 21), (35, 35), (49, 49)], (49, 49))],
                         ids=lambda c: f"{len(c[0])}br-{c[1][0]}x{c[1][1]}")
def test_triton_branch_merge(case, align_corners):
    sizes, out_size = case
    feats, weights = merge_inputs(sizes, C=2)
    fn = lambda f, w, s, a: piip_kernels.branch_merge(f, w, s, align_corners=a, backend="triton")  # noqa: E731
    check_merge_against_reference(fn, merge_reference_fn, feats, weights, out_size, align_corners, DEVICE)


@pytest.mark.parametrize("case", merge_edge_cases(), ids=lambda c: f"{c[0]}-{c[1]}-ac{int(c[2])}")
def test_triton_branch_merge_edge_sizes(case):
    sizes, out_size, align_corners = case
    feats, weights = merge_inputs(sizes, C=2)
    fn = lambda f, w, s, a: piip_kernels.branch_merge(f, w, s, align_corners=a, backend="triton")  # noqa: E731
    check_merge_against_reference(fn, merge_reference_fn, feats, weights, out_size, align_corners, DEVICE)


def test_triton_branch_merge_float64_weights_promote():
    feats, weights = merge_inputs([(3, 3), (5, 4), (6, 6)])
    fn = lambda f, w, s, a: piip_kernels.branch_merge(f, w, s, align_corners=a, backend="triton")  # noqa: E731
    # The GPU kernels merge in fp32 and give the float64 map promote_types asks for.
    check_merge_against_reference(fn, merge_reference_fn, feats, weights.double(), (6, 6), False, DEVICE)


def test_triton_branch_merge_bf16_is_deterministic():
    feats, weights = merge_inputs([(7, 7), (12, 12), (20, 20)], C=4, dtype=torch.bfloat16)
    feats, weights = [f.to(DEVICE) for f in feats], weights.to(DEVICE)
    fn = lambda f, w, s, a: piip_kernels.branch_merge(f, w, s, backend="triton")  # noqa: E731
    a, go = merge_grads(fn, feats, weights, (20, 20))
    b, _ = merge_grads(fn, feats, weights, (20, 20), False, go)
    assert a[0].dtype == torch.float32
    for x, y in zip(a, b):
        assert same(x, y)


def test_triton_autotune_configs_per_head_dim(monkeypatch):
    """Autotuning times at most four configs per head dim: 4 elements per thread (one 8) and
    at most 8 warps; PIIP_TRITON_AUTOTUNE=0 leaves one (the GPU check's correctness tests)."""
    import triton

    from piip_kernels.msda import triton as tk

    monkeypatch.setattr(tk, "INTERPRET", False)
    candidates = [triton.Config({"BLOCK_Q": bq}, num_warps=w) for bq in (8, 16, 32, 64) for w in (1, 2, 4, 8)]
    for block_d in (8, 16, 32, 64, 128):
        kept = tk._prune(candidates, {}, BLOCK_D=block_d)
        per_thread = sorted(c.kwargs["BLOCK_Q"] * block_d // (32 * c.num_warps) for c in kept)
        assert 1 <= len(kept) <= 4 and all(c.num_warps <= 8 for c in kept)
        assert per_thread[0] == tk.ELEMENTS_PER_THREAD and set(per_thread) <= {4, 8}
    monkeypatch.setenv("PIIP_TRITON_AUTOTUNE", "0")
    assert len(tk._prune(candidates, {}, BLOCK_D=32)) == 1


def test_launch_grid_folds_rows_past_cudas_limit():
    """CUDA caps grid axes 1 and 2 at 65535: rows (N * M heads, N * C merge planes) beyond that
    fold over axes 1 and 2, every row is one program exactly once, and a launch beyond every
    limit is refused."""
    from piip_kernels.msda.triton import GRID_YZ_LIMIT, launch_grid

    assert GRID_YZ_LIMIT == 65535
    assert launch_grid(5, 8) == (5, 8, 1)
    assert launch_grid(5, 65535) == (5, 65535, 1)
    assert launch_grid(5, 65536) == (5, 65535, 2)    # batch 64 x 1024 channels of a merge
    assert launch_grid(1, 2 * 65535 + 2) == (1, 65535, 3)
    assert launch_grid(2 ** 31 - 1, 65535 ** 2) == (2 ** 31 - 1, 65535, 65535)
    for blocks, rows in ((2 ** 31, 1), (1, 65535 ** 2 + 1)):
        with pytest.raises(ValueError, match="exceeds CUDA's grid limits"):
            launch_grid(blocks, rows)
    for rows in (1, 7, 65535, 65536, 200000):
        _, y, z = launch_grid(1, rows)
        assert y <= 65535 and z <= 65535
        covered = torch.arange(y)[:, None] + torch.arange(z)[None, :] * y  # each program's row, as _row computes it
        assert torch.equal(covered.flatten().sort().values[:rows], torch.arange(rows))


@pytest.mark.skipif(DEVICE.type == "meta", reason="runs the kernels")
def test_folded_launches_at_a_small_limit(monkeypatch):
    """With the limit lowered to 3, N * M = 8 rows fold into a (blocks, 3, 3) grid whose last
    program has no row: all three ops still match the float64 reference."""
    from piip_kernels.msda import triton as tk

    monkeypatch.setattr(tk, "GRID_YZ_LIMIT", 3)
    assert tk.launch_grid(2, 8) == (2, 3, 3)
    cpu_inputs = msda_inputs([(5, 7), (3, 4)], N=2, Lq=9, M=4, D=8, P=2)
    got, grad_out = run_with_grads(triton_fn(), on_device(cpu_inputs))
    truth = reference64(cpu_inputs, grad_out)
    for name, g, t in zip(["out", "grad_value", "grad_loc", "grad_attn"], got, truth):
        torch.testing.assert_close(host(g).double(), t, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    cpu_inputs = dca_inputs(N=2, M=4, D=8)
    fn = lambda *a: piip_kernels.deform_cross_attn(*a, backend="triton")  # noqa: E731
    got, grad_out = dca_grads(fn, on_device(cpu_inputs), (5, 7), (3, 4))
    truth, _ = dca_grads(deform_cross_attn_reference, [t.double() for t in cpu_inputs], (5, 7), (3, 4), grad_out)
    for g, t in zip(got, truth):
        torch.testing.assert_close(host(g).double(), t, rtol=1e-4, atol=1e-5)
    feats, weights = merge_inputs([(3, 3), (4, 5), (6, 6)], N=2, C=4)
    fn = lambda f, w, s, a: piip_kernels.branch_merge(f, w, s, align_corners=a, backend="triton")  # noqa: E731
    check_merge_against_reference(fn, merge_reference_fn, feats, weights, (6, 6), False, DEVICE)


COMPILE = r"""
import os, re, subprocess, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from piip_kernels.msda import triton as tk
from piip_kernels.dca import triton as dk
from piip_kernels.merge import triton as mk
target = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")  # Triton's own
spills = []


def build(fn, sig, constexprs, num_warps=4, check=False, vector_loads=False):
    # Pointers 16-byte aligned, as the JIT specialises them for torch's allocations.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*")}
    k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=target,
                       options={"num_warps": num_warps})
    ptx = k.asm["ptx"]
    assert ".target sm_90" in ptx, "not sm_90 code"
    if vector_loads:  # several channels per load, also for head dims that are not multiples of 16
        assert re.search(r"ld\.global(\.nc)?\.v[248]", ptx), f"{fn.__name__} {constexprs}: no vector loads"
    if check:  # the compiler's resource report: spills would mean local-memory traffic
        arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        rep = subprocess.run([PTXAS, f"-arch={arch}", "-v", f.name, "-o", f.name + ".cubin"], capture_output=True, text=True)
        spilled = int(re.search(r"(\d+) bytes spill stores", rep.stderr).group(1))
        # A register or two may spill in the fixed-point backward depending on the Triton
        # version (8 bytes with 3.6, none with 3.7); the old configs spilled up to 900 bytes.
        if spilled > 16:
            spills.append(f"{fn.__name__} {constexprs} warps={num_warps}: {spilled} bytes")


msda_sizes = {k: "i32" for k in ("S", "Lq", "M", "L", "P", "NM")} | {"D": "constexpr"}
dca_sizes = {k: "i32" for k in ("Hv", "Wv", "Hq", "Wq", "M", "P", "NM")} | {"D": "constexpr"}
for vt in ("fp32", "bf16", "fp16"):
    # Every dtype compiles; bf16 also at every config autotuning can pick for head dims up to 128.
    configs = [(D, bd, c.kwargs["BLOCK_Q"], c.num_warps) for D, bd in ((12, 16), (24, 32), (100, 128))
               for c in tk._prune(tk._configs(), {}, BLOCK_D=bd)]
    for D, bd, bq, w in configs if vt == "bf16" else [(24, 32, 32, 8)]:
        common = {"value_ptr": "*" + vt, "shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": "*fp32", "attn_ptr": "*fp32"}
        build(tk._msda_fwd_kernel, dict(common, out_ptr="*" + vt, **msda_sizes, BLOCK_Q="constexpr", BLOCK_D="constexpr"),
              {"D": D, "BLOCK_Q": bq, "BLOCK_D": bd}, w, check=True, vector_loads=True)
        sig = dict(value_ptr="*" + vt, off_ptr="*fp32", logits_ptr="*fp32", out_ptr="*" + vt, **dca_sizes,
                   BLOCK_Q="constexpr", BLOCK_D="constexpr", BLOCK_P="constexpr")
        build(dk._dca_fwd_kernel, sig, {"D": D, "BLOCK_Q": bq, "BLOCK_D": bd, "BLOCK_P": 4}, w, check=True,
              vector_loads=True)
        for det in (False, True) if (bd, bq) == (32, 32) else (False,):
            sig = dict(common, grad_out_ptr="*" + vt, grad_value_ptr="*i64" if det else "*fp32", grad_loc_ptr="*fp32",
                       grad_attn_ptr="*fp32", scale_ptr="*fp64", **msda_sizes, DETERMINISTIC="constexpr",
                       BLOCK_Q="constexpr", BLOCK_D="constexpr")
            build(tk._msda_bwd_kernel, sig, {"D": D, "DETERMINISTIC": det, "BLOCK_Q": bq, "BLOCK_D": bd}, w, check=True)
            sig = dict(value_ptr="*" + vt, off_ptr="*fp32", logits_ptr="*fp32", grad_out_ptr="*" + vt,
                       grad_value_ptr="*i64" if det else "*fp32", grad_off_ptr="*fp32", grad_logits_ptr="*fp32",
                       scale_ptr="*fp64", **dca_sizes, DETERMINISTIC="constexpr", BLOCK_Q="constexpr", BLOCK_D="constexpr",
                       BLOCK_P="constexpr")
            build(dk._dca_bwd_kernel, sig, {"D": D, "DETERMINISTIC": det, "BLOCK_Q": bq, "BLOCK_D": bd, "BLOCK_P": 4}, w,
                  check=True)
for vt in ("fp32", "bf16"):
    for align in (False, True):
        hw = {k: "i32" for k in ("H0", "W0", "H1", "W1", "H2", "W2", "H3", "W3")}
        sc = {k: "fp32" for k in ("sy0", "sx0", "sy1", "sx1", "sy2", "sx2", "sy3", "sx3")}
        sig = dict(out_ptr="*fp32", w_ptr="*fp32", f0="*" + vt, f1="*" + vt, f2="*" + vt, f3="*" + vt, **hw, **sc,
                   Ho="i32", Wo="i32", planes="i32", NB="constexpr", ALIGN="constexpr", ID0="constexpr", ID1="constexpr",
                   ID2="constexpr", ID3="constexpr", BLOCK="constexpr")
        # Every config the autotuner may pick (bf16 and align_corners=False), one for the others.
        fwd = mk.FORWARD_CONFIGS if (vt, align) == ("bf16", False) else mk.FORWARD_CONFIGS[:1]
        bwd = mk.BACKWARD_CONFIGS if (vt, align) == ("bf16", False) else mk.BACKWARD_CONFIGS[:1]
        for c in fwd:
            build(mk._merge_fwd_kernel, sig, {"NB": 3, "ALIGN": align, "ID0": False, "ID1": False, "ID2": True,
                                              "ID3": True, "BLOCK": c.kwargs["BLOCK"]}, c.num_warps, check=True)
        sig = dict(grad_out_ptr="*fp32", f_ptr="*" + vt, grad_f_ptr="*" + vt, partial_ptr="*fp32", weight_ptr="*fp32",
                   H="i32", W="i32", Ho="i32", Wo="i32", sy="fp32", sx="fp32", inv_sy="fp32", inv_sx="fp32", KY="i32",
                   KX="i32", planes="i32", SHARES="i32", ALIGN="constexpr", IDENTITY="constexpr", BLOCK="constexpr")
        for c in bwd:
            for identity in (False, True):
                build(mk._merge_bwd_kernel, sig, {"ALIGN": align, "IDENTITY": identity, "BLOCK": c.kwargs["BLOCK"]},
                      c.num_warps, check=True)
assert not spills, "register spills:\n" + "\n".join(spills)
print("compiled")
"""


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(DEVICE.type == "meta", reason="tangents along locations need the level sizes' values")
def test_triton_forward_mode_ad():
    """Tangents of the three ops on the triton backend against the reference backend's in float64."""
    value, shapes, starts, loc, attn = msda_inputs([(3, 4), (2, 5)], N=2, Lq=5, M=2, D=8, P=2, dtype=torch.float64)
    check_gpu_tangents(lambda v, lc, a: ms_deform_attn(v, shapes.to(DEVICE), starts.to(DEVICE), lc, a, backend="triton"),
                       lambda v, lc, a: ms_deform_attn(v, shapes, starts, lc, a, backend="reference"), [value, loc, attn], DEVICE)
    check_gpu_tangents(lambda *a: piip_kernels.deform_cross_attn(a[0], (5, 7), a[1], a[2], (3, 4), backend="triton"),
                       lambda *a: piip_kernels.deform_cross_attn(a[0], (5, 7), a[1], a[2], (3, 4), backend="reference"),
                       list(dca_inputs(dtype=torch.float64)), DEVICE)
    feats, weights = merge_inputs([(3, 3), (4, 5), (6, 6)], dtype=torch.float64)
    check_gpu_tangents(lambda *a: piip_kernels.branch_merge(list(a[:3]), a[3], (6, 6), backend="triton"),
                       lambda *a: piip_kernels.branch_merge(list(a[:3]), a[3], (6, 6), backend="reference"),
                       [*feats, weights.double()], DEVICE)
