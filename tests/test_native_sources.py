"""Every CUDA source compiles for the GPU (sm_90) with nvcc, without a GPU.

- The torch-free kernel headers are instantiated for every dtype and vector width the
  glue can pick, so the device code CI compiles is the device code a GPU build runs.
- The shared per-point headers (msda_math.h, dca_math.h, merge_math.h) are used from
  device code, so the CPU tests exercise arithmetic that also builds for the GPU.
- Every file compiles with the flags of the real build (setup.py's and those torch adds).
- Every .cu glue file compiles against the installed torch headers, on the LibTorch stable
  ABI only (setup.py's flags set TORCH_TARGET_VERSION: an ATen or c10 header would fail), so
  the CPU build of torch is enough to compile the CUDA binary (as scripts/build_wheels.sh does).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None and os.environ.get("PIIP_REQUIRE_NVCC") != "1", reason="nvcc not on PATH")

PROBE = r"""
#include "msda/msda_math.h"
#include "dca/dca_math.h"
#include "merge/merge_math.h"
using namespace piip;
template <typename acc_t>
__global__ void probe(const acc_t* xy, acc_t* out) {
  msda::Bilinear<acc_t> b;
  acc_t s[4] = {1, 2, 3, 4}, ga = 0, gx = 0, gy = 0, w[4], g[4] = {1, 2, 3, 4};
  if (msda::make_bilinear<acc_t>(xy[0], xy[1], 7, 5, b)) msda::point_grads<acc_t>(b, s, acc_t(0.5), 7, 5, ga, gx, gy);
  acc_t rx, ry;
  dca::grid_reference<acc_t>(5, 3, 4, rx, ry);
  dca::softmax<acc_t, acc_t>(xy, 4, w);
  dca::softmax_backward<acc_t>(w, 4, g);
  merge::Tap<acc_t> t = merge::axis_tap<acc_t>(3, 7, merge::axis_scale<acc_t>(7, 11, false), false);
  out[0] = ga + gx + gy + b.w[0] + rx + ry + g[0] + t.l;
}
template __global__ void probe<float>(const float*, float*);
template __global__ void probe<double>(const double*, double*);
"""

KERNELS = r"""
#include "msda/msda_cuda.cuh"
namespace piip::msda::cuda {
// Every variant of a launch function is compiled with it (the variant is a run-time switch).
#define INST(T, U, V) \
  template cudaError_t launch_forward<T, U, V>(const Params<T, U>&, T*, cudaStream_t, int); \
  template cudaError_t launch_backward<T, U, V>(const Params<T, U>&, const T*, const msda::cuda::GradValue&, U*, U*, T*, cudaStream_t, int);
INST(float, float, 1) INST(float, float, 2) INST(float, float, 4)
INST(__half, __half, 1) INST(__half, __half, 2) INST(__half, __half, 4) INST(__half, __half, 8)
INST(__half, float, 1) INST(__half, float, 2) INST(__half, float, 4) INST(__half, float, 8)
INST(__nv_bfloat16, __nv_bfloat16, 1) INST(__nv_bfloat16, __nv_bfloat16, 2) INST(__nv_bfloat16, __nv_bfloat16, 4)
INST(__nv_bfloat16, __nv_bfloat16, 8) INST(__nv_bfloat16, float, 1) INST(__nv_bfloat16, float, 2)
INST(__nv_bfloat16, float, 4) INST(__nv_bfloat16, float, 8)
}
#undef INST
#define INST(T, U, V) \
  template cudaError_t launch_forward<T, U, V>(const Params<T, U>&, T*, cudaStream_t); \
  template cudaError_t launch_backward<T, U, V>(const Params<T, U>&, const T*, const msda::cuda::GradValue&, U*, U*, T*, cudaStream_t);
