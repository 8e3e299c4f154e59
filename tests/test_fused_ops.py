"""deform_cross_attn and branch_merge: every backend against a float64 reference."""
import os

import pytest
import torch
import torch.nn.functional as F

import piip_kernels
from piip_kernels import branch_merge, deform_cross_attn, ms_deform_attn
from piip_kernels.dca.reference import deform_cross_attn_reference, grid_reference_points
from piip_kernels.merge.reference import branch_merge_reference

from helpers import (assert_derived_close, check_dca_nonfinite, check_forward_ad, check_merge_against_reference, check_merge_nonfinite, dca_grads,
                     dca_inputs, dca_nonfinite_cases, merge_edge_cases, merge_grads, merge_inputs, merge_nonfinite_cases)

REASONS = piip_kernels.dca.api.BACKENDS["cpu"](torch.device("cpu"), torch.float32)
needs_cpu_kernel = pytest.mark.skipif(bool(REASONS) and os.environ.get("PIIP_REQUIRE_EXT") != "1", reason="; ".join(REASONS))
BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu_kernel)]


# --- deform_cross_attn -------------------------------------------------------------

def _dca(backend):
    return lambda *a: deform_cross_attn(*a, backend=backend)


DCA_CASES = [((5, 7), (3, 4), 4, 6, 4), ((1, 1), (2, 3), 2, 12, 2), ((13, 11), (7, 9), 16, 24, 4),
             ((9, 9), (4, 4), 3, 100, 3), ((6, 5), (6, 5), 1, 32, 1),
             # What CNN branches bring (16 heads, value width C/2): a stride-4 ConvNeXt map of
             # width 96 read by ViT queries, width 384 at stride 16, width 1536 at stride 32
             # read by a finer grid; non-square grids throughout.
             ((64, 48), (7, 5), 16, 3, 4), ((24, 32), (9, 12), 16, 12, 4), ((4, 6), (14, 10), 16, 48, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", DCA_CASES, ids=lambda c: f"v{c[0][0]}x{c[0][1]}-D{c[3]}-P{c[4]}")
def test_dca_matches_float64_reference(case, dtype, backend):
    value_hw, query_hw, M, D, P = case
    inputs = dca_inputs(value_hw=value_hw, query_hw=query_hw, M=M, D=D, P=P, dtype=dtype)
    got, grad_out = dca_grads(_dca(backend), inputs, value_hw, query_hw)
    ref, _ = dca_grads(deform_cross_attn_reference, inputs, value_hw, query_hw, grad_out)
    truth, _ = dca_grads(deform_cross_attn_reference, [t.double() for t in inputs], value_hw, query_hw, grad_out)
    for name, g, r, t in zip(["out", "grad_value", "grad_offsets", "grad_logits"], got, ref, truth):
        assert g.dtype == r.dtype
        assert_derived_close(name, g, r, t, floor=1e-12 if dtype == torch.float64 else 1e-6)


def test_dca_reference_is_ms_deform_attn_with_grid_points():
    """The specification: the unfused PIIP path, written out."""
    value, offsets, logits = dca_inputs(dtype=torch.float64)
    ref = grid_reference_points((3, 4), dtype=torch.float64)
    assert torch.equal(ref[5], torch.tensor([(1 + 0.5) / 4, (1 + 0.5) / 3], dtype=torch.float64))
    loc = ref[None, :, None, None, None, :] + offsets[:, :, :, None] / torch.tensor([7.0, 5.0], dtype=torch.float64)
    want = ms_deform_attn(value, torch.tensor([[5, 7]]), torch.tensor([0]), loc, logits.softmax(-1)[:, :, :, None],
                          backend="reference")
    torch.testing.assert_close(deform_cross_attn(value, (5, 7), offsets, logits, (3, 4), backend="reference"), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(dca_nonfinite_cases()))
def test_dca_non_finite_numbers_as_in_the_reference(case, backend, dtype):
    """Non-finite offsets, logits, values and grad_output reach the output and gradients
    exactly where they reach the float64 reference's."""
    check_dca_nonfinite(_dca(backend), dca_nonfinite_cases()[case], torch.device("cpu"), dtype)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype,off_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
def test_dca_half_precision(dtype, off_dtype):
    inputs = dca_inputs(value_hw=(9, 11), query_hw=(5, 6), M=4, D=24, dtype=dtype, off_dtype=off_dtype)
    got, grad_out = dca_grads(_dca("cpu"), inputs, (9, 11), (5, 6))
    ref, _ = dca_grads(deform_cross_attn_reference, inputs, (9, 11), (5, 6), grad_out)
    truth, _ = dca_grads(deform_cross_attn_reference, [t.double() for t in inputs], (9, 11), (5, 6), grad_out)
    assert got[0].dtype == dtype and got[2].dtype == off_dtype
    for name, g, r, t in zip(["out", "grad_value", "grad_offsets", "grad_logits"], got, ref, truth):
        assert_derived_close(name, g, r, t, floor=1e-3)


@needs_cpu_kernel
def test_dca_deterministic_and_large_logits():
    inputs = dca_inputs(N=2, value_hw=(17, 13), query_hw=(9, 7), M=8, D=12)
    inputs[2].mul_(200)  # softmax must subtract the max
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            runs.append(dca_grads(_dca("cpu"), inputs, (17, 13), (9, 7))[0])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@needs_cpu_kernel
def test_dca_gradcheck_and_opcheck():
    value, offsets, logits = (t.requires_grad_(True) for t in dca_inputs(N=1, value_hw=(3, 4), query_hw=(2, 2), M=2, D=3, P=2, dtype=torch.float64, spread=1.0))
    torch.autograd.gradcheck(lambda v, o, l: deform_cross_attn(v, (3, 4), o, l, (2, 2), backend="cpu"), (value, offsets, logits))
    torch.library.opcheck(torch.ops.piip.deform_cross_attn.default, (value, offsets, logits, [3, 4], [2, 2], "cpu"))


@needs_cpu_kernel
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_dca_torch_compile(compiler):
    inputs = dca_inputs()

    def f(v, hw, o, l, qhw):
        return deform_cross_attn(v, hw, o, l, qhw, backend="cpu").sin()

    torch._dynamo.reset()
    want, grad_out = dca_grads(f, inputs, (5, 7), (3, 4))
    got, _ = dca_grads(torch.compile(f, fullgraph=True, backend=compiler), inputs, (5, 7), (3, 4), grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["all", "value", "offsets", "logits"])
def test_dca_forward_mode_ad(which, backend):
    """Tangents by torch.func.jvp and torch.autograd.forward_ad (they used to be all zero on cpu)."""
    inputs = dca_inputs(N=2, value_hw=(4, 5), query_hw=(3, 2), M=2, D=3, P=3, dtype=torch.float64, spread=2.0)
    g = torch.Generator().manual_seed(3)
    tangents = [torch.randn(t.shape, generator=g, dtype=t.dtype) if which in ("all", name) else None
                for t, name in zip(inputs, ("value", "offsets", "logits"))]
    check_forward_ad(lambda v, o, lg: deform_cross_attn(v, (4, 5), o, lg, (3, 2), backend=backend), inputs, tangents)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args,match", [
    (lambda v, o, l: (v, (5, 6), o, l, (3, 4)), "value must be"),
    (lambda v, o, l: (v, (5, 7), o[:, :5], l, (3, 4)), "offsets must be"),
    (lambda v, o, l: (v, (5, 7), o, l[..., :2], (3, 4)), "logits must be"),
    (lambda v, o, l: (v, (5, 7), o, l, (0, 4)), "positive"),
    (lambda v, o, l: (v, 5, o, l, (3, 4)), "pair"),
    (lambda v, o, l: (v.long(), (5, 7), o, l, (3, 4)), "floating"),
])
def test_dca_bad_input(args, match, backend):
    with pytest.raises(ValueError, match=match):
        deform_cross_attn(*args(*dca_inputs()), backend=backend)


