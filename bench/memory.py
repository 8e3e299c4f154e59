"""Training-memory planner: peak memory per GPU of one training step of any preset.

    python bench/memory.py                                   # every preset: batch 1, bf16, one GPU
    python bench/memory.py --config h6b_1024_512 --batch 1 2 --checkpointing both --world-size 1 8
    python bench/memory.py --config tsb_1568 --side 1024 --dtype float32 --json plan.json --markdown plan.md

For each case it prints parameters, gradients, AdamW states, activations (everything else
alive at the backward's peak), FSDP2's unsharded working set, and the total per rank in GiB,
computed on fake tensors (piip.memory.plan_memory): nothing is allocated, a full-size preset
takes seconds. FSDP sharding (world size > 1) follows piip.distributed.apply_fsdp: fp32
shards of parameters, gradients and optimizer states, units of one transformer block or one
interaction unit gathered in the compute dtype.

Not modelled (see piip.memory): allocator fragmentation and cached-but-free blocks,
cuBLAS/cuDNN workspaces beyond one convolution's copies, NCCL buffers, the CUDA context
(about 0.5 GiB), and the detector's neck and heads, which this package does not include.
``--gpu-gib`` (default 80) marks the cases that fit with 10 % of headroom.

``--validate`` also runs each case for real on ``--device`` (one warm-up step, then one
measured step of forward, backward and AdamW) and prints the measured peak beside the plan:
torch.cuda.max_memory_allocated on a GPU, the profiler's allocation events on the CPU
(piip.memory.measure_cpu_step). Results go to bench/results/memory_validation_<device>.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import piip  # noqa: E402
from common import positive, render_grid  # noqa: E402
from piip.memory import plan_memory  # noqa: E402

GIB = 2 ** 30
COLUMNS = ["config", "batch", "side", "dtype", "ckpt", "world", "params", "grads", "optim", "activations", "fsdp", "total", "peak in", "fits"]


def rows_for(names, batches, sides, dtypes, ckpts, worlds, gpu_gib, progress=True):
    cases = [(n, b, s, d, c) for n in names for b in batches for s in sides for d in dtypes for c in ckpts]
    rows, t0 = [], time.time()
    for i, (name, batch, side, dtype, ckpt) in enumerate(cases):
        if progress:
            print(f"[{i + 1}/{len(cases)}] {name} batch {batch} {dtype}{' checkpointing' if ckpt else ''} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        for w in worlds:
            p = plan_memory(name, batch=batch, side=side, dtype=dtype, checkpointing=ckpt, world_size=w)
            p["fits"] = p["total"] * 1.1 <= gpu_gib * GIB
            rows.append(p)
    return rows


def table(rows, markdown=False, gpu_gib=80):
    def cells(r):
        g = lambda k: f"{r[k] / GIB:.2f}"  # noqa: E731
        return [r["config"], str(r["batch"]), str(r["side"]), r["dtype"], "yes" if r["checkpointing"] else "no", str(r["world_size"]),
                g("parameters"), g("gradients"), g("optimizer_states"), g("activations"), g("fsdp_unsharded"), g("total"),
                r["peak_phase"], "yes" if r["fits"] else "no"]
    body = [cells(r) for r in rows]
    head = [c if c != "fits" else f"fits {gpu_gib} GiB" for c in COLUMNS]
    return "\n".join(render_grid(head, body, markdown))


def measure(name: str, batch: int, side: int, dtype: torch.dtype, checkpointing: bool, device: torch.device) -> int:
    """Measured peak bytes of one real training step after a warm-up step."""
    from piip.memory import measure_cpu_step, train_step

    torch.manual_seed(0)
    model = piip.create_model(name).to(device)
    model.set_grad_checkpointing(checkpointing)
    img = torch.randn(batch, 3, side, side, device=device)
    if device.type == "cpu":
        return measure_cpu_step(model, img, dtype)["total"]
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    train_step(model, img, opt, dtype)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_step(model, img, opt, dtype)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def validate(rows, device: torch.device) -> list[dict]:
    from common import report

    out = []
    for r in rows:
        dtype = getattr(torch, r["dtype"])
        got = measure(r["config"], r["batch"], r["side"], dtype, r["checkpointing"], device)
        out.append({"config": r["config"], "batch": r["batch"], "side": r["side"], "dtype": r["dtype"],
                    "checkpointing": r["checkpointing"], "planned_gib": r["total"] / GIB, "measured_gib": got / GIB,
                    "plan_over_measured": r["total"] / got,
                    "measured_with": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "profiler allocation events"})
    report("memory_validation", device, out, list(out[0]) if out else [])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="presets whose name contains this (repeatable; default all)")
    ap.add_argument("--batch", type=positive(int), nargs="+", default=[1], help="images per GPU")
    ap.add_argument("--side", type=positive(int), nargs="+", default=[None],
                    help="input side (default: the preset's largest resolution)")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16", "float16"], help="autocast dtype")
    ap.add_argument("--checkpointing", choices=["no", "yes", "both"], default="no")
    ap.add_argument("--world-size", type=positive(int), nargs="+", default=[1], help="FSDP world sizes (1: no sharding)")
    ap.add_argument("--gpu-gib", type=positive(float), default=80.0, help="GPU memory for the 'fits' column")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--markdown", metavar="PATH")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--validate", action="store_true", help="measure each case for real and compare (world size 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --validate")
    args = ap.parse_args(argv)
    names = piip.list_models(include_paper_only=True) if args.config else piip.list_models()
    if args.config:
        names = [n for n in names if any(c in n for c in args.config)]
        if not names:
            ap.error(f"no preset matches {args.config}; see piip.list_models()")
    ckpts = {"no": [False], "yes": [True], "both": [False, True]}[args.checkpointing]
    rows = rows_for(names, args.batch, args.side, args.dtype, ckpts, args.world_size, args.gpu_gib, not args.quiet)
    print(table(rows, gpu_gib=args.gpu_gib))
    if args.validate:
        validate([r for r in rows if r["world_size"] == 1], torch.device(args.device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items()} for r in rows], f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table(rows, markdown=True, gpu_gib=args.gpu_gib) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
