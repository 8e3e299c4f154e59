"""Multi-scale deformable attention: every backend against a float64 reference."""
import os
import subprocess
import sys

import pytest
import torch

import piip_kernels
from piip_kernels import ms_deform_attn
from piip_kernels.msda.reference import ms_deform_attn_reference

from helpers import (assert_derived_close, check_forward_ad, check_msda_nonfinite, msda_inputs, msda_nonfinite_cases, official_fixture, reference64,
                     run_with_grads)

CPU_REASONS = piip_kernels.msda.api.BACKENDS["cpu"](torch.device("cpu"), torch.float32)
needs_cpu_kernel = pytest.mark.skipif(bool(CPU_REASONS) and os.environ.get("PIIP_REQUIRE_EXT") != "1", reason="; ".join(CPU_REASONS))

CASES = [
    # (level shapes, Lq, M, D, P)
    ([(5, 7)], 9, 2, 1, 3),
    ([(7, 11), (3, 5)], 13, 3, 6, 2),
    ([(1, 1), (2, 3), (13, 17)], 5, 2, 12, 4),
    ([(11, 13)], 8, 4, 24, 4),
    ([(6, 7), (3, 5), (1, 1), (2, 2)], 6, 2, 32, 3),
    ([(9, 5)], 4, 1, 100, 2),
    ([(4, 5), (3, 3)], 3, 1, 64, 2),
]


def cpu_backend(*args):
    return ms_deform_attn(*args, backend="cpu")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{len(c[0])}-D{c[3]}")
def test_cpu_matches_float64_reference(case, dtype):
    shapes, Lq, M, D, P = case
    inputs = msda_inputs(shapes, Lq=Lq, M=M, D=D, P=P, dtype=dtype, outside=0.4)
    got, grad_out = run_with_grads(cpu_backend, inputs)
    ref_lowp, _ = run_with_grads(ms_deform_attn_reference, inputs, grad_out)
    truth = reference64(inputs, grad_out)
    for name, g, r, t in zip(["out", "grad_value", "grad_loc", "grad_attn"], got, ref_lowp, truth):
        assert g.dtype == r.dtype
        floor = 1e-12 if dtype == torch.float64 else 1e-6
        assert_derived_close(name, g, r, t, floor=floor)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype,loc_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_cpu_half_precision_accumulates_in_fp32(dtype, loc_dtype):
    inputs = msda_inputs([(7, 11), (3, 5)], Lq=11, M=2, D=24, P=4, dtype=dtype, loc_dtype=loc_dtype)
    got, grad_out = run_with_grads(cpu_backend, inputs)
    ref_lowp, _ = run_with_grads(ms_deform_attn_reference, inputs, grad_out)
    truth = reference64(inputs, grad_out)
    assert got[0].dtype == dtype and got[2].dtype == loc_dtype
    for name, g, r, t in zip(["out", "grad_value", "grad_loc", "grad_attn"], got, ref_lowp, truth):
        assert_derived_close(name, g, r, t, floor=1e-3)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_gradcheck_float64(backend):
    value, shapes, starts, loc, attn = msda_inputs([(3, 4), (2, 1)], N=1, Lq=3, M=2, D=3, P=2, dtype=torch.float64, outside=0.5)
    # Keep locations away from pixel centres' kinks by a random offset (grid_sample is piecewise linear).
    value.requires_grad_(True), loc.requires_grad_(True), attn.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, shapes, starts, l, a, backend=backend), (value, loc, attn), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_official_core_fixture(backend):
    fx = official_fixture("msda_core.pt")
    i, o = fx["inputs"], fx["outputs"]
    args = (i["value"], i["spatial_shapes"], i["level_start_index"], i["sampling_locations"], i["attention_weights"])
    (out, gv, gl, ga), _ = run_with_grads(lambda *a: ms_deform_attn(*a, backend=backend), args, i["grad_output_G"])
    for got, want in [(out, o["output"]), (gv, o["grad_value"]), (gl, o["grad_sampling_locations"]), (ga, o["grad_attention_weights"])]:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_official_module_fixture(backend):
    fx = official_fixture("msda_module.pt")
    cfg, i, o = fx["config"], fx["inputs"], fx["outputs"]
    module = piip_kernels.MSDeformAttn(**cfg["official_kwargs"], backend=backend)
    module.load_state_dict(fx["state_dict"], strict=True)
    with torch.no_grad():
        out = module(i["query"], i["reference_points"], i["input_flatten"], i["spatial_shapes"], i["level_start_index"])
        loc, weights = module.sampling(i["query"], i["reference_points"], i["spatial_shapes"])
    scale = o["output"].abs().max().item()
    torch.testing.assert_close(loc, o["sampling_locations"], rtol=0, atol=1e-6)
    torch.testing.assert_close(weights, o["attention_weights"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out, o["output"], rtol=0, atol=1e-5 * scale)


@needs_cpu_kernel
def test_non_contiguous_inputs():
    value, shapes, starts, loc, attn = msda_inputs([(5, 6), (2, 3)], Lq=5, M=2, D=8, P=3)
    # Same values, strided storage.
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    attn_nc = attn.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or attn_nc.is_contiguous())
    want = ms_deform_attn(value, shapes, starts, loc, attn, backend="cpu")
    got = ms_deform_attn(value_nc, shapes, starts, loc_nc, attn_nc, backend="cpu")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cpu_kernel
