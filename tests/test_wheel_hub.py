"""The kernels-hub build (scripts/build_hub.py), loaded by the `kernels` library itself:
its resolver picks the variant, its loader checks the digest and imports it, and the
variant's ops (a namespace of their own, beside this process's piip_C) and layer compute
what the reference does, forward and backward."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from piip_kernels import _ext
from piip_kernels.msda.reference import ms_deform_attn_reference

from helpers import msda_inputs

kernels = pytest.importorskip("kernels", reason="the kernels library (installed with transformers) is missing")
pytestmark = pytest.mark.skipif(_ext.EXT is None, reason=f"compiled extension missing: {_ext.EXT_ERROR}")

ROOT = Path(__file__).resolve().parents[1]
CPU_VARIANT = "torch-stable-abi210-cpu-x86_64-linux"
CUDA_VARIANT = "torch-stable-abi210-cu130-x86_64-linux"


def build_hub_module():
    spec = importlib.util.spec_from_file_location("piip_build_hub", ROOT / "scripts" / "build_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub repository from this install's binaries (no CUDA variant without _C_cuda)."""
    out = tmp_path_factory.mktemp("hub")
    lib = Path(_ext.EXT.__file__).parent
    written = dict(build_hub_module().build(lib, out, cuda="13.0", archs=["9.0"]))
    return out, written


def test_variants_and_namespaces(hub):
    out, written = hub
    assert CPU_VARIANT in written and "torch-cuda" in written
    assert (CUDA_VARIANT in written) == (Path(_ext.EXT.__file__).parent / "_C_cuda.abi3.so").exists()
    assert len(set(written.values())) == len(written)
    assert all(ns.startswith("_piip_kernels_") and ns != _ext.NAMESPACE for ns in written.values())
    layer = (out / "build" / CPU_VARIANT / "layers.py").read_text()
    assert "from .msda import ms_deform_attn" in layer
    assert "from piip_kernels" not in layer and "import piip_kernels" not in layer


def test_resolver_picks_the_variant_for_each_torch(hub):
    """The library's own resolution, for torch builds this machine does not have."""
    from kernels._internals.backends import CPU, CUDA
    from kernels._internals.variants import _resolve_variant_for_system, parse_variant
    from packaging.version import Version

    variants = [parse_variant(v) for v in (CPU_VARIANT, CUDA_VARIANT, "torch-cuda")]

    def best(backend, torch_version):
        accepted, _ = _resolve_variant_for_system(variants, backend, "x86_64", "linux", Version(torch_version), True,
                                                  None, python_version=Version("3.12"))
        return accepted[0].variant_str if accepted else None

    assert best(CPU(), "2.10") == CPU_VARIANT
    assert best(CPU(), "2.14") == CPU_VARIANT  # a stable-ABI build serves every later torch
    assert best(CUDA(version=Version("13.0")), "2.11") == CUDA_VARIANT
    assert best(CUDA(version=Version("13.2")), "2.14") == CUDA_VARIANT
    assert best(CUDA(version=Version("12.8")), "2.10") == "torch-cuda"  # no CUDA 12 binary: Triton
    assert best(CPU(), "2.9") is None  # older than the stable ABI the binary needs


def test_get_local_kernel_runs_beside_piip_kernels(hub):
    out, written = hub
    kernel = kernels.get_local_kernel(out)
    assert kernel.NAMESPACE == written[CPU_VARIANT]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{kernel.NAMESPACE}::msda_forward", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("piip_C::msda_forward", "CPU")
    value, shapes, starts, loc, attn = msda_inputs([(5, 6), (2, 3)], dtype=torch.float64)
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in (value, shapes, starts, loc, attn)]
    out_hub = kernel.ms_deform_attn(*inputs)
    out_ref = ms_deform_attn_reference(*inputs)
    torch.testing.assert_close(out_hub, out_ref)
    grad = torch.randn_like(out_ref)
    g_hub = torch.autograd.grad(out_hub, [value, loc, attn], grad)
    g_ref = torch.autograd.grad(out_ref, [value, loc, attn], grad)
    for a, b in zip(g_hub, g_ref):
        torch.testing.assert_close(a, b)
    # The fake kernel: shapes without data.
    meta = [t.to("meta") for t in (value.detach(), shapes, starts, loc.detach(), attn.detach())]
    assert kernel.ms_deform_attn(*meta).shape == out_ref.shape


def test_layer_repository_loads_the_layer(hub):
    out, _ = hub
    repo = kernels.LocalLayerRepository(repo_path=out, layer_name="MultiScaleDeformableAttention")
    layer_cls = repo.load()
    assert layer_cls.has_backward and layer_cls.can_torch_compile
    value, shapes, starts, loc, attn = msda_inputs([(4, 4), (2, 2)])
    result = layer_cls.forward(None, value, shapes, [(4, 4), (2, 2)], starts, loc, attn, 64)
    torch.testing.assert_close(result, ms_deform_attn_reference(value, shapes, starts, loc, attn))


def test_triton_variant_falls_back_to_the_reference_on_cpu(hub, monkeypatch):
    """torch-cuda is pure Python; on CPU tensors (no Triton kernel there) the reference runs."""
    out, written = hub
    vdir = out / "build" / "torch-cuda"
    name = written["torch-cuda"]
    monkeypatch.setitem(sys.modules, name, None)  # a fresh import, not the library's cache
    spec = importlib.util.spec_from_file_location(name, vdir / "__init__.py", submodule_search_locations=[str(vdir)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    value, shapes, starts, loc, attn = msda_inputs([(3, 5)])
    torch.testing.assert_close(module.ms_deform_attn(value, shapes, starts, loc, attn),
                               ms_deform_attn_reference(value, shapes, starts, loc, attn))
    assert sys.modules[f"{name}._ops"].KERNEL_DEVICES == ("triton",)
