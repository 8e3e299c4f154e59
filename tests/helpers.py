"""Shared test helpers: random MSDA inputs and tolerances derived from a float64 reference.

The GPU test modules (test_cuda.py, test_triton.py) also run on the ``meta`` device, as the
CPU dry run of bench/gpu_check.sh (``PIIP_GPU_TEST_DEVICE=meta``): there the ops' fake
kernels run, so every tensor's device, shape and dtype meets the same checks it meets on a
GPU (a gradient left on the CPU fails exactly as it does beside CUDA outputs), while values
are not compared, since meta tensors have none. ``host``, ``holds``, ``same`` and
``assert_derived_close`` are the value checks that know this.
"""
from __future__ import annotations

import os

import torch

from piip_kernels.dca.reference import deform_cross_attn_reference
from piip_kernels.merge.reference import branch_merge_reference
from piip_kernels.msda.reference import ms_deform_attn_reference


def level_starts(shapes: list[tuple[int, int]]) -> torch.Tensor:
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total += h * w
    return torch.tensor(starts, dtype=torch.long)


def msda_inputs(shapes, N=2, Lq=7, M=3, D=6, P=2, dtype=torch.float32, loc_dtype=None, outside=0.25, seed=0):
    """Random inputs; about ``outside`` of the locations fall outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    # Spread of [-m, 1+m] puts the wanted fraction outside the unit interval on one axis or the other.
    m = outside / 2
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * (1 + 2 * m) - m
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    loc_dtype = loc_dtype or dtype
    return (
        value.to(dtype),
        torch.tensor(shapes, dtype=torch.long),
        level_starts(shapes),
        loc.to(loc_dtype),
        attn.to(loc_dtype),
    )


def run_with_grads(fn, inputs, grad_out=None, seed=1):
    """Output and gradients w.r.t. value, locations and weights of fn(*inputs)."""
    value, shapes, starts, loc, attn = (t.detach().clone() for t in inputs)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    out = fn(value, shapes, starts, loc, attn)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, (value, loc, attn), grad_out.to(out.device, out.dtype))
    return [out.detach()] + [g.detach() for g in grads], grad_out


def reference64(inputs, grad_out):
    inputs64 = [t.double() if t.is_floating_point() else t for t in inputs]
    return run_with_grads(ms_deform_attn_reference, inputs64, grad_out)[0]


def gpu_test_device() -> torch.device:
    """Where the GPU test modules put their tensors: ``PIIP_GPU_TEST_DEVICE`` (``meta`` for
    the dry run), else cuda."""
    return torch.device(os.environ.get("PIIP_GPU_TEST_DEVICE", "cuda"))


def gpu_tests_can_run(device: torch.device) -> bool:
    return device.type == "meta" or (device.type == "cuda" and torch.cuda.is_available())


def is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


def host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU for comparison with a CPU truth; meta tensors stay as they are."""
    return t if is_meta(t) else t.cpu()


def holds(cond: torch.Tensor) -> bool:
    """``cond.all()`` as a bool. On meta (no values) only its dtype is checked: it must be a
    boolean tensor, as a real comparison gives."""
    if is_meta(cond):
        assert cond.dtype == torch.bool, f"expected a boolean tensor, got {cond.dtype}"
        return True
    return bool(cond.all())


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical values (``torch.equal``); on meta, the same shape, dtype and device."""
    if is_meta(a) or is_meta(b):
        return (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
    return torch.equal(a, b)


def assert_exactly(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` equals the CPU tensor ``want`` bit for bit; on meta, in shape and dtype."""
    if is_meta(got):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), f"{got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
        return
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def assert_close(got: torch.Tensor, want: torch.Tensor, **tol) -> None:
    """torch.testing.assert_close; on meta, the same shape and dtype."""
    if is_meta(got) or is_meta(want):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), f"{got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
        return
    torch.testing.assert_close(got, want, **tol)


def assert_derived_close(name, got, ref_lowp, ref64, factor=2.0, floor=1e-6):
    """``got`` may be at most ``factor`` times as far from the float64 truth as the
    reference evaluated in the same precision, plus a floor relative to the scale.
    On meta (the dry run) the three must agree in shape, and ``got`` and ``ref_lowp`` in dtype."""
    if is_meta(got) or is_meta(ref_lowp):
        assert got.shape == ref_lowp.shape == ref64.shape, f"{name}: shapes {got.shape}, {ref_lowp.shape}, {ref64.shape}"
        assert got.dtype == ref_lowp.dtype, f"{name}: dtype {got.dtype} against the reference's {ref_lowp.dtype}"
        return
    scale = ref64.abs().max().item() + 1e-30
    err = (got.double() - ref64).abs().max().item()
    err_ref = (ref_lowp.double() - ref64).abs().max().item()
    bound = factor * err_ref + floor * scale
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e} (reference in same dtype: {err_ref:.3e}, scale {scale:.3e})"


