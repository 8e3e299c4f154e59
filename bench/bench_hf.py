"""Hugging Face transformers detectors: one training step (forward, backward, AdamW) with
random weights, transformers' default path against ours (piip_kernels.hf.use_in_transformers)
and, where built, the Deformable DETR CUDA kernel (what transformers' hub kernel serves).

    python bench/bench_hf.py                         # GPU if present, else CPU
    python bench/bench_hf.py --device cpu --wait-idle 600   # the committed CPU rows (a shared machine)
    python bench/bench_hf.py --models deformable_detr --size 512x640 --batch 1 --steps 3
    python bench/bench_hf.py --tiny --device cpu     # tiny configs: a dry run in seconds (saved only under $PIIP_RESULTS_DIR)

Models (random weights; no downloads, no timm):
  deformable_detr  Deformable DETR, ResNet-50 backbone, 6+6 layers, 300 queries: a large
                   deformable-attention share (the encoder attends over every pixel of 4 levels);
  mask2former      Mask2Former with a Swin-T-sized backbone: the pixel decoder's 6 deformable
                   layers (Mask2FormerModel: the segmentation head's loss needs scipy);
  rt_detr          RT-DETR, ResNet-50 backbone: deformable attention in the decoder only, a
                   small share of the step (reported as such).

Paths, on copies of one model (same weights), each with its own AdamW; the timed steps
alternate between them, so a drift of the machine falls on all alike; the median is kept:
  ours       use_in_transformers: our kernels (C++ on the CPU, CUDA/Triton on a GPU);
  default    transformers' own code, grid_sample (a model built from its config does not
             fetch the hub kernel; the third path is that kernel);
  detr kernel  the Deformable DETR CUDA extension (bench_msda.anchor_runner, built by
             bench/gpu_check.sh), in fp32 as its wrappers run it. With PIIP_ANCHOR_STANDIN=1
             (the CPU dry run) a stand-in built from our reference takes its place, labelled
             as such; no target reads it.
The loss is the mean square of every floating output (Hungarian matching would need scipy
and adds nothing to what is compared).

For each path: the median step time, the speed-up over the default path (``speedup``; on
our row also ``vs_detr_live``, over the DETR kernel timed in the same run, or
``vs_detr_standin``, which no target reads), and the share of the step in deformable
attention (profiler, one step): the forward ranges around each deformable attention block
(projections, offsets, softmax, sampling), plus the backward of the sampling op (ours,
grid_sample's, the DETR kernel's); device time on a GPU, CPU time on the CPU, over the
step's wall time. On the CPU, ``others_cpu`` is the share of the machine's CPU time other
processes took during the timed steps (a shared machine's load falls unevenly on the paths:
rows with more than a few percent are not comparable; ``--wait-idle S`` waits for an idle
machine before each case and runs a disturbed round of steps again, ``rounds_redone``).
Rows go to bench/results/hf_<device> with device, versions and commit.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import budgeted, device_name, progress, report, sync  # noqa: E402

import piip_kernels.hf as hf  # noqa: E402

BLOCK_RANGE = "hf.deformable_attention"  # forward range around each deformable attention block
BACKWARD_OPS = {"ours": ("piip::ms_deform_attn_backward",), "default": ("aten::grid_sampler_2d_backward",),
                "detr kernel": ("DetrKernelBackward",)}
COLUMNS = ["model", "path", "attention", "size", "batch", "dtype", "step_ms", "speedup", "vs_detr_live", "msda_share", "others_cpu",
           "note"]
MODELS = ("deformable_detr", "mask2former", "rt_detr")
REDO_ABOVE, MAX_REDONE = 0.05, 20  # --wait-idle: rounds disturbed by other processes are run again
NOTES = {"rt_detr": "deformable attention in the decoder only (a small share)"}


# ---------------------------------------------------------------------------------------------
# Models: the real sizes, or tiny ones for dry runs

def deformable_detr(tiny: bool):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    stages = ["stage2", "stage3", "stage4"]
    if tiny:
        backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
                                out_features=stages)
        sizes = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                     encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, num_feature_levels=3,
                     encoder_n_points=2, decoder_n_points=2)
    else:  # ResNet-50 (transformers' default ResNetConfig) and Deformable DETR's defaults
        backbone, sizes = ResNetConfig(out_features=stages), {}
    config = DeformableDetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, **sizes)
    return DeformableDetrForObjectDetection(config)


def mask2former(tiny: bool):
    from transformers import Mask2FormerConfig, Mask2FormerModel, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if tiny:
        backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2, out_features=stages)
        sizes = dict(feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=16, encoder_layers=1,
                     decoder_layers=2, num_attention_heads=2, dim_feedforward=16, num_queries=10)
    else:  # Swin-T; Mask2Former's defaults (6 deformable pixel-decoder layers, 10 decoder layers, 100 queries)
        backbone = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.3,
                              out_features=stages)
        sizes = {}
    return Mask2FormerModel(Mask2FormerConfig(backbone_config=backbone, use_auxiliary_loss=False, **sizes))


def rt_detr(tiny: bool):
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    if tiny:
        backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
                                      out_indices=[2, 3, 4])
        sizes = dict(encoder_hidden_dim=16, encoder_in_channels=[16, 16, 16], encoder_ffn_dim=16, encoder_attention_heads=2,
                     d_model=16, num_queries=10, decoder_in_channels=[16, 16, 16], decoder_ffn_dim=16, decoder_layers=2,
                     decoder_attention_heads=2)
    else:  # ResNet-50-vd (transformers' default RTDetrResNetConfig) and RT-DETR's defaults
        backbone, sizes = RTDetrResNetConfig(out_indices=[2, 3, 4]), {}
    return RTDetrForObjectDetection(RTDetrConfig(backbone_config=backbone, **sizes))


BUILDERS = {"deformable_detr": deformable_detr, "mask2former": mask2former, "rt_detr": rt_detr}


def default_cases(device: torch.device, tiny: bool):
    """(model, batch, (H, W), dtype) per device type."""
    if tiny:
        return [(m, 1, (64, 64), "float32") for m in MODELS]
    if device.type == "cuda":
        return [("deformable_detr", 2, (800, 1066), "float32"), ("mask2former", 2, (512, 512), "float32"),
                ("rt_detr", 2, (640, 640), "float32")]
    return [("deformable_detr", 1, (512, 640), "float32"), ("mask2former", 1, (384, 384), "float32"),
            ("rt_detr", 1, (480, 480), "float32")]


# ---------------------------------------------------------------------------------------------
# Paths

def detr_kernel(device: torch.device):
    """The third path's core, (value, shapes, starts, loc, attn) -> out in fp32 as the
    kernel's wrappers run it, with (label, stand-in); None where it is not built (or, on the
    CPU, unless the dry run's stand-in is asked for)."""
    from bench_msda import anchor_for

    kernel = anchor_for(device)
    if kernel is None:
        return None

    def core(value, shapes, starts, loc, attn):
        return kernel(value.float(), shapes, starts, loc.float(), attn.float()).to(value.dtype)

    return core, kernel.label, kernel.standin


