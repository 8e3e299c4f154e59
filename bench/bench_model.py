"""Model-level benchmark: one training step (forward + backward + AdamW) of a preset, our
path against the official path, with the same weights.

    python bench/bench_model.py                       # CPU: TSB classification, TSB detection at 1/4 resolution
    python bench/bench_model.py --config deit_sbl_1568_1120_672 --batch 2 --dtype bfloat16   # GPU default
    python bench/bench_model.py --config tsb_368 --batch 4 --checkpointing --steps 5

Paths (piip.PIIP.set_execution):
  ours       fused deform_cross_attn in every interaction injector (our fastest backend) and
             the fused branch_merge
  official   what the official code runs: grid reference points, offsets and a softmax, then
             multi-scale deformable attention in fp32 (the Deformable DETR CUDA kernel when
             bench_msda finds it built, as bench/gpu_check.sh does; else grid_sample), and
             the eager interpolate-and-sum merge

For each path: the median step time over ``--steps`` timed steps after warm-up; the share of
the step spent in deformable attention and merging (profiler, one step: the forward ranges
around each injector's attention and the merge's resize-and-sum, plus the backward of the
sampling and resize ops: our fused ops', or grid_sample's, the DETR kernel's and bilinear
interpolation's; device time on a GPU, CPU time on the CPU, over the step's wall time);
the peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the
tensors alive before the step plus the highest running total of the profiler's allocation
events during it, see piip.memory.measure_cpu_step). Rows go to bench/results/model_<device>
(JSON lines and markdown) with device, versions and commit.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import budgeted, device_name, progress, report  # noqa: E402

import piip  # noqa: E402
from piip.memory import allocation_peak, resident_bytes  # noqa: E402

# What counts as deformable attention and merging: in the forward, the model's named ranges
# around each injector's attention (projections, offsets, softmax, sampling) and around the
# resize-and-sum of the merge, the same for both paths; in the backward, the sampling and
# resize ops themselves (their surrounding small ops carry generic names).
FORWARD_RANGES = ("piip.interaction_attention", "piip.branch_merge")
BACKWARD_OPS = {
    "ours": ("piip::deform_cross_attn_backward", "piip::ms_deform_attn_backward", "piip::branch_merge_backward"),
    "official": ("aten::grid_sampler_2d_backward", "aten::upsample_bilinear2d_backward", "DetrKernelBackward"),
}
COLUMNS = ["config", "path", "device", "dtype", "batch", "scale", "side", "checkpointing", "step_ms", "speedup",
           "msda_share", "peak_mem_mb", "peak_mem_source"]


def default_cases(device: torch.device):
    """(preset substring, batch, scale, dtype) per device type."""
    if device.type == "cuda":
        return [("mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16", 2, 1.0, "bfloat16")]
    return [("piip_3branch_tsb_368-192-128_cls_token_deit1", 2, 1.0, "float32"),
            ("mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16", 1, 0.25, "float32")]


def input_side(cfg, scale: float) -> int:
    """The last branch's resolution scaled, rounded to a multiple of the patch size."""
    p = cfg.branches[-1].patch_size
    return max(p, int(round(cfg.branches[-1].image_size * scale / p)) * p)


def loss_of(out, labels):
    if isinstance(out, list):  # detection pyramid: a loss that reaches every level
        return sum(o.float().square().mean() for o in out)
    return torch.nn.functional.cross_entropy(out.float(), labels)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def official_msda(device):
    """The attention the official code runs: the Deformable DETR kernel if built, else grid_sample."""
    if device.type == "cuda":
        from bench_msda import anchor_runner

        kernel = anchor_runner()
        if kernel is not None:
            return kernel, "Deformable DETR kernel"
    return None, "grid_sample (our reference backend)"