DATA = {
    "official": "tests/data/official",     # outputs of the official PIIP code (tests/data/README.md)
    "paper": "bench/data/paper",           # the papers' configs, costs and results
}



def assert_msda_close(got, grad_out, inputs, floor):
    """``got`` = (out, grad_value, grad_loc, grad_attn) of a run of ms_deform_attn with
    ``grad_out`` on ``inputs``: each within assert_derived_close's bound of the same-dtype
    reference against float64."""
    ref, _ = run_with_grads(ms_deform_attn_reference, inputs, grad_out)
    truth = reference64(inputs, grad_out)
    for name, g, r, t in zip(["out", "grad_value", "grad_loc", "grad_attn"], got, ref, truth):
        assert_derived_close(name, g, r, t, floor=floor)

def data_path(kind: str, rel: str):
    """Path of a data file carried by the repository (``kind``: "official" or "paper").
    A missing file fails the test: the data is part of the repository, never optional."""
    from pathlib import Path

    import pytest

    path = Path(__file__).resolve().parents[1] / DATA[kind] / rel
    if not path.exists():
        pytest.fail(f"data file {path} is missing (run scripts/sync_data.py and commit the copy)")
    return path


def official_fixture(name: str) -> dict:
    """Loads tests/data/official/<name>."""
    return torch.load(data_path("official", name), weights_only=True)


def paper_configs() -> dict:
    """bench/data/paper/configs.json as {name: config}."""
    import json

    with open(data_path("paper", "configs.json")) as f:
        return {c["name"]: c for c in json.load(f)["configs"]}


def tiny_config(n: int = 3, output: str = "detection", **kw):
    """A tiny n-branch PIIP (widths 64/48/32/16, depth 2, two stages, a window block)."""
    from piip import BranchConfig, PIIPConfig

    dims, sizes, heads = [64, 48, 32, 16][:n], [32, 48, 64, 96][:n], [4, 4, 4, 2][:n]
    if n == 1:
        sizes = [64]
    branches = tuple(
        BranchConfig(name=f"branch{i + 1}", embed_dim=dims[i], depth=2, num_heads=heads[i], image_size=sizes[i],
                     interaction_indexes=((0, 0), (1, 1)) if n > 1 else (),
                     window_sizes=(None, None) if output == "classification" else (2, None),
                     cls_token=output == "classification", pos_embed_grid=(3, 3))
        for i in range(n))
    return PIIPConfig(branches=branches, output=output, deform_num_heads=4, num_classes=5, **kw)


def dca_inputs(N=2, value_hw=(5, 7), query_hw=(3, 4), M=4, D=6, P=4, dtype=torch.float32, off_dtype=None, spread=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Hv, Wv = value_hw
    Lq = query_hw[0] * query_hw[1]
    value = torch.randn(N, Hv * Wv, M, D, generator=g, dtype=torch.float64).to(dtype)
    # Offsets of a few pixels put some points outside the value map.
    offsets = (spread * torch.randn(N, Lq, M, P, 2, generator=g, dtype=torch.float64)).to(off_dtype or dtype)
    logits = (2 * torch.randn(N, Lq, M, P, generator=g, dtype=torch.float64)).to(off_dtype or dtype)
    return value, offsets, logits


def dca_grads(fn, inputs, value_hw, query_hw, grad_out=None):
    value, offsets, logits = (t.detach().clone().requires_grad_(True) for t in inputs)
    out = fn(value, value_hw, offsets, logits, query_hw)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (value, offsets, logits), grad_out.to(out.device, out.dtype))
    return [out.detach(), *grads], grad_out


def merge_inputs(sizes, N=2, C=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(N, C, h, w, generator=g, dtype=torch.float64).to(dtype) for h, w in sizes]
    return feats, torch.randn(len(sizes), generator=g, dtype=torch.float64).float()


def merge_grads(fn, feats, weights, out_size, align_corners=False, grad_out=None):
    fs = [f.detach().clone().requires_grad_(True) for f in feats]
    w = weights.detach().clone().requires_grad_(True)
    out = fn(fs, w, out_size, align_corners)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, fs + [w], grad_out.to(out.device, out.dtype))
    return [out.detach(), *grads], grad_out



