"""``use_in_ultralytics`` and ``use_in_rfdetr`` against the real packages.

They need a torchvision that loads, which the CPU build of torch here does not give: CI runs
this file in a second environment (scripts/test_integrations.sh: the registry's torch,
torchvision, ultralytics and rfdetr), where PIIP_REQUIRE_INTEGRATIONS=1 turns a missing
package into a failure instead of a skip.

On the packages' own modules and whole models, in float64 with sampling offsets off pixel
centres: outputs and every gradient equal the package's own path; our op runs and the
package's sampler does not; the handle restores the original exactly, in any order of
removal; export and tracing keep the package's code; under autocast, ours is at most twice as
far from the float64 truth as the package's path; the attention compiles with ours.
"""
import copy
import importlib
import os

import pytest
import torch
from torch import nn

import piip_kernels
from piip_kernels import _swap

from helpers import assert_derived_close
from integration_helpers import OUR_OP, assert_equal_steps, assert_runs, move_offsets_off_centres, step
from integration_helpers import one_thread  # noqa: F401  (an autouse fixture: small models run on one thread)

# The main suite deselects these (scripts/test.sh: -m "not packages"); the second environment runs them.
pytestmark = pytest.mark.packages


def need(name):
    if os.environ.get("PIIP_REQUIRE_INTEGRATIONS") == "1":
        return importlib.import_module(name)  # the second CI environment: missing is a failure
    return pytest.importorskip(name, reason=f"{name} is not installed here (CI tests it in its second environment)")


# Each package: its attention module, the name its forward calls, the op its own path runs,
# and a builder of its module's inputs.
SHAPES = [(6, 7), (3, 4), (2, 2), (1, 1)]


def level_starts(shapes):
    spatial = torch.tensor(shapes)
    return spatial, torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])


def ultralytics_case():
    transformer = need("ultralytics.nn.modules.transformer")
    torch.manual_seed(0)
    module = transformer.MSDeformAttn(d_model=16, n_levels=len(SHAPES), n_heads=2, n_points=3).double()
    g = torch.Generator().manual_seed(4)
    S = sum(h * w for h, w in SHAPES)
    boxes = torch.cat([torch.rand(2, 5, 1, 2, generator=g) * 0.8 + 0.1, torch.rand(2, 5, 1, 2, generator=g) * 0.5 + 0.2], -1)
    inputs = [torch.randn(2, 5, 16, generator=g, dtype=torch.float64), boxes.double(),
              torch.randn(2, S, 16, generator=g, dtype=torch.float64)]
    return module, lambda m: (lambda q, r, v: m(q, r, v, SHAPES)), inputs, "aten::grid_sampler_2d"


def rfdetr_case():
    ops = need("rfdetr.models.ops.modules.ms_deform_attn")
    torch.manual_seed(0)
    module = ops.MSDeformAttn(d_model=16, n_levels=len(SHAPES), n_heads=2, n_points=3).double()
    g = torch.Generator().manual_seed(4)
    spatial, starts = level_starts(SHAPES)
    S = int(spatial.prod(1).sum())
    ref = torch.rand(2, 5, len(SHAPES), 2, generator=g, dtype=torch.float64) * 0.8 + 0.1
    inputs = [torch.randn(2, 5, 16, generator=g, dtype=torch.float64), ref, torch.randn(2, S, 16, generator=g, dtype=torch.float64)]
    # RF-DETR's sampler is grid_sample on CPU and CUDA (its gathers are for MPS and XLA).
    return module, lambda m: (lambda q, r, v: m(q, r, v, spatial, starts, None, SHAPES)), inputs, "aten::grid_sampler_2d"


CASES = {"ultralytics": (ultralytics_case, piip_kernels.use_in_ultralytics),
         "rfdetr": (rfdetr_case, piip_kernels.use_in_rfdetr)}


@pytest.mark.parametrize("route", ["every model", "this model"])
@pytest.mark.parametrize("package", CASES)
def test_module_equals_the_package(package, route):
    build, use_in = CASES[package]
    module, call, inputs, theirs_op = build()
    move_offsets_off_centres(module)
    other = copy.deepcopy(module)
    want = step(call(module), module, inputs)
    assert_runs(want, ours=False, what=package, theirs_op=theirs_op)
    with use_in(None if route == "every model" else module) as handle:
        assert sum(handle.swapped.values()) > 0, handle
        got = step(call(module), module, inputs)
        # Per model, another model of the same class keeps the package's code.
        assert_runs(step(call(other), other, inputs), ours=route == "every model", what=f"{package}: another model",
                    theirs_op=theirs_op)
    assert_runs(got, ours=True, what=f"{package}, {route}", theirs_op=theirs_op)
    assert_equal_steps(got, want, f"{package}, {route}")
    assert "forward" not in module.__dict__
    assert_runs(step(call(module), module, inputs), ours=False, what=f"{package} after remove()", theirs_op=theirs_op)


