"""CPU micro-benchmarks of multi-scale deformable attention (pytest-benchmark).

    pytest bench/ --benchmark-only

One PIIP interaction shape (SBL, 70x70 value grid, head dim 12) scaled to run in
milliseconds; forward and forward+backward for the reference and the C++ backend.
"""
import pytest
import torch

import piip_kernels
from bench_msda import make_inputs
from piip_kernels.msda.api import BACKENDS

AVAILABLE = [b for b in ("reference", "cpu") if not BACKENDS[b](torch.device("cpu"), torch.float32)]


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(2, 600, [(70, 70)], 16, 12, 4, torch.float32, torch.device("cpu"), seed=0)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_forward(benchmark, inputs, backend):
    with torch.no_grad():
        benchmark(piip_kernels.ms_deform_attn, *inputs, backend=backend)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_forward_backward(benchmark, inputs, backend):
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().requires_grad_(True) for t in (value, loc, attn)]

    def step():
        out = piip_kernels.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
        return torch.autograd.grad(out.sum(), leaves)

    benchmark(step)