def merge_edge_cases(count: int = 10, seed: int = 0) -> list:
    """Random branch-merge shapes [(sizes, out_size, align_corners)] at the edges of the GPU
    backwards' search for the output pixels that read an input pixel: sides of length 1
    (with align_corners=True every output pixel then reads that one input pixel, so the
    search must reach the whole output side), outputs longer than 4 (the search's
    minimum), down- and upsampling up to 9x, non-square maps. The first case is the
    smallest that once gave wrong gradients: 1x1 to 7x7 with align_corners=True."""
    g = torch.Generator().manual_seed(seed)

    def side(hi):
        return int(torch.randint(1, hi + 1, (), generator=g))

    cases = [([(1, 1)], (7, 7), True)]
    while len(cases) < count:
        out = (side(13), side(13))
        branches = side(3)
        sizes = [(1 if torch.rand((), generator=g) < 0.4 else side(9), 1 if torch.rand((), generator=g) < 0.4 else side(9))
                 for _ in range(branches)]
        cases.append((sizes, out, bool(torch.rand((), generator=g) < 0.6)))
    return cases


def check_merge_against_reference(fn, reference, cpu_feats, cpu_weights, out_size, align_corners, device, floor=1e-6):
    """fn's merge and its gradients (maps and weights, on `device`) against the float64
    reference, with the tolerance derived from `reference` run in the same precision."""
    feats, weights = [f.to(device) for f in cpu_feats], cpu_weights.to(device)
    got, grad_out = merge_grads(fn, feats, weights, out_size, align_corners)
    ref, _ = merge_grads(reference, feats, weights, out_size, align_corners, grad_out)
    truth, _ = merge_grads(branch_merge_reference, [f.double() for f in cpu_feats], cpu_weights.double(), out_size,
                           align_corners, grad_out)
    names = ["out"] + [f"grad_f{i}" for i in range(len(feats))] + ["grad_w"]
    for name, g, r, t in zip(names, got, ref, truth):
        assert g.dtype == r.dtype and g.shape == r.shape and g.device == feats[0].device, name
        assert_derived_close(name, host(g), host(r), t, floor=floor)

def deterministic_grad_value(backend: str):
    """(value, shapes, starts, loc, attn, grad_out) -> grad_value of the public op, deterministic."""
    from piip_kernels import ms_deform_attn

    def run(value, shapes, starts, loc, attn, grad_out):
        value = value.detach().requires_grad_(True)
        out = ms_deform_attn(value, shapes, starts, loc, attn, backend=backend, deterministic=True)
        return torch.autograd.grad(out, value, grad_out)[0]
    return run


def check_bit_identical(backend: str, inputs, runs: int = 2) -> list:
    """`runs` deterministic runs of ms_deform_attn on `backend` give the same bits, and
    torch.use_deterministic_algorithms(True) selects that mode; returns the first run."""
    from piip_kernels import ms_deform_attn

    results = [run_with_grads(lambda *a: ms_deform_attn(*a, backend=backend, deterministic=True), inputs)[0]
               for _ in range(runs)]
    torch.use_deterministic_algorithms(True)
    try:
        results.append(run_with_grads(lambda *a: ms_deform_attn(*a, backend=backend), inputs)[0])
    finally:
        torch.use_deterministic_algorithms(False)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert same(a, b)
    return results[0]


def check_fixed_point_extremes(grad_value, device) -> None:
    """A deterministic (fixed-point) grad_value at its extremes; `grad_value(value, shapes,
    starts, loc, attn, grad_out)` runs a backend's backward.

    1. Weights far above 1, every point on one pixel centre: one grad_value entry receives
       the largest sum possible (Lq * P * max|weight| * max|grad_output|). It must come out
       exact, not wrapped around the int64 range.
    2. A non-finite grad_output must make grad_value NaN, never a finite wrong number.
    """
    H, W, Lq, P, D, big = 4, 4, 64, 4, 4, 50.0
    value = torch.randn(1, H * W, 1, D, device=device)
    shapes = torch.tensor([[H, W]], device=device)
    starts = torch.tensor([0], device=device)
    # Pixel (1, 2) centre: all bilinear weight on one corner.
    loc = torch.empty(1, Lq, 1, 1, P, 2, device=device)
    loc[..., 0], loc[..., 1] = (2 + 0.5) / W, (1 + 0.5) / H
    attn = torch.full((1, Lq, 1, 1, P), big, device=device)
    ones = torch.ones(1, Lq, D, device=device)
    want = torch.zeros(1, H * W, 1, D)
    want[0, 1 * W + 2] = big * Lq * P
    assert_exactly(grad_value(value, shapes, starts, loc, attn, ones), want)

    for bad in (float("inf"), float("nan")):
        go = ones.clone()
        go[0, 3, 1] = bad
        gv = grad_value(value, shapes, starts, loc, attn, go)
        assert holds(torch.isnan(gv)), f"grad_output with {bad} gave a finite deterministic grad_value"