@pytest.mark.parametrize("order", ["first taken first", "last taken first"])
@pytest.mark.parametrize("package", CASES)
def test_handles_removed_in_either_order(package, order):
    """Two handles of each route (every model, this model), removed in either order: ours
    until the last one, then the package's own function and forward exactly."""
    build, use_in = CASES[package]
    module, call, inputs, theirs_op = build()
    library = importlib.import_module(type(module).__module__)
    name = next(n for n in ("multi_scale_deformable_attn_pytorch", "ms_deform_attn_core_pytorch") if n in vars(library))
    theirs = vars(library)[name]
    handles = []
    try:
        for target in (None, None, module, module):
            handles.append(use_in(target))
        assert handles[1].already == sum(handles[1].swapped.values()) and handles[3].already == 1
        for h in (handles if order == "first taken first" else handles[::-1])[:-1]:
            h.remove()
            assert_runs(step(call(module), module, inputs), ours=True, what=f"{package}: a handle left", theirs_op=theirs_op)
        (handles[-1] if order == "first taken first" else handles[0]).remove()
        assert vars(library)[name] is theirs and "forward" not in module.__dict__
        assert _swap.held(vars(library), name, item=True) is None
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("package", CASES)
def test_export_and_tracing_keep_the_package_code(package):
    build, use_in = CASES[package]
    module, call, inputs, theirs_op = build()
    inputs = tuple(t.detach() for t in inputs)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = module

        def forward(self, *x):
            return call(self.m)(*x)

    wrapped = Wrapped()
    with use_in(module):
        graph = str(torch.jit.trace(wrapped, inputs, check_trace=False).inlined_graph)
        assert "piip" not in graph, "jit.trace recorded our op"
        targets = {str(n.target) for n in torch.export.export(wrapped, inputs).graph.nodes}
        assert not any("piip" in t for t in targets), targets
        assert_runs(step(wrapped, wrapped, inputs), ours=True, what=f"{package}: eager after the exports", theirs_op=theirs_op)


def test_rfdetr_export_mode_keeps_its_code():
    module, call, inputs, theirs_op = rfdetr_case()
    module.export()  # RF-DETR's export mode: rank-5 locations
    with piip_kernels.use_in_rfdetr(module):
        result = step(call(module), module, inputs)
    assert result["ops"].get(OUR_OP, 0) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("package", CASES)
def test_autocast_against_float64(package, dtype):
    build, use_in = CASES[package]
    module, call, inputs, _ = build()
    move_offsets_off_centres(module)
    truth = call(module)(*inputs).detach()
    module32, inputs32 = module.float(), [t.float() for t in inputs]
    with torch.autocast("cpu", dtype=dtype):
        theirs = call(module32)(*inputs32).detach()
        with use_in(module32):
            ours = call(module32)(*inputs32).detach()
    assert_derived_close(f"{package} autocast {dtype}", ours.float(), theirs.float(), truth, floor=1e-4)


@pytest.mark.parametrize("route", ["every model", "this model"])
@pytest.mark.parametrize("package", CASES)
def test_attention_compiles_with_ours(package, route):
    from torch._dynamo.testing import CompileCounterWithBackend

    build, use_in = CASES[package]
    torch._dynamo.reset()
    module, call, inputs, _ = build()
    move_offsets_off_centres(module)
    want = step(call(module), module, inputs, count=False)
    with use_in(None if route == "every model" else module):
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(module, backend=counter, fullgraph=True, dynamic=False)
        got = step(call(compiled), module, inputs, count=False)
    assert_equal_steps(got, want, f"{package} compiled, {route}")
    assert any("piip.ms_deform_attn" in str(n.target) for g in counter.graphs for n in g.graph.nodes)


