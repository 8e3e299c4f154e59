"""The compiled kernels are built on the LibTorch stable ABI (setup.py), so one binary
serves every torch from 2.10 on. Checked on the binaries of this install:

- they were compiled for torch 2.10 (TORCH_TARGET_VERSION), and under those flags an ATen
  or c10 header does not compile, so no call outside the stable ABI can slip in;
- no at::, c10:: or torch:: C++ symbol, defined or needed (those change between releases);
- no libgomp (torch's thread pool runs the CPU kernels), no libtorch_python (abi3), no
  CUDA library of torch or CUDA runtime to find (the runtime is linked in statically);
- registration under a namespace of one's own (what a kernels-hub build does) and its errors.

scripts/check_wheel.sh checks the published wheel the same way, and under other torch releases.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import piip_kernels
from piip_kernels import _ext
from piip_kernels.msda.reference import ms_deform_attn_reference

from helpers import msda_inputs

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(_ext.EXT is None, reason=f"compiled extension missing: {_ext.EXT_ERROR}")


def setup_module_():
    spec = importlib.util.spec_from_file_location("piip_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    return setup


def binaries() -> list[Path]:
    pkg = Path(piip_kernels.__file__).parent
    return sorted(pkg.glob("_C*.so"))


def test_build_flags_target_torch_2_10():
    setup = setup_module_()
    assert setup.TORCH_TARGET == (2, 10)
    for flags in (setup.cxx_flags(), setup.nvcc_flags()):
        assert "-DTORCH_TARGET_VERSION=0x020a000000000000" in flags
        assert "-fopenmp" not in flags  # OpenMP's runtime would be linked: torch's pool runs the loops


@needs_ext
def test_binary_was_built_for_torch_2_10():
    # The module reports TORCH_FEATURE_VERSION as compiled: the flag was in effect.
    assert _ext.EXT.TORCH_TARGET == "2.10"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_aten_header_does_not_compile_under_the_target(tmp_path):
    """The guard the build relies on: with TORCH_TARGET_VERSION set, an ATen header is an
    error, while the stable headers the glue uses compile."""
    from torch.utils.cpp_extension import include_paths

    setup = setup_module_()
    flags = ["g++", "-fsyntax-only", *[f for f in setup.cxx_flags() if f.startswith(("-D", "-std"))],
             *[f"-I{p}" for p in include_paths()], f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}"]
    good = tmp_path / "good.cpp"
    good.write_text('#include "common/module_glue.h"\n#include "common/cpu_glue.h"\n')
    res = subprocess.run([*flags, str(good)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    bad = tmp_path / "bad.cpp"
    bad.write_text("#include <ATen/core/Tensor.h>\n")
    res = subprocess.run([*flags, str(bad)], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0, "an ATen header compiled under TORCH_TARGET_VERSION"


def tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs {name} (binutils)")
    return path


def binary(which: str) -> Path:
    so = [b for b in binaries() if b.name.startswith(which + ".")]
    if not so and os.environ.get("PIIP_KERNELS_CUDA") == "1":
        pytest.fail(f"{which} was not built although PIIP_KERNELS_CUDA=1 asked for it (CI builds it)")
    if not so:
        pytest.skip(f"{which} was not built")
    return so[0]


@needs_ext
@pytest.mark.parametrize("which", ["_C", "_C_cuda"])
def test_no_torch_cxx_symbols(which):
    so = binary(which)
    out = subprocess.run([tool("nm"), "-D", "-C", str(so)], capture_output=True, text=True, check=True).stdout
    cxx = [line for line in out.splitlines() if re.search(r"\b(at|c10|torch)::", line)]
    assert not cxx, f"{so.name} uses torch's C++ ABI:\n" + "\n".join(cxx[:20])
    exported = [line.split()[-1] for line in out.splitlines() if re.match(r"[0-9a-f]+ T ", line)]
    assert exported == [f"PyInit_{which}"], f"{so.name} exports more than its module init: {exported[:10]}"


@needs_ext
@pytest.mark.parametrize("which", ["_C", "_C_cuda"])
def test_needed_libraries(which):
    so = binary(which)
    out = subprocess.run([tool("readelf"), "-d", str(so)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    assert "libtorch_cpu.so" in needed
    forbidden = [n for n in needed if re.match(r"lib(gomp|torch_python|torch_cuda|c10_cuda|cudart|python3)", n)]
    assert not forbidden, f"{so.name} needs {forbidden} (all NEEDED: {needed})"


@needs_ext
def test_register_under_another_namespace_and_errors():
    """What a kernels-hub build does with the same binary: its own namespace, same results."""
    with pytest.raises(RuntimeError, match="piip_C"):
        _ext.EXT.register("piip_C")  # taken by piip_kernels itself: an error, not a crash
    with pytest.raises(TypeError):
        _ext.EXT.register(3)
    ns = "piip_stable_abi_test"
    if f"{ns}::msda_forward" not in torch._C._dispatch_get_all_op_names():  # once per process
        _ext.EXT.register(ns)
    value, shapes, starts, loc, attn = msda_inputs([(5, 6), (2, 3)])
    out = getattr(torch.ops, ns).msda_forward(value, shapes, starts, loc, attn)
    torch.testing.assert_close(out, torch.ops.piip_C.msda_forward(value, shapes, starts, loc, attn), rtol=0, atol=0)
    torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, starts, loc, attn))


def test_cuda_mismatch_reasons():
    assert _ext.cuda_mismatch("13.0", "13.0", "2.11.0+cu130") is None
    assert _ext.cuda_mismatch("13.0", "13.2", "2.14.1") is None
    cpu = _ext.cuda_mismatch("13.0", None, "2.13.0+cpu")
    assert "CPU build" in cpu and "CUDA 13.x" in cpu
    old = _ext.cuda_mismatch("13.0", "12.8", "2.10.0+cu128")
    assert "12.8" in old and "CUDA 13.x" in old and "source" in old


def test_backend_report_says_why_cuda_is_off():
    if _ext.CUDA_EXT is not None:
        pytest.skip("the CUDA kernels are on here")
    text = piip_kernels.backend_report(devices=["cuda"], file=open("/dev/null", "w"))
    reason = _ext.CUDA_ERROR or _ext.EXT_ERROR
    assert reason and reason in text
