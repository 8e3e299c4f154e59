"""Benchmark of the fused interaction cross-attention (deform_cross_attn) against the
unfused path on the PIIP shapes of bench/data/shapes.md.

    python bench/bench_interaction.py                  # GPU if present, else CPU (queries scaled to 1/4)
    python bench/bench_interaction.py --device cpu --batch 2 --dtype float32

Every path starts from the interaction's linear outputs (raw offsets and logits) and
ends with the sampled [N, Lq, M*D] tensor:
  fused      deform_cross_attn with the backend
  unfused    grid reference + offsets / (Wv, Hv), softmax, ms_deform_attn with the same backend
  eager      the unfused path on the plain-PyTorch reference (grid_sample)
Times are eager calls (``*_ms``) and, on a GPU, CUDA-graph replays (``*_gpu_ms``: the kernels
without the CPU's launch overhead, where the path can be captured).
Appends to bench/results/interaction_<device>.jsonl (device, versions, commit).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import budgeted, gpu_paths, progress, report, timer  # noqa: E402

import piip_kernels  # noqa: E402
from piip_kernels.dca.api import BACKENDS  # noqa: E402
from piip_kernels.dca.reference import grid_reference_points  # noqa: E402

# (name, query grid, value grid, head dim); 16 heads and 4 points throughout (shapes.md).
SHAPES = [
    ("TSB b3<-b2 4900q 98x98 D12", (70, 70), (98, 98), 12),
    ("TSB b2<-b1 9604q 70x70 D6", (98, 98), (70, 70), 6),
    ("SBL b1<-b2 1764q 70x70 D32", (42, 42), (70, 70), 32),
    ("SBL b2<-b3 4900q 98x98 D24", (70, 70), (98, 98), 24),
    ("SBL b2<-b1 4900q 42x42 D24", (70, 70), (42, 42), 24),
    ("SBL b3<-b2 9604q 70x70 D12", (98, 98), (70, 70), 12),
]
M, P = 16, 4


def unfused(backend):
    # The grid, scale and level tensors are made once per case, outside the timed call: made
    # inside it, their host-to-device copies would keep the path out of CUDA-graph capture
    # (the first GPU run timed it eagerly only) and add copies the kernels do not need.
    consts = {}

    def f(value, value_hw, offsets, logits, query_hw):
        key = (tuple(value_hw), tuple(query_hw), offsets.device, offsets.dtype)
        if key not in consts:
            consts[key] = (grid_reference_points(query_hw, offsets.device, offsets.dtype),
                           torch.tensor([value_hw[1], value_hw[0]], device=offsets.device, dtype=offsets.dtype),
                           torch.tensor([value_hw], device=value.device),
                           torch.zeros(1, dtype=torch.long, device=value.device))
        ref, scale, shapes, start = consts[key]
        loc = (ref[None, :, None, None, :] + offsets / scale)[:, :, :, None]
        w = logits.softmax(-1)[:, :, :, None]
        return piip_kernels.ms_deform_attn(value, shapes, start, loc, w, backend=backend)
    return f


def fused(backend):
    return lambda *a: piip_kernels.deform_cross_attn(*a, backend=backend)


def make_inputs(batch, query_hw, value_hw, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    Lq, S = query_hw[0] * query_hw[1], value_hw[0] * value_hw[1]
    value = torch.randn(batch, S, M, D, generator=g).to(device, dtype)
    off_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    offsets = (2.0 * torch.randn(batch, Lq, M, P, 2, generator=g)).to(device, off_dtype)
    logits = torch.randn(batch, Lq, M, P, generator=g).to(device, off_dtype)
    return value, offsets, logits


def bench(fn, inputs, value_hw, query_hw, device, backward, graph=False):
    """Median ms of one eager call, or with `graph` of its CUDA-graph replay (None if not capturable)."""
    measure = timer(device, graph)
    value, offsets, logits = inputs
    if not backward:
        with torch.no_grad():
            return measure(lambda: fn(value, value_hw, offsets, logits, query_hw))
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    grad = torch.randn(value.shape[0], offsets.shape[1], M * value.shape[3], device=device, dtype=value.dtype)
    return measure(lambda: torch.autograd.grad(fn(leaves[0], value_hw, leaves[1], leaves[2], query_hw), leaves, grad))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--query-scale", type=float, default=None, help="scale both grids' sides by sqrt of this (default 1 on a GPU, 0.25 on the CPU)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting cases after this many seconds")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    scale = args.query_scale if args.query_scale is not None else (1.0 if gpu else 0.25)
    side = scale ** 0.5
    backends = [b for b in ("cuda", "triton", "cpu") if not BACKENDS[b](device, dtype)]
    rows = []
    gpu_timing = gpu_paths(device)  # CUDA-graph replays beside the eager calls (stood in for in the dry run)
    for name, qhw, vhw, D in budgeted(SHAPES, args.budget_s, "cases"):
        qhw = tuple(max(1, round(s * side)) for s in qhw)
        vhw = tuple(max(1, round(s * side)) for s in vhw)
        inputs = make_inputs(args.batch, qhw, vhw, D, dtype, device, 0)
        paths = {"eager (reference)": unfused("reference")}
        for b in backends:
            paths[f"unfused ({b})"] = unfused(b)
            paths[f"fused ({b})"] = fused(b)
        times, gpu = {}, {}
        for label, fn in paths.items():
            progress(f"  {name} q{qhw} v{vhw}: {label}")
            times[label] = (bench(fn, inputs, vhw, qhw, device, False), bench(fn, inputs, vhw, qhw, device, True))
            if gpu_timing and label != "eager (reference)":
                gpu[label] = bench(fn, inputs, vhw, qhw, device, True, graph=True)
        for label, (fwd, fb) in times.items():
            row = {"case": name, "query_hw": f"{qhw[0]}x{qhw[1]}", "value_hw": f"{vhw[0]}x{vhw[1]}", "batch": args.batch,
                   "dtype": str(dtype)[6:], "path": label, "fwd_ms": fwd, "fwd_bwd_ms": fb, "fwd_bwd_gpu_ms": gpu.get(label),
                   "fwd_bwd_vs_eager": times["eager (reference)"][1] / fb}
            b = label[label.find("(") + 1:-1]
            if label.startswith("fused") and f"unfused ({b})" in times:
                row["fwd_bwd_vs_unfused_same_backend"] = times[f"unfused ({b})"][1] / fb
                if gpu.get(label) and gpu.get(f"unfused ({b})"):
                    # The kernels alone: the unfused path's extra small ops cost GPU time, not just launches.
                    row["fwd_bwd_gpu_vs_unfused_same_backend"] = gpu[f"unfused ({b})"] / gpu[label]
            rows.append(row)
    cols = ["case", "query_hw", "value_hw", "dtype", "path", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_gpu_ms", "fwd_bwd_vs_eager",
            "fwd_bwd_vs_unfused_same_backend", "fwd_bwd_gpu_vs_unfused_same_backend"]
    report("interaction", device, rows, cols, not args.no_save)
    return rows


if __name__ == "__main__":
    main()
