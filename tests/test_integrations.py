"""``use_in_rtdetrv2``: the authors' RT-DETRv2 / D-FINE / DEIM code.

Their code is not on PyPI, so the tests reproduce their published interface: the core's
signature and tensor layouts, and how their attention module binds and calls it, in our own
code. In float64 with sampling offsets off pixel centres, outputs and
every gradient must equal their path, our op must run and grid_sample must not, and removing
the handles (in any order) must put their code back exactly.
"""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import piip_kernels

from helpers import assert_derived_close
from integration_helpers import OUR_OP, assert_equal_steps, assert_runs, move_offsets_off_centres, step
from integration_helpers import one_thread  # noqa: F401  (an autouse fixture: small models run on one thread)

SHAPES = [(6, 7), (3, 4), (1, 1)]  # odd sizes and a 1x1 level


# ---------------------------------------------------------------------------------------------
# RT-DETRv2 / D-FINE / DEIM: their core's published signature, and their attention module's use of it

def their_core_v2(value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list, method="default"):
    """The signature of ``deformable_attention_core_func_v2`` in RT-DETRv2, D-FINE and DEIM.

    value: [N, S, M, D] (RT-DETRv2) or per-level [N, M, D, H_l*W_l] (D-FINE, DEIM);
    sampling_locations: [N, Lq, M, sum(P_l), 2]; attention_weights: [N, Lq, M, sum(P_l)];
    "default": bilinear (grid_sample); "discrete": the pixel at floor(x * W + 0.5),
    floor(y * H + 0.5), clamped. Returns [N, Lq, M*D]."""
    shapes = [(int(h), int(w)) for h, w in value_spatial_shapes]
    if isinstance(value, torch.Tensor):
        levels = [v.permute(0, 2, 3, 1) for v in value.split([h * w for h, w in shapes], dim=1)]
    else:
        levels = list(value)
    N, M, D, _ = levels[0].shape
    Lq = sampling_locations.shape[1]
    out = 0
    for (h, w), v, loc, weights in zip(shapes, levels, sampling_locations.split(num_points_list, dim=3),
                                      attention_weights.split(num_points_list, dim=3)):
        v = v.reshape(N * M, D, h, w)
        grid = loc.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [N*M, Lq, P_l, 2]
        if method == "default":
            sampled = F.grid_sample(v, 2 * grid - 1, mode="bilinear", padding_mode="zeros", align_corners=False)
        else:
            x = (grid[..., 0] * w + 0.5).long().clamp(0, w - 1)
            y = (grid[..., 1] * h + 0.5).long().clamp(0, h - 1)
            index = (y * w + x).flatten(1)[:, None].expand(-1, D, -1)  # [N*M, D, Lq*P_l]
            sampled = v.flatten(2).gather(2, index).view(N * M, D, Lq, -1)
        out = out + (sampled * weights.permute(0, 2, 1, 3).flatten(0, 1)[:, None]).sum(-1)  # [N*M, D, Lq]
    return out.view(N, M * D, Lq).transpose(1, 2)


class TheirAttention(nn.Module):
    """Their ``MSDeformableAttention``, the parts that reach the core: it binds the core with
    its method in ``__init__`` and calls it with ``self.num_points_list``; D-FINE and DEIM pass
    the value as per-level views."""

    def __init__(self, dim=8, heads=2, points=(2, 3, 1), method="default", value_as_levels=False):
        super().__init__()
        self.heads, self.num_points_list, self.value_as_levels = heads, list(points), value_as_levels
        total = heads * sum(points)
        self.sampling_offsets = nn.Linear(dim, total * 2)
        self.attention_weights = nn.Linear(dim, total)
        self.value_proj = nn.Linear(dim, dim)
        self.register_buffer("num_points_scale", torch.tensor([1 / n for n in points for _ in range(n)]))
        self.ms_deformable_attn_core = functools.partial(their_core_v2, method=method)

    def forward(self, query, reference_points, value, value_spatial_shapes):
        N, Lq, _ = query.shape
        P = sum(self.num_points_list)
        offsets = self.sampling_offsets(query).view(N, Lq, self.heads, P, 2)
        weights = self.attention_weights(query).view(N, Lq, self.heads, P).softmax(-1)
        scale = self.num_points_scale.to(query.dtype)[:, None]
        loc = reference_points[:, :, None, :, :2] + offsets * scale * reference_points[:, :, None, :, 2:] * 0.5
        v = self.value_proj(value).view(N, value.shape[1], self.heads, -1)
        if self.value_as_levels:
            v = v.permute(0, 2, 3, 1).split([int(h) * int(w) for h, w in value_spatial_shapes], dim=-1)
        return self.ms_deformable_attn_core(v, value_spatial_shapes, loc, weights, self.num_points_list)