def float_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in float_outputs(item)]
    return []


def loss_of(out) -> torch.Tensor:
    return sum(t.float().masked_fill(~t.isfinite(), 0).square().mean() for t in float_outputs(out) if t.requires_grad)


def _jiffies() -> tuple[int, int, int] | None:
    """(busy, total) CPU time of the whole machine and this process's own, in clock ticks
    (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks), int(own[11]) + int(own[12])  # utime + stime


def others_busy(since) -> float | None:
    """The share of the machine's CPU time that other processes used since ``since`` (a
    _jiffies() reading): a shared machine's load, which falls unevenly on the timed paths."""
    now = _jiffies()
    if since is None or now is None or now[1] == since[1]:
        return None
    return max(0.0, ((now[0] - since[0]) - (now[2] - since[2])) / (now[1] - since[1]))


def wait_idle(max_s: float, busy: float = 0.1, window_s: float = 5.0) -> None:
    """Waits (at most max_s) until other processes use less than ``busy`` of the CPUs over
    ``window_s`` (on shared machines, before each case)."""
    deadline = time.monotonic() + max_s
    while True:
        start = _jiffies()
        time.sleep(window_s)
        share = others_busy(start)
        if share is None or share < busy:
            return
        if time.monotonic() > deadline:
            progress(f"  other processes still use {share:.0%} of the CPUs after {max_s:.0f} s of waiting: measuring anyway")
            return
        progress(f"  other processes use {share:.0%} of the CPUs: waiting")