def test_cpu_backward_is_deterministic_across_thread_counts():
    inputs = msda_inputs([(13, 17), (5, 3)], N=2, Lq=40, M=4, D=16, P=4)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(run_with_grads(cpu_backend, inputs)[0])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_kernel)])
@pytest.mark.parametrize("sizes", [dict(N=0), dict(Lq=0), dict(P=0), dict(D=0)], ids=lambda d: f"{list(d)[0]}=0")
def test_empty_sizes(sizes, backend):
    """Empty batches, queries, points or channels give empty or zero results, never a crash."""
    args = dict(N=2, Lq=3, M=2, D=4, P=2) | sizes
    inputs = msda_inputs([(3, 4), (2, 2)], **args)
    (out, gv, gl, ga), _ = run_with_grads(lambda *a: ms_deform_attn(*a, backend=backend), inputs)
    assert out.shape == (args["N"], args["Lq"], args["M"] * args["D"])
    assert gv.shape == inputs[0].shape and gl.shape == inputs[3].shape and ga.shape == inputs[4].shape
    for g in (out, gv, gl, ga):
        assert not g.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_kernel)])
@pytest.mark.parametrize("case", list(msda_nonfinite_cases()))
def test_non_finite_numbers_reach_the_results_as_in_the_reference(case, backend, dtype):
    """A NaN or inf location reads NaN (grid_sample's weights are NaN), a non-finite weight
    times a zero sample is NaN, a NaN grad_output row reaches every point of the row: output
    and gradients are non-finite exactly where the float64 reference's are, so a diverging
    run shows it."""
    fn = lambda *a: ms_deform_attn(*a, backend=backend)  # noqa: E731
    check_msda_nonfinite(fn, msda_nonfinite_cases()[case], torch.device("cpu"), dtype)


@needs_cpu_kernel
def test_flat_index_beyond_int32():
    """The second level starts past 2**31 elements: offsets must be 64-bit."""
    big = (1 << 16, (1 << 15) + 1)  # 2**31 + 2**16 rows of D = 1
    small = (3, 5)
    S = big[0] * big[1] + small[0] * small[1]
    value = torch.empty(1, S, 1, 1, dtype=torch.bfloat16)  # untouched pages cost no memory
    tail = torch.randn(small[0] * small[1], dtype=torch.float64)
    value[0, -tail.numel():, 0, 0] = tail.to(torch.bfloat16)
    shapes = torch.tensor([big, small])
    starts = torch.tensor([0, big[0] * big[1]])
    g = torch.Generator().manual_seed(3)
    loc = torch.rand(1, 6, 1, 2, 2, 2, generator=g)
    loc[:, :, :, 0] = -5.0  # the huge level is never read (its memory is uninitialised)
    attn = torch.rand(1, 6, 1, 2, 2, generator=g)
    got = ms_deform_attn(value, shapes, starts, loc, attn, backend="cpu")
    small_value = value[:, -tail.numel():].float()
    want = ms_deform_attn(small_value, shapes[1:], starts[:1], loc[:, :, :, 1:].contiguous(), attn[:, :, :, 1:].contiguous(), backend="reference")
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