def check_levels_outside_value(forward, backward, device) -> None:
    """GPU kernels read index tensors on the device only: a level that does not lie inside
    value (start past the end, or sizes so large that H * W overflows) must give NaN for its
    outputs and gradients, never an out-of-bounds read or a finite wrong number.
    `forward(value, shapes, starts, loc, attn)` and `backward(grad_out, same...)` call the
    backend's kernels directly, below the host-side checks of the public API."""
    value, shapes, starts, loc, attn = [t.to(device) for t in msda_inputs([(5, 7), (3, 4)], N=2, Lq=6, M=2, D=8, P=3)]
    for bad_shapes, bad_starts in (([[5, 7], [3, 4]], [0, 40]), ([[5, 7], [2 ** 40, 2 ** 40]], [0, 35]),
                                   ([[5, 7], [-3, 4]], [0, 35])):
        shp = torch.tensor(bad_shapes, device=device)
        st = torch.tensor(bad_starts, device=device)
        out = forward(value, shp, st, loc, attn)
        assert holds(torch.isnan(out)), "a level outside value must poison the output"
        gv, gl, ga = backward(torch.ones_like(out), value, shp, st, loc, attn)
        assert holds(torch.isnan(gl[:, :, :, 1])) and holds(torch.isnan(ga[:, :, :, 1]))
        assert holds(torch.isfinite(gl[:, :, :, 0])) and holds(torch.isfinite(ga[:, :, :, 0]))
        assert holds(torch.isfinite(gv))


