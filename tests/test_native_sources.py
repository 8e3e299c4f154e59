"""The torch-free kernel headers compile for the GPU (sm_90) with nvcc alone.

CUDA kernels share csrc/msda/msda_math.h with the CPU kernels; this checks that
every function in it is usable from device code, without a GPU or CUDA torch.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")

PROBE = r"""
#include "msda/msda_math.h"
using namespace piip::msda;
template <typename acc_t>
__global__ void probe(const acc_t* xy, acc_t* out) {
  Bilinear<acc_t> b;
  acc_t s[4] = {1, 2, 3, 4}, ga = 0, gx = 0, gy = 0;
  if (make_bilinear<acc_t>(xy[0], xy[1], 7, 5, b)) point_grads<acc_t>(b, s, acc_t(0.5), 7, 5, ga, gx, gy);
  out[0] = ga + gx + gy + b.w[0];
}
template __global__ void probe<float>(const float*, float*);
template __global__ void probe<double>(const double*, double*);
"""


@pytest.mark.skipif(NVCC is None and os.environ.get("PIIP_REQUIRE_NVCC") != "1", reason="nvcc not on PATH")
def test_shared_math_header_compiles_for_sm90(tmp_path):
    src = tmp_path / "probe.cu"
    src.write_text(PROBE)
    cmd = [NVCC or "nvcc", "-c", "-std=c++17", "-arch=sm_90", "-I", str(CSRC), str(src), "-o", str(tmp_path / "probe.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr

