"""piip_kernels.compat: the compiled-extension stand-in (``install_extensions`` and the no-edit
route, ``piip_kernels.extension_hook``) and mmcv (``use_in_mmcv``).

The repositories that import a compiled extension are not packages, and mmcv's ops need a
build, so the tests reproduce their published interfaces (Deformable DETR's autograd Function
around ``MSDA.ms_deform_attn_forward`` / ``ms_deform_attn_backward``, mmcv's module layout), in
our own code. In float64, outputs and every gradient must equal the reference (grid_sample),
our op must run, and removing the handles (in any order) must put back what was there.
"""
import os
import subprocess
import sys

import pytest
import torch

from piip_kernels import compat, extension_hook
from piip_kernels.msda.reference import ms_deform_attn_reference

from helpers import assert_derived_close
from integration_helpers import assert_equal_steps, assert_runs, assert_same, move_offsets_off_centres, step
from integration_helpers import one_thread  # noqa: F401  (an autouse fixture: small models run on one thread)

SHAPES = [(6, 7), (3, 4), (1, 1)]  # odd sizes and a 1x1 level


# ---------------------------------------------------------------------------------------------
# The compiled extension's interface (Deformable DETR's MultiScaleDeformableAttention)

def msda_inputs(shapes=SHAPES, N=2, Lq=5, M=2, D=3, P=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial = torch.tensor(shapes)
    starts = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    S = int(spatial.prod(1).sum())
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Lq, M, len(shapes), P, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1  # some outside
    weights = torch.rand(N, Lq, M, len(shapes), P, generator=g, dtype=torch.float64)
    return value.to(dtype), spatial, starts, loc, weights


class DetrFunction(torch.autograd.Function):
    """Deformable DETR's ``MSDeformAttnFunction``: the compiled extension's forward and backward
    inside an autograd.Function, as the repositories call them."""

    @staticmethod
    def forward(ctx, value, shapes, starts, loc, weights, im2col_step):
        import MultiScaleDeformableAttention as MSDA

        ctx.im2col_step = im2col_step
        out = MSDA.ms_deform_attn_forward(value, shapes, starts, loc, weights, ctx.im2col_step)
        ctx.save_for_backward(value, shapes, starts, loc, weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        import MultiScaleDeformableAttention as MSDA

        value, shapes, starts, loc, weights = ctx.saved_tensors
        grad_value, grad_loc, grad_weights = MSDA.ms_deform_attn_backward(value, shapes, starts, loc, weights, grad_output,
                                                                          ctx.im2col_step)
        return grad_value, None, None, grad_loc, grad_weights, None


def reference_step(value, shapes, starts, loc, weights):
    return step(lambda v, l, w: ms_deform_attn_reference(v, shapes, starts, l, w), None, [value, loc, weights], count=False)


@pytest.mark.parametrize("shapes", [SHAPES, [(1, 1)], [(5, 3), (2, 9)]])
def test_extension_functions_equal_the_reference(shapes):
    value, spatial, starts, loc, weights = msda_inputs(shapes)
    want = reference_step(value, spatial, starts, loc, weights)
    out = compat.ms_deform_attn_forward(value, spatial, starts, loc, weights, 64)
    grad_out = 2 * want["out"] / want["out"].numel()  # the gradient of the mean square
    grads = compat.ms_deform_attn_backward(value, spatial, starts, loc, weights, grad_out, 64)
    assert isinstance(grads, list) and len(grads) == 3
    assert_same([out, *grads], [want["out"], *want["input grads"]], "stand-in (out, grad value, grad loc, grad weights)")


def test_extension_backward_keeps_each_input_dtype():
    """bf16 values beside fp32 locations (autocast): each gradient in its input's dtype, as the
    autograd.Function around it expects."""
    value, spatial, starts, loc, weights = msda_inputs()
    value = value.to(torch.bfloat16)
    loc, weights = loc.float(), weights.float()
    out = compat.ms_deform_attn_forward(value, spatial, starts, loc, weights, 64)
    grads = compat.ms_deform_attn_backward(value, spatial, starts, loc, weights, torch.ones_like(out), 64)
    assert out.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]


@pytest.fixture
def no_extension():
    """No MultiScaleDeformableAttention importable before and after the test."""
    names = ("MultiScaleDeformableAttention", "groundingdino", "groundingdino._C", "fake_detr_repo")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    try:
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def test_install_extensions_serves_detr_repositories(no_extension):
    with pytest.raises(ModuleNotFoundError):
        import MultiScaleDeformableAttention  # noqa: F401
    value, spatial, starts, loc, weights = msda_inputs()
    want = reference_step(value, spatial, starts, loc, weights)
    with compat.install_extensions() as handle:
        assert handle.swapped["extension"] >= 1, handle
        got = step(lambda v, l, w: DetrFunction.apply(v, spatial, starts, l, w, 64), None, [value, loc, weights])
        assert_runs(got, ours=True, what="Deformable DETR's Function on the stand-in")
        assert_equal_steps(got, want, "Deformable DETR's Function on the stand-in")
    assert "MultiScaleDeformableAttention" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        import MultiScaleDeformableAttention  # noqa: F401,F811


@pytest.mark.parametrize("first_out", [0, 1])
def test_install_extensions_replaces_an_imported_compiled_one(no_extension, first_out):
    """A compiled extension imported already (one that runs only on a GPU) is replaced where
    the repositories bound it, held by two handles removed in either order, and comes back."""
    import types

    compiled = types.ModuleType("MultiScaleDeformableAttention")
    compiled.ms_deform_attn_forward = lambda *args: (_ for _ in ()).throw(RuntimeError("Not implemented on the CPU"))
    repo = types.ModuleType("fake_detr_repo")
    repo.MSDA = compiled
    sys.modules.update({"MultiScaleDeformableAttention": compiled, "fake_detr_repo": repo})
    handles = []
    try:
        handles.append(compat.install_extensions())
        handles.append(compat.install_extensions())
        assert compat.is_stand_in(repo.MSDA) and compat.is_stand_in(sys.modules["MultiScaleDeformableAttention"])
        assert handles[0].swapped["import site"] == 1 and handles[1].already == sum(handles[1].swapped.values())
        handles[first_out].remove()
        assert compat.is_stand_in(repo.MSDA)
        value, spatial, starts, loc, weights = msda_inputs()
        torch.testing.assert_close(repo.MSDA.ms_deform_attn_forward(value, spatial, starts, loc, weights, 64),
                                   ms_deform_attn_reference(value, spatial, starts, loc, weights))
        handles[1 - first_out].remove()
        assert repo.MSDA is compiled and sys.modules["MultiScaleDeformableAttention"] is compiled
    finally:
        for h in handles:
            h.remove()


def test_install_extensions_covers_groundingdino(no_extension, tmp_path, monkeypatch):
    (tmp_path / "groundingdino").mkdir()
    (tmp_path / "groundingdino" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with compat.install_extensions() as handle:
        from groundingdino import _C

        assert compat.is_stand_in(_C) and handle.swapped["extension"] == 3  # MSDA, sys.modules entry and attribute
    import groundingdino

    assert "_C" not in vars(groundingdino) and "groundingdino._C" not in sys.modules


# ---------------------------------------------------------------------------------------------
# The no-edit route: a .pth file and an import finder, tried in fresh interpreters

REPO_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from test_integrations_compat import DetrFunction, msda_inputs
from piip_kernels.msda.reference import ms_deform_attn_reference
value, shapes, starts, loc, weights = msda_inputs()
leaves = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
out = DetrFunction.apply(leaves[0], shapes, starts, leaves[1], leaves[2], 64)
ref = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
want = ms_deform_attn_reference(ref[0], shapes, starts, ref[1], ref[2])
out.square().sum().backward(); want.square().sum().backward()
for a, b in [(out, want)] + [(l.grad, r.grad) for l, r in zip(leaves, ref)]:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
import MultiScaleDeformableAttention as MSDA
print("served by", MSDA.__spec__.origin)
"""


def in_site(site_dir, code, env=None):
    """Runs code in a fresh interpreter that processes ``site_dir``'s .pth files first."""
    full = f"import site; site.addsitedir({str(site_dir)!r})\n" + code
    return subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_hook_serves_detr_repositories_with_no_edit(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    assert extension_hook.main(["install", "--dir", str(site)]) == 0
    assert (site / extension_hook.PTH_NAME).exists()
    # At start-up the hook imports neither piip_kernels nor torch.
    quiet = in_site(site, "import sys; assert not {'torch', 'piip_kernels'} & set(sys.modules), sorted(sys.modules)")
    assert quiet.returncode == 0 and not quiet.stderr, quiet.stderr
    run = in_site(site, REPO_SCRIPT.format(tests=os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr
    assert "served by piip_kernels (stand-in)" in run.stdout
    # One run without it, then no hook at all.
    off = in_site(site, "import MultiScaleDeformableAttention", env={"PIIP_KERNELS_NO_HOOK": "1"})
    assert off.returncode != 0 and "ModuleNotFoundError" in off.stderr
    assert extension_hook.main(["remove", "--dir", str(site)]) == 0
    gone = in_site(site, "import MultiScaleDeformableAttention")
    assert gone.returncode != 0 and "ModuleNotFoundError" in gone.stderr


def test_hook_leaves_a_built_extension_first(tmp_path):
    site, built = tmp_path / "site", tmp_path / "built"
    site.mkdir()
    built.mkdir()
    (built / "MultiScaleDeformableAttention.py").write_text("BUILT = True\n")
    extension_hook.install(str(site))
    run = in_site(site, f"import sys; sys.path.insert(0, {str(built)!r}); import MultiScaleDeformableAttention as M; "
                        "assert M.BUILT; import groundingdino._C")
    # The built one is found first; groundingdino itself is not installed, so its _C is not served.
    assert "ModuleNotFoundError: No module named 'groundingdino'" in run.stderr, run.stderr


# ---------------------------------------------------------------------------------------------
# mmcv 2.x: its module layout, reproduced (mmcv's compiled ops need a build)

MMCV_OPS = '''
import torch
import torch.nn.functional as F
from torch import nn


def multi_scale_deformable_attn_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
    """mmcv's CPU path (its signature): grid_sample per level."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out = 0
    for lvl, (v, (h, w)) in enumerate(zip(value.split([int(h) * int(w) for h, w in value_spatial_shapes], 1),
                                          value_spatial_shapes)):
        v = v.permute(0, 2, 3, 1).reshape(N * M, D, int(h), int(w))
        grid = 2 * sampling_locations[:, :, :, lvl].transpose(1, 2).flatten(0, 1) - 1
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (sampled * attention_weights[:, :, :, lvl].transpose(1, 2).flatten(0, 1)[:, None]).sum(-1)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


class MultiScaleDeformableAttnFunction(torch.autograd.Function):
    """mmcv's GPU path: its compiled kernel has no bf16 (mmcv issue 2878)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        raise RuntimeError(f"ms_deform_attn_impl_forward not implemented for {value.dtype}")


class MultiScaleDeformableAttention(nn.Module):
    """The parts of mmcv's module that reach the op (batch_first, 2-d reference points)."""

    def __init__(self, embed_dims=8, num_heads=2, num_levels=3, num_points=2, use_function=False):
        super().__init__()
        self.h, self.l, self.p, self.use_function = num_heads, num_levels, num_points, use_function
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, query, value, reference_points, spatial_shapes, level_start_index):
        N, Lq, _ = query.shape
        v = self.value_proj(value).view(N, value.shape[1], self.h, -1)
        offsets = self.sampling_offsets(query).view(N, Lq, self.h, self.l, self.p, 2)
        weights = self.attention_weights(query).view(N, Lq, self.h, self.l * self.p).softmax(-1)
        weights = weights.view(N, Lq, self.h, self.l, self.p)
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        if self.use_function:  # mmcv takes this path on CUDA
            return MultiScaleDeformableAttnFunction.apply(v, spatial_shapes, level_start_index, loc, weights, 64)
        return multi_scale_deformable_attn_pytorch(v, spatial_shapes, loc, weights)
'''


@pytest.fixture
def fake_mmcv(tmp_path, monkeypatch):
    """mmcv's layout: mmcv.ops.multi_scale_deform_attn, re-exported by mmcv.ops, and a
    downstream module (as mmdet's layers do) that imported the function by name."""
    ops = tmp_path / "mmcv" / "ops"
    ops.mkdir(parents=True)
    (tmp_path / "mmcv" / "__init__.py").write_text("")
    (ops / "multi_scale_deform_attn.py").write_text(MMCV_OPS)
    (ops / "__init__.py").write_text("from .multi_scale_deform_attn import (MultiScaleDeformableAttention, "
                                     "MultiScaleDeformableAttnFunction, multi_scale_deformable_attn_pytorch)\n")
    (tmp_path / "fake_mmdet_layers.py").write_text("from mmcv.ops import multi_scale_deformable_attn_pytorch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import fake_mmdet_layers
        import mmcv.ops.multi_scale_deform_attn as msda

        yield msda, fake_mmdet_layers
    finally:
        for name in [n for n in sys.modules if n == "mmcv" or n.startswith("mmcv.") or n == "fake_mmdet_layers"]:
            del sys.modules[name]


def mmcv_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    spatial = torch.tensor(SHAPES)
    starts = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    S = int(spatial.prod(1).sum())
    return [torch.randn(2, 5, 8, generator=g, dtype=dtype), torch.randn(2, S, 8, generator=g, dtype=dtype),
            torch.rand(2, 5, 3, 2, generator=g, dtype=dtype), spatial, starts]


def test_mmcv_cpu_path_equals_mmcv_and_every_import_is_swapped(fake_mmcv):
    msda, downstream = fake_mmcv
    torch.manual_seed(0)
    module = msda.MultiScaleDeformableAttention().double()
    move_offsets_off_centres(module)
    inputs = mmcv_inputs()
    want = step(module, module, inputs)
    assert_runs(want, ours=False, what="mmcv")
    theirs = msda.multi_scale_deformable_attn_pytorch
    with compat.use_in_mmcv() as handle:
        assert handle.swapped["multi_scale_deformable_attn_pytorch"] == 3, handle  # its module, mmcv.ops, downstream
        assert downstream.multi_scale_deformable_attn_pytorch is compat.multi_scale_deformable_attn_pytorch
        got = step(module, module, inputs)
    assert_runs(got, ours=True, what="mmcv on ours")
    assert_equal_steps(got, want, "mmcv on ours")
    assert downstream.multi_scale_deformable_attn_pytorch is theirs and msda.multi_scale_deformable_attn_pytorch is theirs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mmcv_function_path_runs_half_precision(fake_mmcv, dtype):
    """mmcv's CUDA path (its Function) in bf16 and fp16 under autocast: mmcv's kernel refuses
    bf16; ours runs, within twice the error of mmcv's float path in the same autocast."""
    msda, _ = fake_mmcv
    torch.manual_seed(0)
    module = msda.MultiScaleDeformableAttention(use_function=True).double()
    move_offsets_off_centres(module)
    inputs = mmcv_inputs()
    module.use_function = False
    truth = module(*inputs).detach()
    with torch.autocast("cpu", dtype=dtype):
        module32, inputs32 = module.float(), [t.float() if t.is_floating_point() else t for t in inputs]
        theirs = module32(*inputs32).detach()  # their grid_sample path, in this autocast
        module32.use_function = True
        with pytest.raises(RuntimeError, match="not implemented"):
            module32(*inputs32)
        with compat.use_in_mmcv():
            ours = module32(*inputs32)
    assert_derived_close(f"mmcv Function {dtype}", ours.float(), theirs.float(), truth, floor=1e-4)


def test_mmcv_missing_says_why():
    if "mmcv" in sys.modules or _importable("mmcv"):
        pytest.skip("mmcv is installed here")
    with pytest.raises(ImportError, match="mmcv-lite has no mmcv.ops"):
        compat.use_in_mmcv()


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None