def run_two_gloo_ranks(worker, tmp_path, *args, timeout_s: float = 240, what: str = "workers"):
    """Spawns worker(rank, 2, init_file, result_file, *args) twice and returns what rank 0
    saved to result_file; fails the test if the ranks do not finish within timeout_s."""
    import time

    import pytest
    import torch.multiprocessing as mp

    init, result = str(tmp_path / "init"), str(tmp_path / "result.pt")
    ctx = mp.spawn(worker, args=(2, init, result, *args), nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.terminate()
            pytest.fail(f"the two {what} did not finish within {timeout_s:.0f} s")
    return torch.load(result)


# --- non-finite numbers ----------------------------------------------------------------

def assert_nonfinite_like(name, got, want, superset=False, rtol=1e-4, atol=1e-5):
    """``got`` is non-finite (NaN or inf) exactly where the float64 truth ``want`` is (with
    ``superset``, at least there) and close to it elsewhere. On meta: shapes only."""
    if is_meta(got):
        assert got.shape == want.shape, f"{name}: shape {got.shape} against {want.shape}"
        return
    g = got.detach().cpu().double()
    bad_g, bad_w = ~torch.isfinite(g), ~torch.isfinite(want)
    missing = (bad_w & ~bad_g).nonzero().tolist()
    extra = [] if superset else (bad_g & ~bad_w).nonzero().tolist()
    assert not missing and not extra, f"{name}: finite where the reference is not at {missing[:8]}, " \
                                      f"non-finite where it is finite at {extra[:8]}"
    both = ~bad_g & ~bad_w
    torch.testing.assert_close(g[both], want[both], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def msda_nonfinite_cases() -> dict:
    """{name: (value, shapes, starts, loc, attn, grad_out)} with one non-finite number each,
    all in head 1 of query 2, point 1 of level 0 (a 4 x 5 map): NaN and infinite
    coordinates, non-finite attention weights of points outside and inside the map, a NaN
    value that this point reads, a NaN in grad_output."""
    # D = 6 as in other GPU tests: Triton compiles one kernel per head dim.
    base = msda_inputs([(4, 5), (3, 3)], N=1, Lq=5, M=2, D=6, P=2, dtype=torch.float64, outside=0.3, seed=5)
    grad_out = torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    pt = (0, 2, 1, 0, 1)
    nan, inf = float("nan"), float("inf")
    edits = {  # name: (the point's location or None, (tensor, index, number))
        "nan_x": (None, ("loc", pt + (0,), nan)),
        "inf_y": (None, ("loc", pt + (1,), inf)),
        "-inf_x": (None, ("loc", pt + (0,), -inf)),
        "nan_weight_outside": ((1.6, 0.5), ("attn", pt, nan)),
        "inf_weight_outside": ((0.3, -0.7), ("attn", pt, inf)),
        "nan_weight_inside": ((0.45, 0.55), ("attn", pt, nan)),
        "nan_value": ((0.55, 0.4), ("value", (0, 7, 1, 2), nan)),  # row 7 is pixel (1, 2), which the point reads
        "nan_grad_output": (None, ("grad_out", (0, 2, 7), nan)),  # head 1, channel 1
    }
    return _one_change_each(dict(zip(("value", "shapes", "starts", "loc", "attn"), base), grad_out=grad_out), edits,
                            "loc", pt)


def _one_change_each(tensors: dict, edits: dict, moved: str, pt) -> dict:
    """{name: copies of the tensors' values} with, per edit (where tensors[moved][pt] goes or
    None, (tensor name, index, number)), that point moved and that one number set."""
    cases = {}
    for name, (xy, (which, index, number)) in edits.items():
        t = {k: v.clone() for k, v in tensors.items()}
        if xy is not None:
            t[moved][pt] = torch.tensor(xy, dtype=torch.float64)
        t[which][index] = number
        cases[name] = tuple(t.values())
    return cases


def check_msda_nonfinite(fn, case, device, dtype=torch.float32, superset=()):
    """fn (ms_deform_attn on a backend) on `device` in `dtype`: output and gradients
    non-finite where the float64 reference's are (names in `superset`: at least there)."""
    value, shapes, starts, loc, attn, grad_out = case
    inputs = [value.to(dtype), shapes, starts, loc.to(dtype), attn.to(dtype)]
    got, _ = run_with_grads(fn, [t.to(device) for t in inputs], grad_out)
    want = reference64([value, shapes, starts, loc, attn], grad_out)
    for name, g, w in zip(["out", "grad_value", "grad_loc", "grad_attn"], got, want):
        assert_nonfinite_like(name, g, w, superset=name in superset)


def dca_nonfinite_cases() -> dict:
    """{name: (value, offsets, logits, grad_out)} for deform_cross_attn on a 4 x 5 map read
    by a 2 x 3 query grid, one non-finite number each in head 1 of query 2 (point 1): NaN
    and infinite offsets, NaN and +inf logits (the head's softmax is NaN), all logits of the
    head -inf (NaN too), one -inf logit (a zero weight: finite), a NaN value the point
    reads, a NaN in grad_output."""
    value, offsets, logits = dca_inputs(N=1, value_hw=(4, 5), query_hw=(2, 3), M=2, D=12, P=2, dtype=torch.float64,
                                        spread=1.5, seed=5)
    grad_out = torch.randn(1, 6, 24, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    pt = (0, 2, 1, 1)
    nan, inf = float("nan"), float("inf")
    edits = {  # name: (the point's offset or None, (tensor, index, number))
        "nan_offset_x": (None, ("offsets", pt + (0,), nan)),
        "inf_offset_y": (None, ("offsets", pt + (1,), inf)),
        "nan_logit": (None, ("logits", pt, nan)),
        "inf_logit": (None, ("logits", pt, inf)),
        "all_logits_-inf": (None, ("logits", pt[:3], -inf)),
        "one_logit_-inf": (None, ("logits", pt, -inf)),
        # query 2's reference point is pixel (0.5, 3.67) of the map: it reads row 3 = pixel (0, 3)
        "nan_value": ((0.0, 0.0), ("value", (0, 3, 1, 2), nan)),
        "nan_grad_output": (None, ("grad_out", (0, 2, 16), nan)),  # head 1, channel 4
    }
    return _one_change_each(dict(value=value, offsets=offsets, logits=logits, grad_out=grad_out), edits, "offsets", pt)


def check_dca_nonfinite(fn, case, device, dtype=torch.float32, superset=()):
    """As check_msda_nonfinite, for deform_cross_attn (fn takes its public arguments)."""
    value, offsets, logits, grad_out = case
    inputs = [t.to(device, dtype) for t in (value, offsets, logits)]
    got, _ = dca_grads(fn, inputs, (4, 5), (2, 3), grad_out)
    want, _ = dca_grads(deform_cross_attn_reference, [value, offsets, logits], (4, 5), (2, 3), grad_out)
    for name, g, w in zip(["out", "grad_value", "grad_offsets", "grad_logits"], got, want):
        assert_nonfinite_like(name, g, w, superset=name in superset)


def merge_nonfinite_cases() -> dict:
    """{name: (features, weights, grad_out)} for branch_merge of 3 x 3, 2 x 4 and 5 x 5 maps
    to 5 x 5, one non-finite number each: in a map, a weight, grad_output. With
    align_corners=True the 3 x 3 map is read at exact input pixels, where the second tap
    has weight 0 and carries a NaN all the same (0 * NaN), as the reference does; the 5 x 5
    map is not resampled at all (the reference adds it as it is), so its NaN stays put."""
    feats, weights = merge_inputs([(3, 3), (2, 4), (5, 5)], N=1, C=2, dtype=torch.float64)
    weights = weights.double()
    grad_out = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    nan, inf = float("nan"), float("inf")
    edits = {"nan_map": (0, (0, 1, 1, 2), nan), "inf_map": (1, (0, 0, 1, 3), inf), "nan_weight": ("w", 1, nan),
             "nan_in_the_map_of_output_size": (2, (0, 1, 2, 2), nan), "nan_grad_output": ("g", (0, 1, 2, 2), nan)}
    cases = {}
    for name, (which, index, number) in edits.items():
        fs, w, g = [f.clone() for f in feats], weights.clone(), grad_out.clone()
        target = w if which == "w" else g if which == "g" else fs[which]
        target[index] = number
        cases[name] = (fs, w, g)
    return cases


def check_merge_nonfinite(fn, case, align_corners, device, dtype=torch.float32, superset=()):
    """As check_msda_nonfinite, for branch_merge (fn(features, weights, out_size, align_corners))."""
    feats, weights, grad_out = case
    got, _ = merge_grads(fn, [f.to(device, dtype) for f in feats], weights.to(device, torch.float32), (5, 5),
                         align_corners, grad_out)
    want, _ = merge_grads(branch_merge_reference, feats, weights, (5, 5), align_corners, grad_out)
    names = ["out", "grad_f0", "grad_f1", "grad_f2", "grad_w"]
    for name, g, w in zip(names, got, want):
        assert_nonfinite_like(name, g, w, superset=name in superset)


# --- forward-mode AD -------------------------------------------------------------------

def check_forward_ad(fn, primals, tangents, eps=1e-6):
    """fn's forward-mode derivative along ``tangents`` (None: that input has none) in float64:
    torch.func.jvp and dual tensors (torch.autograd.forward_ad) agree, equal the central
    difference of fn, and are the transpose of its reverse-mode derivative:
    <u, J t> = <J^T u, t> for a random u. Returns the tangent."""
    import torch.autograd.forward_ad as fwAD

    filled = [torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents)]
    _, jvp = torch.func.jvp(fn, tuple(primals), tuple(filled))
    with fwAD.dual_level():
        out = fn(*[p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        dual = fwAD.unpack_dual(out).tangent
    assert dual is not None, "the output of dual inputs carries no tangent"
    torch.testing.assert_close(dual, jvp, rtol=1e-12, atol=1e-12)
    assert jvp.abs().max() > 0
    fd = (fn(*[p + eps * t for p, t in zip(primals, filled)]) - fn(*[p - eps * t for p, t in zip(primals, filled)])) / (2 * eps)
    torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-7 * fd.abs().max().item())
    leaves = [p.detach().clone().requires_grad_(True) for p in primals]
    out = fn(*leaves)
    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, u)
    forward = (u * jvp).sum()
    torch.testing.assert_close(forward, sum((g * t).sum() for g, t in zip(grads, filled)), rtol=1e-10,
                               atol=1e-12 * (u.abs() * jvp.abs()).sum().item())
    return jvp


def check_gpu_tangents(fn, reference, primals, device, rtol=1e-4):
    """fn's forward-mode tangent (all inputs moved along random tangents) on `device`, in
    fp32, against `reference`'s in float64 on the CPU (the tangent formulas are checked there
    by check_forward_ad)."""
    g = torch.Generator().manual_seed(3)
    tangents = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in primals]
    _, want = torch.func.jvp(reference, tuple(primals), tuple(tangents))
    _, got = torch.func.jvp(fn, tuple(p.to(device, torch.float32) for p in primals),
                            tuple(t.to(device, torch.float32) for t in tangents))
    assert got.device.type == device.type and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=rtol * want.abs().max().item())
