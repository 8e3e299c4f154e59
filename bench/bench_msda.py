"""Benchmark of multi-scale deformable attention: forward and forward+backward of
every available backend on the shapes of bench/data/shapes.md.

    python bench/bench_msda.py                       # GPU if present, else CPU (queries scaled to 1/4)
    python bench/bench_msda.py --device cpu --batch 2 --query-scale 0.25 --dtype float32

Prints a table (ms, achieved GB/s, ratio to the memory floor) and appends the
numbers to bench/results/msda_<device>.jsonl with device, versions and commit.
``*_ms`` is one eager call (the CPU's launch overhead included); on a GPU our backends
also get ``*_gpu_ms``, the same call replayed from a CUDA graph (the kernels alone).
GB/s, the floor ratios and the speed-ups over the Deformable DETR kernel use ``*_gpu_ms``
where measured. That kernel is timed live in the same run when its extension is importable
(``*_vs_detr_live``; bench/gpu_check.sh builds it into $PIIP_ANCHOR_DIR from the anchor
sources, fp32 only as the official wrappers run it); ``*_vs_detr_kernel`` compares with its
published H100 figures instead (``*_call_vs_detr_kernel``: our eager call), for reference only.
The memory floor is the bytes of value, locations, weights and output moved
once, over the copy bandwidth measured in the same run.

In the CPU dry run of bench/gpu_check.sh (PIIP_DRY_RUN=1, PIIP_ANCHOR_STANDIN=1) the GPU-only
paths run too: eager timing stands in for CUDA-graph replays, and a stand-in built from our
reference for the DETR kernel, in rows labelled ``detr stand-in``; ratios over it are
``*_vs_detr_standin``, which no target reads.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import budgeted, copy_bandwidth_gbs, device_name, dry_run, gpu_paths, progress, report, timer  # noqa: E402

import piip_kernels  # noqa: E402
from piip_kernels.msda.api import BACKENDS  # noqa: E402
from piip_kernels.msda.reference import ms_deform_attn_reference  # noqa: E402

# (name, queries, level grids, heads, head dim, points, batch of the published figures,
# Deformable DETR CUDA kernel fwd / fwd+bwd ms at that batch, fp32, H100). PIIP interactions
# use 1 level, 16 heads, 4 points; the last row is a Deformable DETR encoder. All numbers
# are bench/data/shapes.md's.
SHAPES = [
    ("SBL 1764q 70x70 D32", 1764, [(70, 70)], 16, 32, 4, 2, 0.061, 0.223),
    ("SBL 4900q 42x42 D24", 4900, [(42, 42)], 16, 24, 4, 2, 0.106, 0.358),
    ("SBL 4900q 98x98 D24", 4900, [(98, 98)], 16, 24, 4, 2, 0.119, 0.398),
    ("SBL 9604q 70x70 D12", 9604, [(70, 70)], 16, 12, 4, 2, 0.108, 0.536),
    ("cls 144q 8x8 D12", 144, [(8, 8)], 16, 12, 4, 64, 0.055, 0.260),
    ("DETR enc 4 levels D32", 20197, [(100, 152), (50, 76), (25, 38), (13, 19)], 8, 32, 4, 2, 0.664, 2.384),
]
OURS = ("cuda", "triton", "cpu")
ANCHOR = "detr kernel"
STANDIN = "detr stand-in (our reference)"
# The anchor before the compiled reference: a budget cut should drop the latter first.
BASELINES = ("reference", ANCHOR, STANDIN, "compiled reference")


def make_inputs(batch, Lq, grids, M, D, P, dtype, device, seed, locations="grid"):
    """Inputs with softmaxed weights. ``locations``: "grid" (realistic: queries on a regular
    grid, offsets of a few pixels) or "uniform" (anywhere in [0, 1]: no locality, the
    worst case for caches)."""
    g = torch.Generator().manual_seed(seed)
    L = len(grids)
    S = sum(h * w for h, w in grids)
    if locations == "uniform":
        loc = torch.rand(batch, Lq, M, L, P, 2, generator=g)
    else:
        side = math.ceil(math.sqrt(Lq))
        idx = torch.arange(Lq)
        ref = torch.stack([(idx % side + 0.5) / side, (idx // side + 0.5) / side], -1)  # [Lq, 2]
        wh = torch.tensor([[w, h] for h, w in grids], dtype=torch.float32)  # [L, 2]
        offsets = torch.randn(batch, Lq, M, L, P, 2, generator=g) * 2.0 / wh[None, None, None, :, None, :]
        loc = ref[None, :, None, None, None, :] + offsets
    attn = torch.randn(batch, Lq, M, L * P, generator=g).softmax(-1).view(batch, Lq, M, L, P)
    value = torch.randn(batch, S, M, D, generator=g)
    shapes = torch.tensor(grids, dtype=torch.long)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    loc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return [value.to(device, dtype), shapes.to(device), starts.to(device), loc.to(device, loc_dtype), attn.to(device, loc_dtype)]


def floor_bytes(inputs, out_elems):
    value, _, _, loc, attn = inputs
    return value.numel() * value.element_size() + loc.numel() * loc.element_size() + attn.numel() * attn.element_size() + out_elems * value.element_size()


def runners(device):
    """name -> function(value, shapes, starts, loc, attn) for every backend that can run here."""
    out = {}
    for name in ("reference", "cpu", "cuda", "triton"):
        if not BACKENDS[name](device, torch.float32):
            out[name] = (lambda n: lambda *a: piip_kernels.ms_deform_attn(*a, backend=n))(name)
    if gpu_paths(device):
        out["compiled reference"] = None  # compiled afresh for every case (see _compiled)
        anchor = anchor_runner()
        if anchor is not None:
            out[anchor.label] = anchor
        else:
            progress("no Deformable DETR kernel to time beside ours (set PIIP_ANCHOR_DIR to its build folder)")
    return out


def _labelled(fn, label: str, standin: bool):
    def run(value, shapes, starts, loc, attn):
        return fn(value, shapes, starts, loc, attn)

    run.label, run.standin = label, standin
    return run


def anchor_runner():
    """The Deformable DETR CUDA extension (``MultiScaleDeformableAttention``) as a runner
    (value, shapes, starts, loc, attn) -> out with its own backward, or None when it is not
    importable. bench/gpu_check.sh builds it from the anchor sources outside this project
    into $PIIP_ANCHOR_DIR; it is timed beside our kernels in the same run, never copied in.
    It takes fp32 only (the official wrappers cast to fp32 under autocast), so it always
    gets fp32 inputs; im2col_step 64 as in the official module.

    The runner has ``.label`` (the row's backend name) and ``.standin``. With
    PIIP_ANCHOR_STANDIN=1 (the CPU dry run of gpu_check.sh) it is a stand-in with the same
    interface, built from our reference: its rows are labelled as such, and speed-ups over
    it go to ``*_vs_detr_standin``, never to the anchor's ``*_vs_detr_live``."""
    if os.environ.get("PIIP_ANCHOR_STANDIN") == "1":
        return _labelled(_anchor_function(None), STANDIN, True)
    folder = os.environ.get("PIIP_ANCHOR_DIR")
    if folder and folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        import MultiScaleDeformableAttention as ext  # noqa: N813
    except ImportError:
        return None
    return _labelled(_anchor_function(ext), ANCHOR, False)


def anchor_for(device: torch.device):
    """``anchor_runner()`` where it can run on ``device``, else None: the real kernel is
    CUDA-only, the dry run's stand-in runs anywhere."""
    kernel = anchor_runner()
    if kernel is None or (device.type != "cuda" and not kernel.standin):
        return None
    return kernel


def _anchor_function(ext):
    """The anchor's calling convention as an autograd function: ext's two entry points, or
    (ext None) the same two built from our reference."""
    if ext is None:
        def fwd(value, shapes, starts, loc, attn, _im2col):
            return piip_kernels.ms_deform_attn(value, shapes, starts, loc, attn, backend="reference")

        def bwd(value, shapes, starts, loc, attn, grad_out, _im2col):
            leaves = [t.detach().requires_grad_(True) for t in (value, loc, attn)]
            with torch.enable_grad():
                out = fwd(leaves[0], shapes, starts, leaves[1], leaves[2], 64)
            return torch.autograd.grad(out, leaves, grad_out)
    else:
        fwd, bwd = ext.ms_deform_attn_forward, ext.ms_deform_attn_backward

    class DetrKernel(torch.autograd.Function):
        # Named ranges, so profilers (bench_model's time shares) can find the kernel's time.
        @staticmethod
        def forward(ctx, value, shapes, starts, loc, attn):
            ctx.save_for_backward(value, shapes, starts, loc, attn)
            with torch.profiler.record_function("DetrKernel"):
                return fwd(value, shapes, starts, loc, attn, 64)

        @staticmethod
        def backward(ctx, grad_out):
            value, shapes, starts, loc, attn = ctx.saved_tensors
            with torch.profiler.record_function("DetrKernelBackward"):
                gv, gl, ga = bwd(value, shapes, starts, loc, attn, grad_out.contiguous(), 64)
            return gv, None, None, gl, ga

    return DetrKernel.apply


def _compiled():
    # A fresh compilation per case: with one compiled function for all cases, dynamo would
    # stop recompiling after its cache limit and silently time eager code.
    torch._dynamo.reset()
    return torch.compile(ms_deform_attn_reference, dynamic=False)


def bench_one(fn, inputs, device, backward, graph=False):
    """Median ms of one forward (or forward+backward) call; with `graph`, of its CUDA-graph
    replay (the kernels without the CPU's launch overhead; None if it cannot be captured)."""
    measure = timer(device, graph)
    value, shapes, starts, loc, attn = inputs
    if not backward:
        with torch.no_grad():
            return measure(lambda: fn(value, shapes, starts, loc, attn))
    leaves = [t.detach().requires_grad_(True) for t in (value, loc, attn)]
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device, dtype=value.dtype)

    def step():
        # autograd.grad, not backward(): accumulating into .grad would add a
        # full read-modify-write of value to every backend's time.
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        torch.autograd.grad(out, leaves, grad)

    return measure(step)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="default: 2 and 8 (plus the batch of the published figures) on a GPU, 2 on the CPU")
    p.add_argument("--dtype", nargs="+", default=None, help="default: bfloat16 float32 on a GPU, float32 on the CPU")
    p.add_argument("--query-scale", type=float, default=None, help="scale the query counts (default 1 on a GPU, 0.25 on the CPU)")
    p.add_argument("--shapes", nargs="*", default=None, help="substrings selecting shape rows")
    p.add_argument("--sets", type=int, default=2, help="input sets per case (median over them)")
    p.add_argument("--locations", choices=("grid", "uniform"), default="grid",
                   help="sampling locations: near a query grid (PIIP, DETR) or uniformly random (no locality)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting measurements after this many seconds (our backends are measured first)")
    p.add_argument("--no-compiled-reference", action="store_true",
                   help="leave out the torch.compile'd reference baseline (its compilation takes a while)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtypes = [getattr(torch, d) for d in (args.dtype or (["bfloat16", "float32"] if gpu else ["float32"]))]
    scale = args.query_scale if args.query_scale is not None else (1.0 if gpu else 0.25)
    shapes = [s for s in SHAPES if not args.shapes or any(k in s[0] for k in args.shapes)]
    if not gpu and args.shapes is None:
        shapes = [s for s in shapes if not s[0].startswith("DETR")]
    bw = copy_bandwidth_gbs(device)
    progress(f"device: {device_name(device)}; copy bandwidth {bw:.0f} GB/s")
    fns = runners(device)
    if args.no_compiled_reference:
        fns.pop("compiled reference", None)
    cases = []
    for dtype in dtypes:  # the order that matters most: bf16 first, the published batch first
        for shape in shapes:
            batches = args.batch or ([shape[6], 2, 8] if gpu else [2])
            cases += [(shape, b, dtype) for b in dict.fromkeys(batches)]
    # Our backends on every case first, then the baselines: a budget cut drops baselines.
    order = [b for b in OURS + BASELINES if b in fns]
    # The DETR kernel runs fp32 only: one fp32 measurement per (shape, batch) serves every
    # dtype. Keyed by (name, batch): a shape row holds lists, which cannot be hashed.
    anchor_cases = list({(shape[0], b): (shape, b, torch.float32) for shape, b, _ in cases}.values())
    work = [(case, backend) for backend in order for case in (anchor_cases if backend in (ANCHOR, STANDIN) else cases)]
    rows, inputs = [], {}
    for case, backend in budgeted(work, args.budget_s):
        rows.append(_measure(args, device, case, backend, fns[backend] or _compiled(), scale, bw, inputs))
    _finish(args, device, bw, rows)
    return rows


def _measure(args, device, case, backend, fn, scale, bw, cache):
    (name, Lq, grids, M, D, P, pub_batch, detr_fwd, detr_fb), batch, dtype = case
    Lq = max(1, round(Lq * scale))
    key = (name, batch, dtype)
    if key not in cache:
        cache[key] = [make_inputs(batch, Lq, grids, M, D, P, dtype, device, seed, args.locations) for seed in range(args.sets)]
    sets = cache[key]
    fbytes = floor_bytes(sets[0], batch * Lq * M * D)
    floor_ms = fbytes / (bw * 1e9) * 1e3
    # Forward + backward moves every input three times (forward read, backward read,
    # gradient write) and the output twice (output, grad_output).
    out_bytes = batch * Lq * M * D * sets[0][0].element_size()
    fb_floor_ms = (3 * (fbytes - out_bytes) + 2 * out_bytes) / (bw * 1e9) * 1e3
    progress(f"  batch {batch} {str(dtype)[6:]} {name} ({Lq} queries): {backend}")
    def median(values):
        return None if any(v is None for v in values) else sorted(values)[len(values) // 2]

    row = {"case": name, "batch": batch, "queries": Lq, "dtype": str(dtype)[6:], "locations": args.locations, "backend": backend,
           "fwd_ms": median([bench_one(fn, s, device, False) for s in sets]),
           "fwd_bwd_ms": median([bench_one(fn, s, device, True) for s in sets]), "floor_ms": floor_ms}
    if gpu_paths(device) and backend in OURS + (ANCHOR, STANDIN):
        row["fwd_gpu_ms"] = median([bench_one(fn, s, device, False, graph=True) for s in sets])
        row["fwd_bwd_gpu_ms"] = median([bench_one(fn, s, device, True, graph=True) for s in sets])
    # Kernel time where a CUDA graph measured it, else the eager call.
    fwd = row.get("fwd_gpu_ms") or row["fwd_ms"]
    fb = row.get("fwd_bwd_gpu_ms") or row["fwd_bwd_ms"]
    row.update({"fwd_GBps": fbytes / (fwd * 1e-3) / 1e9, "fwd_x_floor": fwd / floor_ms, "fwd_bwd_x_floor": fb / fb_floor_ms})
    if gpu_paths(device) and batch == pub_batch and (scale == 1.0 or dry_run()):
        # Speed-up over the published Deformable DETR kernel figures (fp32, same shape):
        # of the kernels (CUDA graph) and of a whole eager call.
        row["fwd_vs_detr_kernel"] = detr_fwd / fwd
        row["fwd_bwd_vs_detr_kernel"] = detr_fb / fb
        row["fwd_call_vs_detr_kernel"] = detr_fwd / row["fwd_ms"]
        row["fwd_bwd_call_vs_detr_kernel"] = detr_fb / row["fwd_bwd_ms"]
    return row


def _finish(args, device, bw, rows):
    # Speed-up of each backend over the reference, same case.
    ref = {(r["case"], r["batch"], r["dtype"]): r for r in rows if r["backend"] == "reference"}
    # Speed-up over the DETR kernel timed in this run (fp32, same shape and batch): of the
    # kernels where CUDA graphs timed both, else of the eager calls.
    # A stand-in's ratios get their own keys: targets.py never reads them as the anchor's.
    anchor = {(r["case"], r["batch"]): r for r in rows if r["backend"] in (ANCHOR, STANDIN)}
    for r in rows:
        base = ref.get((r["case"], r["batch"], r["dtype"]))
        if base:
            r["fwd_speedup"] = base["fwd_ms"] / r["fwd_ms"]
            r["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        a = anchor.get((r["case"], r["batch"]))
        if a and r["backend"] in OURS:
            suffix = "vs_detr_standin" if a["backend"] == STANDIN else "vs_detr_live"
            for k in ("fwd", "fwd_bwd"):
                both = a.get(f"{k}_gpu_ms") and r.get(f"{k}_gpu_ms")
                r[f"{k}_{suffix}"] = a[f"{k}_gpu_ms"] / r[f"{k}_gpu_ms"] if both else a[f"{k}_ms"] / r[f"{k}_ms"]
    rows.sort(key=lambda r: (r["dtype"], r["case"], r["batch"], r["backend"]))
    cols = ["case", "batch", "queries", "dtype", "locations", "backend", "fwd_ms", "fwd_bwd_ms", "fwd_gpu_ms", "fwd_bwd_gpu_ms", "fwd_GBps",
            "fwd_x_floor", "fwd_bwd_x_floor", "fwd_speedup", "fwd_bwd_speedup", "fwd_vs_detr_live", "fwd_bwd_vs_detr_live", "fwd_vs_detr_standin",
            "fwd_bwd_vs_detr_standin", "fwd_vs_detr_kernel", "fwd_bwd_vs_detr_kernel",
            "fwd_call_vs_detr_kernel", "fwd_bwd_call_vs_detr_kernel"]
    # Uniform locations are another experiment, kept in their own results file.
    report("msda" if args.locations == "grid" else f"msda_{args.locations}", device, rows, cols, not args.no_save, bw)


if __name__ == "__main__":
    main()