# --- forward-mode AD -------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_kernel)])
@pytest.mark.parametrize("which", ["all", "value", "locations", "weights"])
def test_forward_mode_ad(which, backend):
    """Tangents by torch.func.jvp and torch.autograd.forward_ad (they used to be all zero on
    the cpu backend, and the reference's grid_sample has no forward-mode formula)."""
    value, shapes, starts, loc, attn = msda_inputs([(3, 4), (2, 5), (1, 1)], N=2, Lq=5, M=2, D=3, P=2,
                                                   dtype=torch.float64, outside=0.4)
    g = torch.Generator().manual_seed(3)
    tangents = [torch.randn(t.shape, generator=g, dtype=t.dtype) if which in ("all", name) else None
                for t, name in ((value, "value"), (loc, "locations"), (attn, "weights"))]
    check_forward_ad(lambda v, lc, a: ms_deform_attn(v, shapes, starts, lc, a, backend=backend), [value, loc, attn],
                     tangents)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_reverse_mode_over_forward_mode(backend):
    """The tangent is differentiable in reverse mode (against torch.autograd.gradcheck); along a
    location it depends on value and weights, and on the location across the cell (through y
    in the x term and x in the y term)."""
    value, shapes, starts, loc, attn = msda_inputs([(3, 4), (2, 5)], N=1, Lq=3, M=2, D=2, P=2, dtype=torch.float64,
                                                   outside=0.2)
    t = torch.randn(loc.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def tangent(v, lc, a):
        return torch.func.jvp(lambda lc: ms_deform_attn(v, shapes, starts, lc, a, backend=backend), (lc,), (t,))[1]

    assert tangent(value, loc, attn).abs().max() > 0
    torch.autograd.gradcheck(tangent, tuple(x.clone().requires_grad_(True) for x in (value, loc, attn)))


@needs_cpu_kernel
def test_nested_forward_mode_is_refused():
    """jvp of jvp would lose the outer tangents inside the inner transform: it raises."""
    value, shapes, starts, loc, attn = msda_inputs([(3, 4)], N=1, Lq=3, M=2, D=2, P=2, dtype=torch.float64)
    t = torch.ones_like(loc)

    def first(lc):
        return torch.func.jvp(lambda lc: ms_deform_attn(value, shapes, starts, lc, attn), (lc,), (t,))[1]

    with pytest.raises(NotImplementedError, match="nested forward-mode AD"):
        torch.func.jvp(first, (loc,), (t,))
    with pytest.raises(NotImplementedError, match="nested forward-mode AD"):
        torch.func.jacfwd(torch.func.jacfwd(lambda v: ms_deform_attn(v, shapes, starts, loc, attn).sum()))(value)


@needs_cpu_kernel
def test_ops_refuse_tangents_they_would_drop():
    """torch.ops.piip.* have no forward-mode formula of their own: a dual input raises."""
    import torch.autograd.forward_ad as fwAD

    value, shapes, starts, loc, attn = msda_inputs([(3, 4)], dtype=torch.float64)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="call the public function"):
        torch.ops.piip.ms_deform_attn(value, shapes, starts, fwAD.make_dual(loc, torch.ones_like(loc)), attn, "cpu")


# --- torch.library registration ---------------------------------------------

@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    value, shapes, starts, loc, attn = msda_inputs([(5, 6), (2, 3)], Lq=4, M=2, D=5, P=2, dtype=dtype)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.piip.ms_deform_attn.default, (value, shapes, starts, loc, attn, "cpu"))