WRAPPING_GRIDS = r"""
import torch
import piip_kernels
# 3 x (2**64 + 2) / 3 cells wrap to 2 in int64: value has 2 rows, offsets 2 queries. The
# point reads pixel (1, 0) of that grid, 6e18 rows past the end of value.
big = (2**64 + 2) // 3
value = torch.randn(1, 2, 1, 4)
offsets = torch.tensor([0.2, 1.2]).expand(1, 2, 1, 1, 2).contiguous()
logits = torch.zeros(1, 2, 1, 1)
for value_hw, query_hw in (([3, big], [1, 2]), ([1, 2], [3, big]), ([3, big], [3, big])):
    for name, call in (("op", lambda: torch.ops.piip.deform_cross_attn(value, offsets, logits, value_hw, query_hw, "cpu")),
                       ("backward", lambda: torch.ops.piip.deform_cross_attn_backward(
                           torch.ones(1, 2, 4), value, offsets, logits, value_hw, query_hw, "cpu"))):
        try:
            call()
            print("ACCEPTED", name, value_hw, query_hw)
        except Exception as e:
            print("REFUSED", name, type(e).__name__, str(e).splitlines()[0])
"""


@needs_cpu_kernel
def test_dca_native_check_is_overflow_safe():
    """Grid sizes whose H * W wraps int64 to the rows of value (or the queries of offsets)
    must be refused by the native check, which torch.ops.piip.* reaches directly."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", WRAPPING_GRIDS], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"rc {res.returncode}: {res.stderr[-2000:]}"
    lines = res.stdout.splitlines()
    assert len(lines) == 6 and all(line.startswith("REFUSED") and "RuntimeError" in line for line in lines), res.stdout


def test_msda_module_grid_path_matches_general_path():
    torch.manual_seed(0)
    attn = piip_kernels.MSDeformAttn(d_model=32, n_levels=1, n_heads=4, n_points=4, ratio=0.5, d_feat=24)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
    q, feat = torch.randn(2, 12, 32), torch.randn(2, 35, 24)
    ref = grid_reference_points((3, 4))[None, :, None]
    want = attn(q, ref, feat, torch.tensor([[5, 7]]), torch.tensor([0]))
    torch.testing.assert_close(attn.forward_grid(q, (3, 4), feat, (5, 7)), want)


# --- branch_merge ---------------------------------------------------------------------

MERGE_CASES = [
    ([(3, 3), (4, 4), (6, 6)], (6, 6)),            # PIIP: upsample to the finest branch
    ([(5, 7), (9, 11), (13, 17), (13, 17)], (13, 17)),
    ([(42, 42), (70, 70), (98, 98)], (98, 98)),    # TSB-1568 grids
    ([(28, 28), (56, 56), (112, 112)], (112, 112)),  # long planes: the weight gradient sums 12544 products each
    ([(8, 8), (3, 5)], (5, 6)),                    # downsampling too
    ([(1, 1)], (4, 3)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: f"{len(c[0])}br-{c[1][0]}x{c[1][1]}")
def test_merge_matches_float64_reference(case, dtype, align_corners, backend):
    sizes, out_size = case
    feats, weights = merge_inputs(sizes, dtype=dtype, C=2 if sizes[-1][0] > 40 else 3)
    fn = lambda f, w, s, a: branch_merge(f, w, s, align_corners=a, backend=backend)  # noqa: E731
    got, grad_out = merge_grads(fn, feats, weights, out_size, align_corners)
    ref, _ = merge_grads(branch_merge_reference, feats, weights, out_size, align_corners, grad_out)
    truth, _ = merge_grads(branch_merge_reference, [f.double() for f in feats], weights.double(), out_size, align_corners, grad_out)
    names = ["out"] + [f"grad_f{i}" for i in range(len(feats))] + ["grad_w"]
    for name, g, r, t in zip(names, got, ref, truth):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert_derived_close(name, g, r, t, floor=1e-12 if dtype == torch.float64 else 1e-6)


@needs_cpu_kernel
@pytest.mark.parametrize("case", merge_edge_cases(), ids=lambda c: f"{c[0]}-{c[1]}-ac{int(c[2])}")
def test_merge_edge_sizes(case):
    sizes, out_size, align_corners = case
    feats, weights = merge_inputs(sizes, C=2)
    fn = lambda f, w, s, a: branch_merge(f, w, s, align_corners=a, backend="cpu")  # noqa: E731
    check_merge_against_reference(fn, branch_merge_reference, feats, weights, out_size, align_corners, torch.device("cpu"))


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(merge_nonfinite_cases()))
def test_merge_non_finite_numbers_as_in_the_reference(case, backend, align_corners):
    fn = lambda f, w, s, a: branch_merge(f, w, s, align_corners=a, backend=backend)  # noqa: E731
    check_merge_nonfinite(fn, merge_nonfinite_cases()[case], align_corners, torch.device("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["all", "maps", "one_map", "weights"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_merge_forward_mode_ad(which, align_corners, backend):
    feats, weights = merge_inputs([(3, 3), (4, 5), (6, 6)], dtype=torch.float64)
    primals = [*feats, weights.double()]
    g = torch.Generator().manual_seed(3)
    wanted = {"all": range(4), "maps": range(3), "one_map": [1], "weights": [3]}[which]
    tangents = [torch.randn(t.shape, generator=g, dtype=t.dtype) if i in wanted else None for i, t in enumerate(primals)]
    check_forward_ad(lambda *a: branch_merge(list(a[:3]), a[3], (6, 6), align_corners=align_corners, backend=backend),
                     primals, tangents)


def test_merge_reference_is_the_eager_pytorch_merge():
    feats, weights = merge_inputs([(3, 3), (4, 4), (6, 6)])
    want = sum(w * F.interpolate(f, size=(6, 6), mode="bilinear", align_corners=False) for f, w in zip(feats, weights))
    torch.testing.assert_close(branch_merge(feats, weights, (6, 6), backend="reference"), want)


@pytest.mark.parametrize("backend", [None, *BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_float64_weights_promote(dtype, backend):
    """Maps below float64 with float64 weights give a float64 map (promote_types, as the
    docstring says and the reference does), on the default backend too."""
    feats, weights = merge_inputs([(3, 3), (5, 4), (6, 6)], dtype=dtype)
    fn = lambda f, w, s, a: branch_merge(f, w, s, backend=backend)  # noqa: E731
    got, _ = merge_grads(fn, feats, weights.double(), (6, 6))
    assert [g.dtype for g in got] == [torch.float64] + [dtype] * 3 + [torch.float64]
    check_merge_against_reference(fn, branch_merge_reference, feats, weights.double(), (6, 6), False, torch.device("cpu"),
                                  floor=1e-12 if dtype == torch.float32 else 1e-3)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_half_precision_maps_give_fp32_with_fp32_weights(dtype):
    feats, weights = merge_inputs([(5, 5), (9, 9), (14, 14)], C=8, dtype=dtype)
    fn = lambda f, w, s, a: branch_merge(f, w, s, backend="cpu")  # noqa: E731
    got, grad_out = merge_grads(fn, feats, weights, (14, 14))
    ref, _ = merge_grads(branch_merge_reference, feats, weights, (14, 14), False, grad_out)
    truth, _ = merge_grads(branch_merge_reference, [f.double() for f in feats], weights.double(), (14, 14), False, grad_out)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for g, r, t in zip(got, ref, truth):
        assert_derived_close("merge", g, r, t, floor=1e-3)


@needs_cpu_kernel
def test_merge_channels_last_and_deterministic():
    feats, weights = merge_inputs([(7, 7), (12, 12), (20, 20)], C=16)
    cl = [f.to(memory_format=torch.channels_last) for f in feats]
    fn = lambda f, w, s, a: branch_merge(f, w, s, backend="cpu")  # noqa: E731
    a, go = merge_grads(fn, feats, weights, (20, 20))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b, _ = merge_grads(fn, cl, weights, (20, 20), False, go)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(a, b):
        assert torch.equal(x, y.contiguous())


@needs_cpu_kernel
def test_merge_gradcheck_and_opcheck():
    feats, weights = merge_inputs([(2, 3), (4, 5)], N=1, C=2, dtype=torch.float64)
    weights = weights.double()
    fs = [f.requires_grad_(True) for f in feats]
    w = weights.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b, w: branch_merge([a, b], w, (4, 5), backend="cpu"), (*fs, w))
    torch.library.opcheck(torch.ops.piip.branch_merge.default, (fs, w, [4, 5], False, "cpu"))


@needs_cpu_kernel
def test_merge_torch_compile():
    feats, weights = merge_inputs([(3, 3), (6, 6)])

    def f(fs, w, s, a):
        return branch_merge(fs, w, s, backend="cpu").relu()

    torch._dynamo.reset()
    want, go = merge_grads(f, feats, weights, (6, 6))
    got, _ = merge_grads(torch.compile(f, fullgraph=True, backend="inductor"), feats, weights, (6, 6), False, go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,match", [
    (lambda f, w: (f[0], w, (6, 6)), "non-empty list"),
    (lambda f, w: ([f[0], f[1][:, :2]], w[:2], (6, 6)), "N, C"),
    (lambda f, w: (f, w[:2], (6, 6)), "weights must be"),
    (lambda f, w: (f, w, (0, 6)), "positive"),
    (lambda f, w: (f, w, 6), "pair"),
    (lambda f, w: ([f[0][0]] + f[1:], w, (6, 6)), r"features\[0\]"),
])
def test_merge_bad_input(make, match, backend):
    feats, weights = merge_inputs([(3, 3), (4, 4), (6, 6)])
    with pytest.raises(ValueError, match=match):
        branch_merge(*make(feats, weights), backend=backend)


def test_flop_formulas_by_hand():
    from torch.utils.flop_counter import FlopCounterMode

    feats, weights = merge_inputs([(3, 3), (6, 6)], N=2, C=3)
    value, offsets, logits = dca_inputs(N=2, value_hw=(5, 7), query_hw=(3, 4), M=4, D=6, P=4)
    with FlopCounterMode(display=False) as fc:
        branch_merge(feats, weights, (6, 6), backend="cpu" if not REASONS else "reference")
    if not REASONS:
        # resized branch: 4 taps + weight per output element; the identity branch: the weight
        assert fc.get_total_flops() == 2 * (5 + 1) * 2 * 3 * 36
        with FlopCounterMode(display=False) as fc:
            deform_cross_attn(value, (5, 7), offsets, logits, (3, 4), backend="cpu")
        assert fc.get_total_flops() == 2 * 5 * 2 * 12 * 4 * 4 * 6