def test_older_ultralytics_layout():
    """Older Ultralytics releases pass unfolded [N, Lq, M, L, P, 2] locations; shapes as a
    tensor work as well as a list."""
    utils = need("ultralytics.nn.modules.utils")
    from piip_kernels.integrations.ultralytics import multi_scale_deformable_attn

    g = torch.Generator().manual_seed(7)
    spatial, _ = level_starts(SHAPES)
    value = torch.randn(2, int(spatial.prod(1).sum()), 2, 4, generator=g, dtype=torch.float64)
    loc = torch.rand(2, 5, 2, len(SHAPES), 3, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    weights = torch.rand(2, 5, 2, len(SHAPES), 3, generator=g, dtype=torch.float64)
    want = utils.multi_scale_deformable_attn_pytorch(value, SHAPES, loc.flatten(3, 4), weights.flatten(3))
    ours = multi_scale_deformable_attn
    for shapes in (SHAPES, spatial):
        torch.testing.assert_close(ours(value, shapes, loc, weights, theirs=None), want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours(value, shapes, loc.flatten(3, 4), weights.flatten(3), theirs=None), want,
                                   rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Whole models

def rtdetr_l(side=64):
    tasks = need("ultralytics.nn.tasks")
    torch.manual_seed(0)
    model = tasks.RTDETRDetectionModel("rtdetr-l.yaml", verbose=False).double()
    move_offsets_off_centres(model)
    return model, [torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(2), dtype=torch.float64)]


def model_loss(model):
    def run(x):
        out = model(x)
        tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        return torch.cat([t.flatten() for t in tensors])
    return run


@pytest.mark.parametrize("route", ["every model", "this model"])
def test_rtdetr_l_training_step_equals_ultralytics(route):
    """RT-DETR-l from rtdetr-l.yaml (offline), in train mode: every output and every parameter
    gradient equal Ultralytics' own path."""
    model, inputs = rtdetr_l()
    ours = copy.deepcopy(model)  # before any step: train mode moves BatchNorm's statistics
    want = step(model_loss(model.train()), model, inputs)
    assert_runs(want, ours=False, what="RT-DETR-l")
    with piip_kernels.use_in_ultralytics(None if route == "every model" else ours) as handle:
        assert sum(handle.swapped.values()) == (1 if route == "every model" else 6) + (route == "every model"), handle
        got = step(model_loss(ours.train()), ours, inputs)
    assert_runs(got, ours=True, what=f"RT-DETR-l, {route}")
    assert_equal_steps(got, want, f"RT-DETR-l, {route}")


def test_rtdetr_wrapper_object_is_accepted():
    ultralytics = need("ultralytics")
    wrapper = ultralytics.RTDETR("rtdetr-l.yaml")
    with piip_kernels.use_in_ultralytics(wrapper) as handle:
        assert handle.swapped == {"layer": 6}, handle
    with pytest.raises(TypeError, match="an Ultralytics model"):
        piip_kernels.use_in_ultralytics("rtdetr-l.yaml")


def rfdetr_decoder(d_model=32, heads=4, queries=12, group_detr=2, side=9):
    """RF-DETR's transformer (no backbone: that needs downloaded weights), a small one."""
    transformer = need("rfdetr.models.transformer")
    torch.manual_seed(0)
    model = transformer.Transformer(d_model=d_model, sa_nhead=heads, ca_nhead=heads, num_queries=queries, num_decoder_layers=2,
                                    dim_feedforward=2 * d_model, return_intermediate_dec=True, group_detr=group_detr,
                                    two_stage=False, num_feature_levels=2, dec_n_points=2, lite_refpoint_refine=True,
                                    bbox_reparam=True).double()
    move_offsets_off_centres(model)
    g = torch.Generator().manual_seed(3)
    srcs = [torch.randn(1, d_model, side, side, generator=g, dtype=torch.float64),
            torch.randn(1, d_model, (side + 1) // 2, (side + 1) // 2, generator=g, dtype=torch.float64)]
    pos = [torch.randn(s.shape, generator=g, dtype=torch.float64) for s in srcs]
    n = queries * group_detr
    refs = torch.randn(n, 4, generator=g, dtype=torch.float64) * 0.5
    feats = torch.randn(n, d_model, generator=g, dtype=torch.float64)
    return model, [*srcs, *pos, refs, feats]


def rfdetr_loss(model):
    def run(s0, s1, p0, p1, refs, feats):
        masks = [torch.zeros(s.shape[0], *s.shape[2:], dtype=torch.bool) for s in (s0, s1)]  # no padding
        out = model([s0, s1], masks, [p0, p1], refs, feats)
        return torch.cat([t.flatten() for t in out if isinstance(t, torch.Tensor)])
    return run


@pytest.mark.parametrize("route", ["every model", "this model"])
def test_rfdetr_decoder_training_step_equals_rfdetr(route):
    model, inputs = rfdetr_decoder()
    want = step(rfdetr_loss(model.train()), model, inputs, count=True)
    assert_runs(want, ours=False, what="RF-DETR decoder", theirs_op="aten::grid_sampler_2d")
    with piip_kernels.use_in_rfdetr(None if route == "every model" else model):
        got = step(rfdetr_loss(model), model, inputs)
    assert_runs(got, ours=True, what=f"RF-DETR decoder, {route}", theirs_op="aten::grid_sampler_2d")
    assert_equal_steps(got, want, f"RF-DETR decoder, {route}")


def test_rfdetr_core_layouts():
    """RF-DETR's core with its shapes as a tensor only (no ``value_spatial_shapes_hw``) and
    with the list too: RF-DETR's numbers either way."""
    functions = need("rfdetr.models.ops.functions.ms_deform_attn_func")
    from piip_kernels.integrations.rfdetr import ms_deform_attn_core

    g = torch.Generator().manual_seed(8)
    spatial, _ = level_starts(SHAPES)
    value = torch.randn(2, 2, 4, int(spatial.prod(1).sum()), generator=g, dtype=torch.float64)  # [N, M, D, S]
    loc = torch.rand(2, 5, 2, len(SHAPES), 3, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    weights = torch.rand(2, 5, 2, len(SHAPES) * 3, generator=g, dtype=torch.float64)
    want = functions.ms_deform_attn_core_pytorch(value, spatial, loc, weights)
    for hw in (None, SHAPES):
        got = ms_deform_attn_core(value, spatial, loc, weights, value_spatial_shapes_hw=hw, theirs=None)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