def protocol_arguments(ap: argparse.ArgumentParser, waits: str) -> None:
    """--budget-s, --wait-idle (``waits``: when it waits) and --no-save, as the benchmarks that
    time interleaved rounds take them."""
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this many seconds")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help=f"shared machines: {waits}, wait up to S s for other processes to leave the CPUs idle, and run "
                         "again a round they disturbed (above 5%% of the CPUs)")
    ap.add_argument("--no-save", action="store_true")


def interleaved_rounds(paths: dict, steps: int, device: torch.device, wait_s: float, name: str):
    """Timed rounds, one step of each path per round (``paths``: name -> (step, switch), the
    switch held around the path's step, outside nothing else), so a drift of the machine
    falls on all paths alike. With ``wait_s`` (the CPU on a shared machine) a round during
    which other processes took more than REDO_ABOVE of the CPUs is discarded and run again,
    after waiting for an idle machine (at most MAX_REDONE times).

    Returns (ms per path: a list per round, other processes' CPU share per kept round, rounds redone)."""
    times = {p: [] for p in paths}
    busy, redone = [], 0
    while len(busy) < steps:
        start = _jiffies()
        took = {}
        for path, (step, switch) in paths.items():
            with switch():
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                took[path] = (time.perf_counter() - t0) * 1e3
        others = others_busy(start) if device.type == "cpu" else None
        line = f"  {name} step {len(busy) + 1}/{steps}: " + ", ".join(f"{p} {t:.0f} ms" for p, t in took.items())
        if wait_s and others is not None and others > REDO_ABOVE and redone < MAX_REDONE:
            # Other processes took CPUs during this round: it falls unevenly on the paths.
            redone += 1
            progress(f"{line}; other processes took {others:.0%} of the CPUs: round discarded ({redone})")
            wait_idle(wait_s)
            continue
        busy.append(others)
        for path, t in took.items():
            times[path].append(t)
        progress(line)
    return times, busy, redone


def blocks(model):
    """The deformable attention blocks: the modules that own the sampling-offset projection."""
    return [m for m in model.modules() if isinstance(getattr(m, "sampling_offsets", None), torch.nn.Linear)]


