"""Builds the kernels of piip_kernels on the LibTorch stable ABI: one binary that loads
under every torch from TORCH_TARGET (2.10) on, and under every CPython from 3.10 on.

- piip_kernels._C: the op schemas and the C++ CPU kernels (every ``csrc/**/*.cpp``);
  links libtorch_cpu only.
- piip_kernels._C_cuda: the CUDA kernels (every ``csrc/**/*.cu``), with the CUDA runtime
  linked statically; it links no torch CUDA library (csrc/common/cuda_glue.cu finds torch's
  stream function at load time), so it builds beside a CPU build of torch too. It loads
  only under a CUDA build of torch of the same CUDA major version (piip_kernels/_ext.py).

The glue is compiled with -DTORCH_TARGET_VERSION: any ATen or c10 header, or a stable
API newer than the target, fails to compile, so nothing outside the stable ABI slips in.

Environment:
  PIIP_KERNELS_CUDA=auto|1|0  the CUDA kernels: auto (default) when nvcc is found and torch
                             is a CUDA build; 1 whenever nvcc is found (how the wheel is built,
                             beside a CPU torch; an error without nvcc); 0 never
  PIIP_KERNELS_NO_CUDA=1     the same as PIIP_KERNELS_CUDA=0
  PIIP_KERNELS_DEBUG=1       -O0 -g instead of -O3
  TORCH_CUDA_ARCH_LIST       respected as usual (for example "9.0"; the wheel: WHEEL_ARCHS)
  MAX_JOBS                   parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, setup

import torch
import torch.utils.cpp_extension as cpp_ext
from torch.utils.cpp_extension import TORCH_LIB_PATH, BuildExtension, include_paths

ROOT = os.path.dirname(os.path.abspath(__file__))

# The oldest torch the binaries load under: the first with every stable-ABI call the glue
# makes (torch_library_impl, torch_parallel_for, the typed data pointers).
TORCH_TARGET = (2, 10)
# The CUDA archs of the published wheel: machine code for Turing to Blackwell, and PTX of the
# newest for GPUs after it.
WHEEL_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;11.0;12.0+PTX"


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def cuda_home() -> str | None:
    """The CUDA toolkit: $CUDA_HOME or $CUDA_PATH, else the folder of the nvcc on PATH as nvcc
    itself reports it (it may be a wrapper script elsewhere), else /usr/local/cuda. torch finds
    none beside a CPU build of torch, which is how the wheel is built."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None and shutil.which("nvcc"):
        probe = subprocess.run(["nvcc", "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
        here = re.search(r"^#\$ _HERE_=(.+)$", probe.stderr, re.MULTILINE)
        home = os.path.dirname(here.group(1).strip()) if here else None
    if home is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    return home


def _cuda_wanted() -> bool:
    mode = "0" if os.environ.get("PIIP_KERNELS_NO_CUDA", "0") == "1" else os.environ.get("PIIP_KERNELS_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"piip_kernels: PIIP_KERNELS_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "1" and cuda_home() is None:
        raise SystemExit("piip_kernels: PIIP_KERNELS_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    if mode == "auto":
        return torch.version.cuda is not None and cuda_home() is not None
    return mode == "1"


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def _opt() -> list[str]:
    return ["-O0", "-g"] if os.environ.get("PIIP_KERNELS_DEBUG", "0") == "1" else ["-O3"]


def stable_abi_defines() -> list[str]:
    """-DTORCH_TARGET_VERSION (major in the top byte, minor in the next, as torch/csrc/stable/version.h wants)."""
    major, minor = TORCH_TARGET
    return [f"-DTORCH_TARGET_VERSION=0x{major:02x}{minor:02x}000000000000"]


def cxx_flags() -> list[str]:
    """Our C++ flags. -fopenmp-simd: the kernels' `#pragma omp simd` without the OpenMP
    runtime (threads come from torch's pool, through the stable ABI's parallel_for)."""
    return _opt() + ["-std=c++20", "-fopenmp-simd", "-fvisibility=hidden"] + stable_abi_defines()


def nvcc_flags() -> list[str]:
    """Our nvcc flags; torch's extension build adds its COMMON_NVCC_FLAGS (no implicit
    half/bfloat16 conversions among them). tests/test_native_sources.py compiles with both."""
    return _opt() + ["-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo",
                     "-Xcompiler", "-fvisibility=hidden"] + stable_abi_defines()


def _extensions() -> list[Extension]:
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")] + include_paths(), library_dirs=[TORCH_LIB_PATH],
                  libraries=["torch_cpu"], py_limited_api=True, language="c++")
    exts = [Extension("piip_kernels._C", sources=_sources("*.cpp"), extra_compile_args={"cxx": cxx_flags()},
                      extra_link_args=["-Wl,--as-needed"], **common)]
    if _cuda_wanted():
        home = cuda_home()
        # torch's build compiles .cu files with $CUDA_HOME/bin/nvcc, and sets CUDA_HOME only
        # beside a CUDA build of torch.
        cpp_ext.CUDA_HOME = home
        cuda_lib = os.path.join(home, "lib64")
        exts.append(Extension(
            "piip_kernels._C_cuda", sources=_sources("*.cu"),
            extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()},
            # The CUDA runtime inside the binary: no libcudart.so to find at run time, and
            # none to clash with torch's. libdl for the stream-function lookup.
            extra_link_args=["-Wl,--as-needed", os.path.join(cuda_lib, "libcudart_static.a"), "-lrt", "-lpthread", "-ldl"],
            **common))
    return exts


if __name__ == "__main__":
    if _torch_version() < TORCH_TARGET:
        raise SystemExit(f"piip_kernels: the kernels build on the LibTorch stable ABI, which needs torch >= "
                         f"{TORCH_TARGET[0]}.{TORCH_TARGET[1]}; this environment has torch {torch.__version__}. "
                         "Upgrade torch, or use piip_kernels without its compiled kernels (reference and Triton backends).")
    print(f"piip_kernels: building with torch {torch.__version__} for torch >= {TORCH_TARGET[0]}.{TORCH_TARGET[1]}, "
          f"CUDA: {_cuda_wanted()}", file=sys.stderr)
    # An earlier build's version-specific modules (_C.cpython-311-*.so) would shadow the abi3 ones
    # this build writes in place: Python's import prefers the more specific suffix.
    for stale in glob.glob(os.path.join(ROOT, "piip_kernels", "_C*.cpython-*.so")):
        os.remove(stale)
    setup(
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