@needs_cpu_kernel
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(compiler):
    inputs = msda_inputs([(6, 5), (3, 2)], Lq=6, M=2, D=4, P=2)

    def f(value, shapes, starts, loc, attn):
        return (ms_deform_attn(value, shapes, starts, loc, attn, backend="cpu") * 2).sin()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    want, grad_out = run_with_grads(f, inputs)
    got, _ = run_with_grads(compiled, inputs, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@needs_cpu_kernel
def test_flop_counter_uses_the_registered_formula():
    from torch.utils.flop_counter import FlopCounterMode

    value, shapes, starts, loc, attn = msda_inputs([(5, 6), (2, 3)], N=2, Lq=4, M=3, D=5, P=2)
    with FlopCounterMode(display=False) as counter:
        ms_deform_attn(value, shapes, starts, loc, attn, backend="cpu")
    # 5 MACs (4 corners + weight) per batch, query, head, level, point and channel; 2 FLOPs per MAC.
    assert counter.get_total_flops() == 2 * 5 * 2 * 4 * 3 * 2 * 2 * 5


# --- input validation and backend choice -------------------------------------

def _bad_inputs():
    ok = msda_inputs([(5, 6), (2, 3)], N=2, Lq=4, M=2, D=3, P=2)
    value, shapes, starts, loc, attn = ok
    yield "value must be", (value[0], shapes, starts, loc, attn)
    yield "value must be", (value.long(), shapes, starts, loc, attn)
    yield "must have N=2 and M=2", (value, shapes, starts, loc[:1], attn[:1])
    yield "must have N=2 and M=1", (value[:, :, :1], shapes, starts, loc, attn)
    yield "attention_weights must be", (value, shapes, starts, loc, attn[..., :1])
    yield "sampling_locations must be", (value, shapes, starts, loc[..., :1], attn)
    yield "spatial_shapes must be", (value, shapes[:1], starts, loc, attn)
    yield "spatial_shapes must be", (value, shapes.float(), starts, loc, attn)
    yield "level_start_index must be", (value, shapes, starts[:1], loc, attn)
    yield "cover 36 rows, but value has S = 35", (value[:, :-1], shapes, starts, loc, attn)
    yield "level_start_index\\[1\\] = 29", (value, shapes, starts - torch.tensor([0, 1]), loc, attn)
    yield "level 1 is empty", (value, torch.tensor([[6, 6], [0, 3]]), torch.tensor([0, 36]), loc, attn)
    yield "at least one level", (value, shapes[:0], starts[:0], loc[:, :, :, :0], attn[:, :, :, :0])
    yield "one device", (value, shapes, starts, loc.to("meta"), attn)
    yield "must be a torch.Tensor", (value, [[5, 6], [2, 3]], starts, loc, attn)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu_kernel)])
@pytest.mark.parametrize("match,args", list(_bad_inputs()), ids=[m for m, _ in _bad_inputs()])
def test_bad_input_raises_clear_error(match, args, backend):
    with pytest.raises(ValueError, match=match):
        ms_deform_attn(*args, backend=backend)


@needs_cpu_kernel
def test_private_kernel_checks_levels_itself():
    value, shapes, starts, loc, attn = msda_inputs([(5, 6), (2, 3)])
    with pytest.raises(RuntimeError, match="level 1 \\(2 x 3\\) does not fit in value's S = 35 rows"):
        torch.ops.piip_C.msda_forward(value[:, :-1], shapes, starts, loc, attn)
    with pytest.raises(RuntimeError, match="spatial_shapes cover 36 rows, but value has S = 37"):
        torch.ops.piip_C.msda_forward(torch.cat([value, value[:, :1]], 1), shapes, starts, loc, attn)


