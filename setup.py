"""Builds piip_kernels._C: the C++ CPU kernels always, the CUDA kernels when
nvcc and a CUDA build of torch are both present.

Every ``csrc/**/*.cpp`` file is compiled; every ``csrc/**/*.cu`` file is added
when CUDA is available, so a new kernel needs no change here.

Environment:
  PIIP_KERNELS_NO_CUDA=1     build the CPU kernels only, even with a CUDA torch
  PIIP_KERNELS_DEBUG=1       -O0 -g instead of -O3
  TORCH_CUDA_ARCH_LIST       respected as usual (for example "9.0")
  MAX_JOBS                   parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted() -> bool:
    if os.environ.get("PIIP_KERNELS_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def _opt() -> list[str]:
    return ["-O0", "-g"] if os.environ.get("PIIP_KERNELS_DEBUG", "0") == "1" else ["-O3"]


def nvcc_flags() -> list[str]:
    """Our nvcc flags; torch's extension build adds its COMMON_NVCC_FLAGS (no implicit
    half/bfloat16 conversions among them). tests/test_native_sources.py compiles with both."""
    return _opt() + ["-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"]


def _extension():
    cxx = _opt() + ["-std=c++20", "-fopenmp", "-fvisibility=hidden"]
    sources = _sources("*.cpp")
    kwargs = dict(
        name="piip_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if _cuda_wanted():
        sources += _sources("*.cu")
        return CUDAExtension(extra_compile_args={"cxx": cxx + ["-DPIIP_WITH_CUDA"], "nvcc": nvcc_flags()}, **kwargs)
    return CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)


if __name__ == "__main__":
    print(f"piip_kernels: building with torch {torch.__version__}, CUDA: {_cuda_wanted()}", file=sys.stderr)
    setup(
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