def profile_step(step, device, baseline_bytes: int, path: str):
    """One profiled step: (share of its time in sampling and merging, CPU peak bytes)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts, profile_memory=device.type == "cpu") as prof:
        step()
        _sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    names = FORWARD_RANGES + BACKWARD_OPS[path]
    spent = 0.0
    for evt in prof.key_averages():
        if evt.key in names:
            spent += (getattr(evt, "device_time_total", 0) or 0) if device.type == "cuda" else evt.cpu_time_total
    peak = baseline_bytes + allocation_peak(prof) if device.type == "cpu" else None
    return spent / wall_us, peak


def run_case(name: str, batch: int, scale: float, dtype: torch.dtype, device, checkpointing: bool, steps: int,
             warmup: int, paths) -> list[dict]:
    """Both paths on copies of one model (same weights), each with its own AdamW. The timed
    steps alternate between the paths, so a drift of the machine (clocks, other load) falls
    on both alike; the median per path is reported."""
    import copy

    cfg = piip.get_config(name)
    side = input_side(cfg, scale)
    torch.manual_seed(0)
    base_model = piip.create_model(name)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(batch, 3, side, side, generator=g).to(device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    runs = {}
    for i, path in enumerate(paths):
        model = (base_model if i == len(paths) - 1 else copy.deepcopy(base_model)).to(device)
        msda, msda_name = official_msda(device) if path == "official" else (None, "")
        model.set_execution(path, msda=msda)
        model.set_grad_checkpointing(checkpointing)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model=model, opt=opt):
            with autocast:
                loss = loss_of(model(img), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        runs[path] = (model, opt, step, msda_name)
        progress(f"  {name} [{path}{': ' + msda_name if msda_name else ''}] batch {batch} side {side} {str(dtype)[6:]}"
                 f"{' checkpointing' if checkpointing else ''}")
        for _ in range(warmup):
            step()
    times = {p: [] for p in paths}
    peak_gpu = {}
    for _ in range(steps):
        for path in paths:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            runs[path][2]()
            _sync(device)
            times[path].append((time.perf_counter() - t0) * 1e3)
            if device.type == "cuda":
                peak_gpu[path] = max(peak_gpu.get(path, 0), torch.cuda.max_memory_allocated(device))
    rows = []
    for path in paths:
        model, opt, step, msda_name = runs[path]
        base = resident_bytes(model, opt) + img.numel() * img.element_size()
        share, peak_cpu = profile_step(step, device, base, path)
        # On a GPU the other path's copy is resident too: its parameters and states are
        # subtracted so the figure is one path's own.
        other = sum(resident_bytes(m, o) for p2, (m, o, _, _) in runs.items() if p2 != path)
        peak = peak_gpu[path] - other if device.type == "cuda" else peak_cpu
        rows.append({"config": name, "path": path, "device": device_name(device), "dtype": str(dtype)[6:], "batch": batch,
                     "scale": scale, "side": side, "checkpointing": checkpointing, "step_ms": statistics.median(times[path]),
                     "step_ms_all": times[path], "msda_share": share, "peak_mem_mb": peak / 2 ** 20,
                     "peak_mem_source": "torch.cuda.max_memory_allocated (less the other path's model copy)"
                     if device.type == "cuda" else "tensors before the step + profiler allocation events (CPU)",
                     "official_attention": msda_name if path == "official" else None})
    by_path = {r["path"]: r for r in rows}
    if "ours" in by_path and "official" in by_path:
        by_path["ours"]["speedup"] = by_path["official"]["step_ms"] / by_path["ours"]["step_ms"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", action="append", default=[], help="preset (or unique substring); repeatable")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default per case)")
    ap.add_argument("--scale", type=float, default=None, help="input resolution scale (default per case)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="autocast dtype (default per case)")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--paths", nargs="+", default=["ours", "official"], choices=["ours", "official"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on the CPU, 10 on a GPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this many seconds")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cases = default_cases(device)
    if args.config:
        names = piip.list_models(paper_only=True)
        cases = []
        for c in args.config:
            match = [n for n in names if c == n] or [n for n in names if c in n]
            if len(match) != 1:
                ap.error(f"--config {c!r} matches {len(match)} presets: {match[:5]}")
            d = default_cases(device)[0]
            cases.append((match[0], d[1], d[2], d[3]))
    cases = [(n, args.batch or b, args.scale if args.scale is not None else s, args.dtype or d) for n, b, s, d in cases]
    steps = args.steps or (10 if device.type == "cuda" else 5)
    progress(f"device: {device_name(device)}")
    rows = []
    for name, batch, scale, dtype in budgeted(cases, args.budget_s, "cases"):
        rows += run_case(name, batch, scale, getattr(torch, dtype), device, args.checkpointing, steps, args.warmup, args.paths)
    report("model", device, rows, COLUMNS, not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