#include "dca/dca_cuda.cuh"
namespace piip::dca::cuda {
INST(float, float, 1) INST(float, float, 2) INST(float, float, 4)
INST(__half, __half, 8) INST(__half, float, 8) INST(__half, float, 2)
INST(__nv_bfloat16, __nv_bfloat16, 8) INST(__nv_bfloat16, float, 8) INST(__nv_bfloat16, float, 1)
}
#include "merge/merge_cuda.cuh"
namespace piip::merge::cuda {
#define INST2(T, O) \
  template cudaError_t launch_forward<T, O>(int, const ForwardParams<T>&, O*, cudaStream_t); \
  template cudaError_t launch_backward<T, O>(int, const BranchesBackward<T, O>&, cudaStream_t);
INST2(float, float) INST2(__half, __half) INST2(__half, float) INST2(__nv_bfloat16, __nv_bfloat16) INST2(__nv_bfloat16, float)
}
#include "msda/msda_two_pass.cuh"
namespace piip::msda::two_pass {
#define INST3(T, U, V) \
  template cudaError_t launch_backward<T, U, V>(const cuda::Params<T, U>&, const T*, U*, U*, T*, void*, size_t, cudaStream_t);
INST3(float, float, 1) INST3(float, float, 2) INST3(float, float, 4)
INST3(__half, __half, 8) INST3(__half, float, 8) INST3(__half, float, 2)
INST3(__nv_bfloat16, __nv_bfloat16, 8) INST3(__nv_bfloat16, float, 8) INST3(__nv_bfloat16, float, 1)
}
#include "common/fixed_point.cuh"
namespace piip::fixed_point {
template cudaError_t launch_absmax<float>(const float*, int64_t, unsigned int*, cudaStream_t);
template cudaError_t launch_absmax<__half>(const __half*, int64_t, unsigned int*, cudaStream_t);
template cudaError_t launch_absmax<__nv_bfloat16>(const __nv_bfloat16*, int64_t, unsigned int*, cudaStream_t);
}
"""


def build_flags() -> list[str]:
    """The nvcc flags of the real build: setup.py's own plus those torch's extension build
    adds (among them -D__CUDA_NO_HALF_CONVERSIONS__, so an implicit float -> __half
    conversion that plain nvcc accepts fails here as it does in `pip install`)."""
    import importlib.util

    import torch.utils.cpp_extension as ext

    spec = importlib.util.spec_from_file_location("piip_setup", CSRC.parent / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    return setup.nvcc_flags() + ext.COMMON_NVCC_FLAGS


def nvcc(tmp_path, src: Path, *extra):
    cmd = [NVCC or "nvcc", "-c", *build_flags(), "-arch=sm_90", "-I", str(CSRC), *extra, str(src),
           "-o", str(tmp_path / (src.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "warning" not in res.stderr, res.stderr[-4000:]
    return res.stderr


def resource_usage(ptxas_report: str) -> dict[str, tuple[int, int, int]]:
    """Demangled kernel name -> (registers, stack frame bytes, spill store bytes), from
    nvcc's `-Xptxas -v` report."""
    usage, name, frame = {}, None, None
    for line in ptxas_report.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)) and name:
            frame = (int(m.group(1)), int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and name and frame:
            usage[name] = (int(m.group(1)), *frame)
            name = frame = None
    demangled = subprocess.run([shutil.which("c++filt") or "c++filt"], input="\n".join(usage), capture_output=True,
                               text=True, check=True).stdout.splitlines()
    return dict(zip(demangled, usage.values()))


def test_shared_math_headers_compile_for_sm90(tmp_path):
    src = tmp_path / "probe.cu"
    src.write_text(PROBE)
    nvcc(tmp_path, src)


BEFORE_SM90 = r"""
#include "msda/msda_cuda.cuh"
#include "dca/dca_cuda.cuh"
template cudaError_t piip::msda::cuda::launch_backward<float, float, 4>(
    const piip::msda::cuda::Params<float, float>&, const float*, const piip::msda::cuda::GradValue&, float*, float*,
    float*, cudaStream_t, int);
template cudaError_t piip::dca::cuda::launch_backward<__half, float, 8>(
    const piip::dca::cuda::Params<__half, float>&, const __half*, const piip::msda::cuda::GradValue&, float*, float*,
    __half*, cudaStream_t);
"""


def test_scatter_compiles_before_sm90(tmp_path):
    """The wheel's oldest arch, sm_75, has no float4 atomicAdd: the scatter's vector path must
    not even be looked up there (an unused `if constexpr` branch still was, and the wheel build
    for sm_75..sm_120 failed)."""
    src = tmp_path / "before_sm90.cu"
    src.write_text(BEFORE_SM90)
    cmd = [NVCC or "nvcc", "-c", *build_flags(), "-arch=sm_75", "-I", str(CSRC), str(src), "-o", str(tmp_path / "b.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


def test_cuda_kernels_compile_for_sm90_for_every_dtype(tmp_path):
    """Every instantiation compiles, and the compiler's resource report holds what the
    kernels' comments promise (a static property of the build, not a timing): no register
    spills anywhere, and no local-memory stack frame except in the deformable cross-attention
    kernels for a run-time point count (their per-point arrays; P = 4 is unrolled)."""
    src = tmp_path / "kernels.cu"
    src.write_text(KERNELS)
    usage = resource_usage(nvcc(tmp_path, src, "-Xptxas", "-v"))
    assert len(usage) > 50, f"ptxas reported only {len(usage)} kernels"
    for kernel, (regs, frame, spills) in usage.items():
        assert spills == 0, f"{kernel} spills {spills} bytes ({regs} registers)"
        runtime_points = kernel.startswith("void piip::dca::cuda::") and re.search(r", 0>\(", kernel)
        assert frame == 0 or runtime_points, f"{kernel} has a {frame}-byte stack frame: an array went to local memory"
    msda_backwards = ("backward_kernel", "warp_aggregated_backward_kernel", "shared_privatized_backward_kernel")
    for name in msda_backwards + ("point_major_forward_kernel", "flat_forward_kernel"):
        assert any(k.startswith(f"void piip::msda::cuda::{name}<") for k in usage), f"ptxas reported no {name}"
    assert any(k.startswith("void piip::msda::two_pass::") for k in usage), "ptxas reported no two_pass kernel"
    for kernel, (regs, _, _) in usage.items():
        if kernel.startswith(tuple(f"void piip::msda::cuda::{name}<" for name in msda_backwards)):
            # warp_aggregated asks for 3 blocks per SM (80 registers) at every width, the others for 4 (64)
            # below 16-byte vectors of 16-bit values
            wide = re.search(r", 8>\(", kernel) or "warp_aggregated" in kernel
            assert regs <= (80 if wide else 64), f"{kernel} uses {regs} registers"


@pytest.mark.parametrize("cu", sorted(p.relative_to(CSRC).as_posix() for p in CSRC.rglob("*.cu")))
def test_glue_compiles_for_sm90(tmp_path, cu):
    import sysconfig

    import torch.utils.cpp_extension as ext

    includes = []
    for inc in ext.include_paths() + [sysconfig.get_paths()["include"]]:
        includes += ["-I", inc]
    nvcc(tmp_path, CSRC / cu, *includes)


def test_every_cuda_source_is_covered():
    """A new .cu file is compiled by test_glue_compiles_for_sm90 automatically; a new
    kernel header must be added to KERNELS above."""
    headers = sorted(p.relative_to(CSRC).as_posix() for p in CSRC.rglob("*.cuh"))
    assert headers == ["common/fixed_point.cuh", "common/launch.cuh", "dca/dca_cuda.cuh", "merge/merge_cuda.cuh",
                       "msda/msda_cuda.cuh", "msda/msda_two_pass.cuh"], \
        f"instantiate the kernels of {headers} in KERNELS"