WRAPPING_LEVELS = r"""
import torch
import piip_kernels
# Level 0 has 2**32 x 2**32 = 2**64 rows, 0 in int64: the sum of H * W is 15 = S. The point
# sits on pixel (1, 0) of level 0, 2**32 rows past the end of value.
value = torch.randn(1, 15, 1, 4, dtype=torch.float64)
loc = torch.tensor([0.5 / 2**32, 1.5 / 2**32], dtype=torch.float64).expand(1, 2, 1, 2, 1, 2).contiguous()
attn = torch.ones(1, 2, 1, 2, 1, dtype=torch.float64)
for shapes, starts in (([[2**32, 2**32], [3, 5]], [0, 0]), ([[3, 5], [2**32, 2**32]], [0, 15]),
                       ([[3, 5], [-2**32, 2**32]], [0, 15])):
    args = (value, torch.tensor(shapes), torch.tensor(starts), loc, attn)
    for name, call in (("op", lambda: torch.ops.piip.ms_deform_attn(*args, "cpu")),
                       ("backward", lambda: torch.ops.piip.ms_deform_attn_backward(torch.ones(1, 2, 4, dtype=torch.float64), *args, "cpu")),
                       ("compiled", lambda: torch.compile(lambda *a: piip_kernels.ms_deform_attn(*a, backend="cpu"),
                                                          fullgraph=True, backend="aot_eager")(*args))):
        try:
            call()
            print("ACCEPTED", name, shapes)
        except Exception as e:
            print("REFUSED", name, type(e).__name__, str(e).splitlines()[0])
"""


@needs_cpu_kernel
def test_native_level_check_is_overflow_safe():
    """The native check is what guards memory under torch.compile and torch.ops.piip.* (the
    Python check is skipped there): level sizes whose H * W wraps int64 must be refused, not
    read 2**32 rows past value (the process used to die with SIGSEGV)."""
    res = subprocess.run([sys.executable, "-c", WRAPPING_LEVELS], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"rc {res.returncode}: {res.stderr[-2000:]}"
    lines = res.stdout.splitlines()
    assert len(lines) == 9 and all(line.startswith("REFUSED") and "RuntimeError" in line for line in lines), res.stdout
    assert all("does not fit" in line or "is empty" in line for line in lines), res.stdout


def test_unknown_and_unavailable_backends(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton needs CUDA tensors then
    inputs = msda_inputs([(4, 4)])
    with pytest.raises(ValueError, match="unknown backend argument 'fast'"):
        ms_deform_attn(*inputs, backend="fast")
    # An explicit request never falls back: the error lists the reasons.
    with pytest.raises(RuntimeError, match="(?s)backend .cuda. cannot run on cpu.*needs cuda tensors"):
        ms_deform_attn(*inputs, backend="cuda")
    with pytest.raises(RuntimeError, match="(?s)backend 'triton' cannot run.*Triton needs CUDA tensors"):
        ms_deform_attn(*inputs, backend="triton")


def test_environment_variable_forces_backend(monkeypatch):
    inputs = msda_inputs([(4, 4)])
    monkeypatch.setenv("PIIP_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        ms_deform_attn(*inputs)
    monkeypatch.setenv("PIIP_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown PIIP_KERNELS_BACKEND 'nonsense'"):
        ms_deform_attn(*inputs)
    monkeypatch.setenv("PIIP_KERNELS_BACKEND", "reference")
    torch.testing.assert_close(ms_deform_attn(*inputs), ms_deform_attn_reference(*inputs))


@needs_cpu_kernel
def test_default_backend_on_cpu_is_the_compiled_kernel(monkeypatch):
    monkeypatch.delenv("PIIP_KERNELS_BACKEND", raising=False)
    assert piip_kernels.backends.select("ms_deform_attn", piip_kernels.msda.api.BACKENDS, torch.device("cpu"), torch.float32, None) == "cpu"


def test_backend_report_lists_every_backend(capsys):
    text = piip_kernels.backend_report(devices=["cpu"])
    for name in ("reference", "cpu", "cuda", "triton"):
        assert f" {name} " in text
    assert "ms_deform_attn" in capsys.readouterr().out


def test_import_without_extension_falls_back_to_reference():
    """With the compiled extension hidden, import works, one line says why, and the op runs."""
    code = (
        "import sys; sys.modules['piip_kernels._C'] = None\n"
        "import torch, piip_kernels\n"
        "from piip_kernels.msda.api import BACKENDS\n"
        "print('CPU_REASONS', BACKENDS['cpu'](torch.device('cpu'), torch.float32))\n"
        "v = torch.randn(1, 4, 1, 2); s = torch.tensor([[2, 2]]); i = torch.tensor([0])\n"
        "out = piip_kernels.ms_deform_attn(v, s, i, torch.rand(1, 3, 1, 1, 2, 2), torch.rand(1, 3, 1, 1, 2))\n"
        "print('SHAPE', tuple(out.shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PIIP_KERNELS_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "SHAPE (1, 3, 2)" in res.stdout
    assert "compiled extension piip_kernels._C not available" in res.stdout
    warnings = [line for line in res.stderr.splitlines() if "Falling back to the reference" in line]
    assert len(warnings) == 1, res.stderr


# --- the drop-in module ---------------------------------------------------------

def _module_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes, starts = torch.tensor([[6, 7], [3, 4]]), torch.tensor([0, 42])
    return g, shapes, starts, torch.randn(2, 10, 64, generator=g), torch.randn(2, 54, 48, generator=g)


def test_module_padding_mask_hides_padded_values():
    g, shapes, starts, query, x = _module_inputs()
    m = piip_kernels.MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2, d_feat=48)
    ref = torch.rand(2, 10, 2, 4, generator=g)  # boxes (cx, cy, w, h)
    mask = torch.zeros(2, 54, dtype=torch.bool)
    mask[:, 30:] = True
    x2 = x.clone()
    x2[:, 30:] = 1e3 * torch.randn(2, 24, 48, generator=g)
    with torch.no_grad():
        out = m(query, ref, x, shapes, starts, mask)
        torch.testing.assert_close(m(query, ref, x2, shapes, starts, mask), out)
        assert not torch.allclose(m(query, ref, x2, shapes, starts), out)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_backends_agree_and_train(ref_dim):
    g, shapes, starts, query, x = _module_inputs(1)
    ref = torch.rand(1, 10, 2, ref_dim, generator=g)  # batch 1 broadcasts, as in PIIP
    modules = [piip_kernels.MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2, d_feat=48, backend=b) for b in ("reference", None)]
    modules[1].load_state_dict(modules[0].state_dict())
    outs = [m(query, ref, x, shapes, starts) for m in modules]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    outs[1].square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in modules[1].parameters())


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        piip_kernels.MSDeformAttn(d_model=64, n_heads=6)
    m = piip_kernels.MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2)
    _, shapes, starts, query, _ = _module_inputs()
    with pytest.raises(ValueError, match="reference_points must be"):
        m(query, torch.rand(2, 10, 3, 2), torch.randn(2, 54, 64), shapes, starts)