class TheirDecoder(nn.Module):
    def __init__(self, layers=2, **kw):
        super().__init__()
        self.layers = nn.ModuleList(TheirAttention(**kw) for _ in range(layers))

    def forward(self, query, reference_points, value, shapes):
        for layer in self.layers:
            query = query + layer(query, reference_points, value, shapes)
        return query


def decoder_inputs(shapes=SHAPES, N=2, Lq=5, dim=8, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    boxes = torch.cat([torch.rand(N, Lq, 1, 2, generator=g) * 0.8 + 0.1, torch.rand(N, Lq, 1, 2, generator=g) * 0.5 + 0.2], -1)
    return [torch.randn(N, Lq, dim, generator=g, dtype=dtype), boxes.to(dtype), torch.randn(N, S, dim, generator=g, dtype=dtype)]


def their_decoder(seed=0, **kw):
    torch.manual_seed(seed)
    model = TheirDecoder(**kw).double()
    move_offsets_off_centres(model)
    return model


@pytest.mark.parametrize("shapes_as", ["list", "tensor"])
@pytest.mark.parametrize("points", [(2, 2, 2), (2, 3, 1)])
@pytest.mark.parametrize("variant", ["rt-detrv2 (value [N, S, M, D])", "d-fine (per-level views)"])
def test_rtdetrv2_family_equals_theirs(variant, points, shapes_as):
    model = their_decoder(points=points, value_as_levels=variant.startswith("d-fine"))
    shapes = SHAPES if shapes_as == "list" else torch.tensor(SHAPES)
    inputs = decoder_inputs()
    want = step(lambda *x: model(*x, shapes), model, inputs)
    assert_runs(want, ours=False, what="theirs")
    originals = [layer.ms_deformable_attn_core for layer in model.layers]
    with piip_kernels.use_in_rtdetrv2(model) as handle:
        assert handle.swapped == {"bound core": 2}, handle
        got = step(lambda *x: model(*x, shapes), model, inputs)
    assert_runs(got, ours=True, what=variant)
    assert_equal_steps(got, want, variant)
    assert all(layer.ms_deformable_attn_core is o for layer, o in zip(model.layers, originals)), "not put back exactly"
    assert_runs(step(lambda *x: model(*x, shapes), model, inputs), ours=False, what="after remove()")


def test_rtdetrv2_discrete_stays_theirs():
    model = their_decoder(method="discrete")
    inputs = decoder_inputs()
    want = step(lambda *x: model(*x, SHAPES), model, inputs)
    with piip_kernels.use_in_rtdetrv2(model):
        got = step(lambda *x: model(*x, SHAPES), model, inputs)
    assert got["ops"].get(OUR_OP, 0) == 0
    assert_equal_steps(got, want, "discrete")


@pytest.mark.parametrize("first_out", [0, 1])
def test_rtdetrv2_two_handles_in_either_order(first_out):
    model = their_decoder()
    inputs = decoder_inputs()
    original = model.layers[0].ms_deformable_attn_core
    handles = []
    try:
        handles.append(piip_kernels.use_in_rtdetrv2(model))
        handles.append(piip_kernels.use_in_rtdetrv2(model))
        assert handles[1].swapped == handles[0].swapped and handles[1].already == 2
        handles[first_out].remove()
        assert_runs(step(lambda *x: model(*x, SHAPES), model, inputs), ours=True, what="one handle left")
        handles[1 - first_out].remove()
        assert model.layers[0].ms_deformable_attn_core is original
    finally:
        for h in handles:
            h.remove()


class ExportWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, q, r, v):
        return self.model(q, r, v, SHAPES)


