"""Benchmark of branch_merge against eager PyTorch on the cases of bench/data/shapes.md.

    python bench/bench_branch_merge.py                 # GPU if present, else CPU (channels / 8)
    python bench/bench_branch_merge.py --device cpu --channel-scale 0.125

eager = ``sum(w_i * F.interpolate(f_i, size, bilinear))`` in the maps' dtype, what a
user writes (and what shapes.md timed). The weights have the maps' dtype, so every path
writes its output in that dtype. The memory floor is the bytes of the inputs read and
the output written once, over the copy bandwidth measured in the same run (shapes.md's
definition), from the CUDA-graph replay time (``fwd_gpu_ms``, the kernels alone) on a GPU.
Appends to bench/results/branch_merge_<device>.jsonl (device, versions, commit).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import budgeted, copy_bandwidth_gbs, device_name, gpu_paths, progress, report, timer  # noqa: E402

import piip_kernels  # noqa: E402
from piip_kernels.merge.api import BACKENDS  # noqa: E402

# (name, batch, channels, grids: finest last)
CASES = [
    ("SBL det", 2, 1024, [42, 70, 98]),
    ("8x256 pyramid", 8, 256, [28, 56, 112]),
]


def eager(features, weights, out_size):
    return sum(w * F.interpolate(f, size=out_size, mode="bilinear", align_corners=False)
               for f, w in zip(features, weights))


def bench(fn, feats, weights, out_size, device, backward, graph=False):
    """Median ms of one eager call, or with `graph` of its CUDA-graph replay (None if not capturable)."""
    measure = timer(device, graph)
    if not backward:
        with torch.no_grad():
            return measure(lambda: fn(feats, weights, out_size))
    leaves = [f.detach().requires_grad_(True) for f in feats] + [weights.detach().requires_grad_(True)]
    grad = torch.randn(feats[0].shape[0], feats[0].shape[1], *out_size, device=device, dtype=weights.dtype)
    return measure(lambda: torch.autograd.grad(fn(leaves[:-1], leaves[-1], out_size), leaves, grad))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=None, help="default float32 bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--channel-scale", type=float, default=None, help="default 1 on a GPU, 1/8 on the CPU")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting cases after this many seconds")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtypes = [getattr(torch, d) for d in (args.dtype or (["float32", "bfloat16"] if gpu else ["float32"]))]
    cscale = args.channel_scale if args.channel_scale is not None else (1.0 if gpu else 0.125)
    bw = copy_bandwidth_gbs(device)
    progress(f"device: {device_name(device)}; copy bandwidth {bw:.0f} GB/s")
    rows = []
    for dtype, (name, batch, C, grids) in budgeted([(d, c) for d in dtypes for c in CASES], args.budget_s):
        backends = [b for b in ("cuda", "triton", "cpu") if not BACKENDS[b](device, dtype)]
        C = max(1, round(C * cscale))
        g = torch.Generator().manual_seed(0)
        feats = [torch.randn(batch, C, s, s, generator=g).to(device, dtype) for s in grids]
        weights = torch.rand(len(grids), generator=g).to(device, dtype)
        out_size = (grids[-1], grids[-1])
        out_bytes = batch * C * grids[-1] ** 2 * feats[0].element_size()
        floor_ms = (sum(f.numel() * f.element_size() for f in feats) + out_bytes) / (bw * 1e9) * 1e3
        paths = {"eager": eager}
        for b in backends:
            paths[f"branch_merge ({b})"] = (lambda b: lambda f, w, s: piip_kernels.branch_merge(f, w, s, backend=b))(b)
        times, gpu_fwd = {}, {}
        for label, fn in paths.items():
            progress(f"  {name} C{C} {str(dtype)[6:]}: {label}")
            times[label] = (bench(fn, feats, weights, out_size, device, False), bench(fn, feats, weights, out_size, device, True))
            if gpu_paths(device):  # CUDA-graph replays (stood in for in the dry run)
                gpu_fwd[label] = bench(fn, feats, weights, out_size, device, False, graph=True)
        for label, (fwd, fb) in times.items():
            kernel = gpu_fwd.get(label) or fwd
            rows.append({"case": name, "batch": batch, "channels": C, "grids": "/".join(map(str, grids)), "dtype": str(dtype)[6:],
                         "path": label, "fwd_ms": fwd, "fwd_bwd_ms": fb, "fwd_gpu_ms": gpu_fwd.get(label),
                         "fwd_x_floor": kernel / floor_ms,
                         "fwd_vs_eager": times["eager"][0] / fwd, "fwd_bwd_vs_eager": times["eager"][1] / fb})
    cols = ["case", "batch", "channels", "grids", "dtype", "path", "fwd_ms", "fwd_bwd_ms", "fwd_gpu_ms", "fwd_x_floor", "fwd_vs_eager",
            "fwd_bwd_vs_eager"]
    report("branch_merge", device, rows, cols, not args.no_save, bw)
    return rows


if __name__ == "__main__":
    main()
