"""Small forward + backward calls of all three ops on both GPU backends, for
compute-sanitizer (bench/gpu_check.sh runs this under ``compute-sanitizer --tool memcheck``).

    python bench/memcheck_cases.py                  # cuda
    python bench/memcheck_cases.py --device meta    # the CPU dry run: the same calls on fake kernels

Awkward sizes on purpose: odd grids, locations outside the map, head dims that are not
powers of two, both accumulation modes of the backward.
"""
from __future__ import annotations

import argparse

import torch

import piip_kernels


def run(device: torch.device) -> int:
    """Runs every case on `device`; returns the number of op calls made (forward and backward)."""
    g = torch.Generator().manual_seed(0)
    calls = 0
    for backend in ("cuda", "triton"):
        for det in (False, True):
            v = torch.randn(2, 7 * 11 + 15, 3, 40, generator=g).to(device).requires_grad_()
            loc = (torch.rand(2, 9, 3, 2, 4, 2, generator=g) * 1.6 - 0.3).to(device).requires_grad_()
            w = torch.rand(2, 9, 3, 2, 4, generator=g).to(device).requires_grad_()
            shapes = torch.tensor([[7, 11], [3, 5]]).to(device)
            starts = torch.tensor([0, 77]).to(device)
            out = piip_kernels.ms_deform_attn(v, shapes, starts, loc, w, backend=backend, deterministic=det)
            torch.autograd.grad(out.sum(), (v, loc, w))
            value = torch.randn(2, 5 * 7, 4, 24, generator=g).to(device).requires_grad_()
            off = torch.randn(2, 3 * 4, 4, 4, 2, generator=g).mul(3).to(device).requires_grad_()
            logits = torch.randn(2, 3 * 4, 4, 4, generator=g).to(device).requires_grad_()
            out = piip_kernels.deform_cross_attn(value, (5, 7), off, logits, (3, 4), backend=backend, deterministic=det)
            torch.autograd.grad(out.sum(), (value, off, logits))
            calls += 4
        feats = [torch.randn(2, 8, s, s + 1, generator=g).to(device).requires_grad_() for s in (3, 5, 9)]
        wts = torch.rand(3, generator=g).to(device).requires_grad_()
        out = piip_kernels.branch_merge(feats, wts, (9, 10), backend=backend)
        torch.autograd.grad(out.sum(), feats + [wts])
        calls += 2
    if device.type == "cuda":
        torch.cuda.synchronize()
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    print(f"memcheck cases done: {run(torch.device(args.device))} op calls on {args.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
