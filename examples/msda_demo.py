"""A first look at piip_kernels: which backends run here, and multi-scale deformable
attention on a Deformable-DETR-like input with each of them (output, gradient, time)."""
import time

import torch

import piip_kernels
from piip_kernels.msda.api import BACKENDS


def main():
    piip_kernels.backend_report()
    torch.manual_seed(0)
    grids = [(32, 48), (16, 24), (8, 12), (4, 6)]  # 4 levels, like a detector's FPN at 1/8..1/64
    N, M, D, P, Lq = 2, 8, 32, 4, 1000
    shapes = torch.tensor(grids)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    value = torch.randn(N, int((shapes[:, 0] * shapes[:, 1]).sum()), M, D, requires_grad=True)
    loc = torch.rand(N, Lq, M, len(grids), P, 2, requires_grad=True)
    attn = torch.rand(N, Lq, M, len(grids), P).softmax(-1).requires_grad_()
    print(f"\nvalue {tuple(value.shape)}, {Lq} queries, {M} heads x {D} channels, {len(grids)} levels x {P} points")
    ref = None
    for name in ("reference", "cpu", "cuda", "triton"):
        if BACKENDS[name](value.device, value.dtype):
            continue
        def run():
            out = piip_kernels.ms_deform_attn(value, shapes, starts, loc, attn, backend=name)
            return out, torch.autograd.grad(out.square().sum(), (value, loc, attn))

        run()  # warm-up: the first call of the process also loads torch's compile machinery
        t0 = time.perf_counter()
        out, grads = run()
        ms = (time.perf_counter() - t0) * 1e3
        if ref is None:
            ref = (out, grads)
        diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip((out, *grads), (ref[0], *ref[1])))
        print(f"  {name:<10} forward+backward {ms:8.2f} ms   largest difference to reference {diff:.1e} (relative to max |value|)")


if __name__ == "__main__":
    main()