def test_compat_entry_points_match_the_op():
    value, shapes, starts, loc, attn = msda_inputs([(5, 6), (2, 3)], Lq=4, M=2, D=3, P=2)
    want = ms_deform_attn(value, shapes, starts, loc, attn)
    from piip_kernels import compat

    torch.testing.assert_close(compat.MSDeformAttnFunction.apply(value, shapes, starts, loc, attn, 64), want)
    torch.testing.assert_close(compat.multi_scale_deformable_attn_pytorch(value, shapes, loc, attn), want)
    torch.testing.assert_close(compat.multi_scale_deformable_attn_pytorch(value, [(5, 6), (2, 3)], loc, attn), want)


def test_package_attributes_after_a_plain_import():
    """Code written against the Deformable DETR layout does `import piip_kernels as pk` and
    then `pk.compat...`; a fresh interpreter must find compat and MSDeformAttn as attributes,
    and the import must not pull in torch._dynamo (it stays cheap)."""
    import subprocess
    import sys

    code = ("import sys, piip_kernels as pk; "
            "assert pk.compat.MSDeformAttnFunction.apply and pk.compat.multi_scale_deformable_attn_pytorch; "
            "assert pk.MSDeformAttn is pk.compat.MSDeformAttn; "
            "print('torch._dynamo' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False", "import piip_kernels imported torch._dynamo"