def test_rtdetrv2_export_and_tracing_keep_their_code():
    model = ExportWrapper(their_decoder(layers=1))
    inputs = tuple(t.detach() for t in decoder_inputs())
    with piip_kernels.use_in_rtdetrv2(model):
        graph = str(torch.jit.trace(model, inputs, check_trace=False).inlined_graph)
        assert "grid_sampler" in graph and "piip" not in graph, "jit.trace recorded our op"
        targets = {str(n.target) for n in torch.export.export(model, inputs).graph.nodes}
        assert any("grid_sampler" in t for t in targets) and not any("piip" in t for t in targets), targets
        assert_runs(step(model, model, inputs), ours=True, what="eager, after the export")


def test_rtdetrv2_compiles_with_ours():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = their_decoder(layers=1)
    inputs = decoder_inputs()
    want = step(lambda *x: model(*x, SHAPES), model, inputs, count=False)
    with piip_kernels.use_in_rtdetrv2(model):
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
        got = step(lambda *x: compiled(*x, SHAPES), model, inputs, count=False)
    assert_equal_steps(got, want, "compiled")
    assert any("piip.ms_deform_attn" in str(n.target) for g in counter.graphs for n in g.graph.nodes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rtdetrv2_autocast_against_float64(dtype):
    """Under autocast, at most twice as far from the float64 truth as their path under the same autocast."""
    model = their_decoder(layers=1, value_as_levels=True)
    inputs = decoder_inputs()
    truth = model(*inputs, SHAPES).detach()
    with torch.autocast("cpu", dtype=dtype):
        model32 = model.float()
        inputs32 = [t.float() for t in inputs]
        theirs = model32(*inputs32, SHAPES).detach()
        with piip_kernels.use_in_rtdetrv2(model32):
            ours = model32(*inputs32, SHAPES).detach()
    assert_derived_close(f"rtdetrv2 autocast {dtype}", ours.float(), theirs.float(), truth, floor=1e-4)


def test_rtdetrv2_finds_nothing_in_other_models(caplog):
    handle = piip_kernels.use_in_rtdetrv2(nn.Linear(2, 2))
    assert handle.taken() == 0
    with pytest.raises(TypeError, match="torch.nn.Module"):
        piip_kernels.use_in_rtdetrv2("model")


def test_top_level_names():
    assert piip_kernels.use_in_ultralytics and piip_kernels.use_in_rfdetr and piip_kernels.use_in_rtdetrv2
    assert {"use_in_ultralytics", "use_in_rfdetr", "use_in_rtdetrv2"} <= set(piip_kernels.__all__)


# ---------------------------------------------------------------------------------------------
# Copies and pickles of a model swapped per model: a deep copy (an EMA model) is held by the
# same handle; a pickled model comes back with the library's own code.

def test_rtdetrv2_deep_copy_is_held_and_pickle_carries_theirs():
    import copy
    import io

    model = their_decoder()
    inputs = decoder_inputs()
    handle = piip_kernels.use_in_rtdetrv2(model)
    try:
        twin = copy.deepcopy(model)
        assert_runs(step(lambda *x: twin(*x, SHAPES), twin, inputs), ours=True, what="deep copy")
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert_runs(step(lambda *x: loaded(*x, SHAPES), loaded, inputs), ours=False, what="unpickled")
        second = piip_kernels.use_in_rtdetrv2(loaded)
        assert second.swapped
        assert_runs(step(lambda *x: loaded(*x, SHAPES), loaded, inputs), ours=True, what="unpickled, swapped again")
        second.remove()
        assert_runs(step(lambda *x: loaded(*x, SHAPES), loaded, inputs), ours=False, what="unpickled, handle removed")
    finally:
        handle.remove()
    assert_runs(step(lambda *x: twin(*x, SHAPES), twin, inputs), ours=False, what="deep copy after remove()")
    assert_runs(step(lambda *x: model(*x, SHAPES), model, inputs), ours=False, what="model after remove()")
    assert_equal_steps(step(lambda *x: twin(*x, SHAPES), twin, inputs, count=False),
                       step(lambda *x: model(*x, SHAPES), model, inputs, count=False), "copy vs original after remove()")