def profile_share(step, model, device, path: str) -> float:
    """One profiled step: the share of its time in deformable attention (module docstring)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    ranges = {}

    def enter(module, args):
        ranges[id(module)] = record_function(BLOCK_RANGE).__enter__()

    def leave(module, args, out):
        ranges.pop(id(module)).__exit__(None, None, None)

    hooks = [h for m in blocks(model) for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        sync(device)
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            step()
            sync(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    finally:
        for h in hooks:
            h.remove()
    names = (BLOCK_RANGE,) + BACKWARD_OPS[path]
    spent = sum(((getattr(e, "device_time_total", 0) or 0) if device.type == "cuda" else e.cpu_time_total)
                for e in prof.key_averages() if e.key in names)
    return spent / wall_us


def share(step, switch, model, device, path: str) -> float:
    with switch():
        return profile_share(step, model, device, path)


def run_case(name: str, batch: int, size: tuple[int, int], dtype: torch.dtype, device, steps: int, warmup: int,
             tiny: bool, wait_s: float = 0.0) -> list[dict]:
    """The paths on copies of one model; the timed steps alternate between them (a round:
    one step of each). A path's switch is held only around its own steps (and outside their
    timings): Mask2Former's module-level function is rebound for the whole family while a
    handle is held. With ``wait_s`` (the CPU on a shared machine) a round during which other
    processes took more than REDO_ABOVE of the CPUs is discarded and run again, after
    waiting for an idle machine (at most MAX_REDONE times; rows say how many)."""
    torch.manual_seed(0)
    base = BUILDERS[name](tiny)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, *size, generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    third = detr_kernel(device)
    paths = {"ours": (None, "ours (piip_kernels)"), "default": (None, "transformers (grid_sample)")}
    if third is not None:
        paths["detr kernel"] = (third[0], third[1])
    runs = {}
    for i, (path, (msda, label)) in enumerate(paths.items()):
        model = (base if i == len(paths) - 1 else copy.deepcopy(base)).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model=model, opt=opt):
            with autocast:
                loss = loss_of(model(pixel_values=pixels))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def switch(model=model, path=path, msda=msda):
            """Our switch for this path, held around its steps (outside the timings)."""
            return hf.use_in_transformers(model, msda=msda) if path != "default" else contextlib.nullcontext()

        runs[path] = (model, step, switch, label)
        progress(f"  {name} [{label}] batch {batch} {size[0]}x{size[1]} {str(dtype)[6:]}: {warmup} warm-up step(s)")
        with switch():
            for _ in range(warmup):
                step()
    times, busy, redone = interleaved_rounds({path: (step, switch) for path, (_, step, switch, _) in runs.items()}, steps,
                                             device, wait_s, name)
    if wait_s and device.type == "cpu":
        wait_idle(wait_s)  # before the profiled steps
    others = max((b for b in busy if b is not None), default=None)
    rows = []
    for path, (model, step, switch, label) in runs.items():
        note = [NOTES[name]] if name in NOTES else []
        if path == "detr kernel" and third[2]:
            note.append("stand-in built from our reference, not the Deformable DETR kernel")
        rows.append({"case": f"{name} {size[0]}x{size[1]}", "model": name, "path": path, "attention": label, "size": f"{size[0]}x{size[1]}", "batch": batch,
                     "dtype": str(dtype)[6:], "device": device_name(device), "step_ms": statistics.median(times[path]),
                     "step_ms_all": times[path], "msda_share": share(step, switch, model, device, path), "note": "; ".join(note),
                     "others_cpu": others, "rounds_redone": redone, "tiny": tiny})
    by_path = {r["path"]: r for r in rows}
    for row in rows:
        if row["path"] != "default":
            row["speedup"] = by_path["default"]["step_ms"] / row["step_ms"]
    if "detr kernel" in by_path:
        key = "vs_detr_standin" if third[2] else "vs_detr_live"  # no target reads a stand-in's ratio
        by_path["ours"][key] = by_path["detr kernel"]["step_ms"] / by_path["ours"]["step_ms"]
    return rows


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    try:
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW or S, got {text!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=None, help="default: all three")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default per case)")
    ap.add_argument("--size", type=_size, default=None, help="input HxW (default per case)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="autocast dtype (default float32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per path (default 5 on the CPU, 6 on a GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per path (default 1 on the CPU, 2 on a GPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs at 64x64, one thread: a dry run (nothing saved)")
    protocol_arguments(ap, "before each case and its profiled steps")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.tiny:
        # Tiny models spend their time starting OpenMP teams, which stalls on a busy machine.
        torch.set_num_threads(1)
    cases = [c for c in default_cases(device, args.tiny) if args.models is None or c[0] in args.models]
    cases = [(m, args.batch or b, args.size or s, args.dtype or d) for m, b, s, d in cases]
    gpu = device.type == "cuda"
    steps = args.steps or (1 if args.tiny else 6 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny or not gpu else 2)
    progress(f"device: {device_name(device)}")
    rows = []
    for name, batch, size, dtype in budgeted(cases, args.budget_s, "cases"):
        if args.wait_idle:
            wait_idle(args.wait_idle)
        rows += run_case(name, batch, size, getattr(torch, dtype), device, steps, warmup, args.tiny, args.wait_idle)
    # Tiny rows are saved only where a dry run sends its results (PIIP_RESULTS_DIR), never to bench/results.
    report("hf", device, rows, COLUMNS, not args.no_save and (not args.tiny or bool(os.environ.get("PIIP_RESULTS_DIR"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
