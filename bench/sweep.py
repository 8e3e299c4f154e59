"""The kernel-variant sweep: times every CUDA kernel variant of every private op
(piip_kernels/variants.py) on the shapes of bench/data/shapes.md and writes the tuned
dispatch table (piip_kernels/tuned/<arch>.json) that piip_kernels.tuned reads at run time.

    bash bench/gpu_check.sh --install-only && python bench/sweep.py --budget-s 420   # on a GPU
    python bench/sweep.py --plan                       # the case list and its estimated time
    python bench/sweep.py --dry-run --out-dir /tmp/s   # CPU: emulated CUDA kernels, tiny shapes

Not part of bench/gpu_check.sh: a GPU call of its own.

Cases: the PIIP interaction calls (1 level, 4 points, 16 heads, head dims 6, 12, 24, 32), the
Deformable DETR encoder (4 levels, 8 heads, D 32) and the two branch merges of shapes.md, at
batch 2 and 8, in fp32 and bf16. Per case and op: every variant's output is compared with
variant 0's and with the float64 reference first (a variant that disagrees is reported, not
timed, and never chosen); then the variants are timed in interleaved rounds (each round runs
every variant of the case once, back to back) of CUDA-graph replays, and the median is kept.
Forward ops are timed alone ("fwd"); backward ops as variant 0's forward plus their backward
("fwd+bwd", the training step's share). Beside them: the memory floor (bench_msda.floor_bytes
over the copy bandwidth measured in the same run), the Triton kernels, the Deformable DETR
kernel where bench_msda.anchor_for gives it (fp32), and for merge torch.compile of the eager
merge. Variants first, these baselines after: a budget cut drops baselines first.

The table: per (op, dtype, shape class of piip_kernels.tuned.shape_class), the variant with
the lowest geometric mean over the class's cases of its time / variant 0's time, kept only
when it beats variant 0 by at least MIN_MARGIN (else variant 0); ``margin`` records by how much.

Outputs: results/sweep_<gpu>.jsonl (appended) and .md (device, torch, CUDA, commit and date in
the header), and the table (``--table-out``; default piip_kernels/tuned/<arch>.json). With
--dry-run everything goes to --out-dir (never bench/results or piip_kernels/tuned): the CUDA
kernels run through the CPU emulation of tests/cuda_emulation (compiled first, about a minute),
the Triton kernels in Triton's interpreter, eager timers "time" them (not a measurement), and
the table written is loaded through piip_kernels.tuned to prove it valid.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
if "--dry-run" in sys.argv[1:]:
    # Triton picks its interpreter when a kernel is defined: before anything imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from common import capture_graph, copy_bandwidth_gbs, device_name, environment, format_table, progress  # noqa: E402

from piip_kernels import tuned  # noqa: E402
from piip_kernels.variants import VARIANTS  # noqa: E402

MIN_MARGIN = 0.03  # a variant must beat variant 0 by 3 % (above run-to-run noise) to be chosen
# Tolerances of the checks: max |a - b| over max |b|, per output tensor. Against variant 0:
# the same arithmetic up to the order of fp32 sums and one rounding to the storage dtype.
# Against the float64 reference: fp32 accumulation, and 16-bit storage of value and outputs.
TOL_VS_V0 = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
TOL_VS_REF = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 8e-3}
# --plan's assumed costs on an H100/H200 (seconds): per timed (case, variant) -- the check
# against variant 0 and the reference, graph capture, warm-up and ROUNDS rounds of INNER
# replays of kernels of 0.05 to 3 ms; per case -- inputs and the float64 reference; per
# baseline row (Triton, DETR kernel; their first call per shape compiles); per torch.compile row.
PLAN_S = {"variant": 0.35, "case": 1.0, "baseline": 1.5, "compile": 20.0}
ROUNDS, INNER = 15, 10

# (name, queries, level grids, heads, head dim, points): bench/data/shapes.md
MSDA_SHAPES = [
    ("TSB 9604q 70x70 D6", 9604, [(70, 70)], 16, 6, 4),
    ("SBL 9604q 70x70 D12", 9604, [(70, 70)], 16, 12, 4),
    ("SBL 4900q 98x98 D24", 4900, [(98, 98)], 16, 24, 4),
    ("SBL 1764q 70x70 D32", 1764, [(70, 70)], 16, 32, 4),
    ("DETR enc 4 levels D32", 20197, [(100, 152), (50, 76), (25, 38), (13, 19)], 8, 32, 4),
]
# (name, channels, grids: finest last, the batch shapes.md timed eager PyTorch at: the
# torch.compile baseline runs at that batch only, its compilation costs 10 to 20 s a row)
MERGE_SHAPES = [("SBL det C1024", 1024, [42, 70, 98], 2), ("pyramid C256", 256, [28, 56, 112], 8)]
BATCHES = (2, 8)
DTYPES = (torch.bfloat16, torch.float32)
# The dry run: tiny shapes the emulation (an OS thread per CUDA thread) runs in seconds.
DRY_MSDA = [("dry 6q 3x4 D6", 6, [(3, 4)], 2, 6, 2), ("dry 4q 2 levels D32", 4, [(3, 4), (2, 2)], 2, 32, 2)]
DRY_MERGE = [("dry C2", 2, [3, 5], 1)]


@dataclass
class Case:
    kind: str  # "msda" or "merge"
    name: str
    batch: int
    dtype: torch.dtype
    shape: tuple
    inputs: list = field(default_factory=list)

    @property
    def ops(self) -> list[str]:
        return [op for op in VARIANTS if op.startswith(self.kind)]

    def sizes(self) -> dict:
        if self.kind == "msda":
            _, Lq, _, M, D, _ = self.shape
            return {"D": D, "rows": self.batch * Lq * M}
        _, C, grids, _ = self.shape
        return {"out": self.batch * C * grids[-1] ** 2}

    def shape_class(self, op: str) -> str:
        return tuned.shape_class(op, **self.sizes())


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- the kernels: real private ops on a GPU, the emulation in the dry run ----------------------


class GpuKernels:
    """The private ops of piip_C, with the variant as the last argument."""

    def __init__(self):
        from piip_kernels import _ext  # noqa: F401

        self.ops = torch.ops.piip_C

    def msda_forward(self, value, shapes, starts, loc, attn, variant):
        return self.ops.msda_forward(value, shapes, starts, loc, attn, variant)

    def msda_backward(self, grad, value, shapes, starts, loc, attn, deterministic, variant):
        op = self.ops.msda_backward_deterministic if deterministic else self.ops.msda_backward
        return op(grad, value, shapes, starts, loc, attn, variant)

    def merge_forward(self, feats, weights, out_size, out_dtype, variant):
        return self.ops.merge_forward(feats, weights, out_size[0], out_size[1], False, out_dtype, variant)

    def merge_backward(self, grad, feats, weights, variant):
        grads, gw = self.ops.merge_backward(grad, feats, weights, False, variant)
        return (*grads, gw)


class EmulatedKernels:
    """The same calls through tests/cuda_emulation/emulated.py (CPU tensors)."""

    def __init__(self, build_dir: Path):
        sys.path.insert(0, str(ROOT / "tests" / "cuda_emulation"))
        from emulated import build

        progress(f"compiling the CUDA emulation into {build_dir} (about a minute)")
        self.emu = build(build_dir)

    def msda_forward(self, value, shapes, starts, loc, attn, variant):
        return self.emu.msda_forward(value, shapes, starts, loc, attn, variant=variant)

    def msda_backward(self, grad, value, shapes, starts, loc, attn, deterministic, variant):
        return self.emu.msda_backward(grad, value, shapes, starts, loc, attn, deterministic=deterministic, variant=variant)

    def merge_forward(self, feats, weights, out_size, out_dtype, variant):
        return self.emu.merge_forward(feats, weights, out_size, False, out_dtype, variant=variant)

    def merge_backward(self, grad, feats, weights, variant):
        grads, gw = self.emu.merge_backward(grad, feats, weights, False, variant=variant)
        return (*grads, gw)


# --- inputs, steps and references ---------------------------------------------------------------


def make_inputs(case: Case, device) -> list:
    g = torch.Generator().manual_seed(0)
    if case.kind == "msda":
        from bench_msda import make_inputs as msda_inputs

        _, Lq, grids, M, D, P = case.shape
        value, shapes, starts, loc, attn = msda_inputs(case.batch, Lq, grids, M, D, P, case.dtype, device, seed=0)
        grad = torch.randn(case.batch, Lq, M * D, generator=g).to(device, case.dtype)
        return [value, shapes, starts, loc, attn, grad]
    _, C, grids, _ = case.shape
    feats = [torch.randn(case.batch, C, s, s, generator=g).to(device, case.dtype) for s in grids]
    weights = torch.rand(len(grids), generator=g).to(device, case.dtype)
    grad = torch.randn(case.batch, C, grids[-1], grids[-1], generator=g).to(device, case.dtype)
    return [feats, weights, (grids[-1], grids[-1]), grad]


def variant_step(kernels, case: Case, op: str, variant: int):
    """() -> outputs of one call: the forward op, or variant 0's forward then the backward op."""
    if case.kind == "msda":
        value, shapes, starts, loc, attn, grad = case.inputs
        if op == "msda_forward":
            return lambda: (kernels.msda_forward(value, shapes, starts, loc, attn, variant),)

        def fb():
            kernels.msda_forward(value, shapes, starts, loc, attn, 0)
            return kernels.msda_backward(grad, value, shapes, starts, loc, attn, op == "msda_backward_deterministic", variant)
        return fb
    feats, weights, out_size, grad = case.inputs
    out_dtype = torch.promote_types(feats[0].dtype, weights.dtype)
    if op == "merge_forward":
        return lambda: (kernels.merge_forward(feats, weights, out_size, out_dtype, variant),)

    def fb():
        kernels.merge_forward(feats, weights, out_size, out_dtype, 0)
        return kernels.merge_backward(grad, feats, weights, variant)
    return fb


def reference(case: Case, op: str) -> tuple:
    """The float64 reference of what variant_step returns (the specification)."""
    from piip_kernels.merge.reference import branch_merge_reference
    from piip_kernels.msda.reference import ms_deform_attn_reference

    backward = op.endswith(("backward", "deterministic"))
    if case.kind == "msda":
        value, shapes, starts, loc, attn, grad = case.inputs
        leaves = [t.detach().double().requires_grad_(backward) for t in (value, loc, attn)]
        with torch.enable_grad():
            out = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
            return tuple(torch.autograd.grad(out, leaves, grad.double())) if backward else (out,)
    feats, weights, out_size, grad = case.inputs
    leaves = [t.detach().double().requires_grad_(backward) for t in (*feats, weights)]
    with torch.enable_grad():
        out = branch_merge_reference(leaves[:-1], leaves[-1], out_size, False)
        return tuple(torch.autograd.grad(out, leaves, grad.double())) if backward else (out,)


def max_rel_err(got: tuple, want: tuple) -> float:
    """The largest, over the output tensors, of max |got - want| / max |want|."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        b = b.double()
        diff = (a.double() - b).abs().max().item() if a.numel() else 0.0
        scale = max(b.abs().max().item() if b.numel() else 0.0, 1e-12)
        worst = max(worst, diff / scale if math.isfinite(diff) else math.inf)
    return worst


def baseline_steps(case: Case, op: str, device, dry: bool) -> dict:
    """label -> () -> outputs, the comparison rows of (case, op): Triton, the DETR kernel
    (fp32 msda), torch.compile of the eager merge (not in the dry run: its C++ compile alone
    would take minutes on two cores)."""
    steps = {}
    try:
        import triton  # noqa: F401
    except ImportError:
        triton = None
    if case.kind == "msda":
        value, shapes, starts, loc, attn, grad = case.inputs
        if triton is not None:
            from piip_kernels.msda import triton as tk

            if op == "msda_forward":
                steps["triton"] = lambda: (tk.msda_forward(value, shapes, starts, loc, attn),)
            else:
                det = op == "msda_backward_deterministic"

                def fb():
                    tk.msda_forward(value, shapes, starts, loc, attn)
                    return tk.msda_backward(grad, value, shapes, starts, loc, attn, deterministic=det)
                steps["triton"] = fb
        from bench_msda import anchor_for

        anchor = anchor_for(device)
        if anchor is not None and case.dtype == torch.float32 and op != "msda_backward_deterministic":
            leaves = [t.detach().requires_grad_(op != "msda_forward") for t in (value, loc, attn)]
            if op == "msda_forward":
                steps[anchor.label] = lambda: (anchor(value, shapes, starts, loc, attn),)
            else:
                steps[anchor.label] = lambda: torch.autograd.grad(anchor(leaves[0], shapes, starts, leaves[1], leaves[2]),
                                                                  leaves, grad)
        return steps
    feats, weights, out_size, grad = case.inputs
    if triton is not None:
        from piip_kernels.merge import triton as tk

        if op == "merge_forward":
            steps["triton"] = lambda: (tk.merge_forward(feats, weights, out_size, False),)
        else:
            def fb():
                tk.merge_forward(feats, weights, out_size, False)
                grads, gw = tk.merge_backward(grad, feats, weights, False)
                return (*grads, gw)
            steps["triton"] = fb
    if not dry and case.batch == case.shape[3]:
        import torch.nn.functional as F

        def eager(fs, w):
            return sum(wi * F.interpolate(f, size=out_size, mode="bilinear", align_corners=False) for f, wi in zip(fs, w))

        torch._dynamo.reset()  # a fresh compilation per case (dynamo's cache limit would fall back to eager)
        compiled = torch.compile(eager, dynamic=False)
        if op == "merge_forward":
            steps["torch.compile eager merge"] = lambda: (compiled(feats, weights),)
        else:
            leaves = [t.detach().requires_grad_(True) for t in (*feats, weights)]
            steps["torch.compile eager merge"] = lambda: torch.autograd.grad(compiled(leaves[:-1], leaves[-1]), leaves, grad)
    return steps


# --- timing ---------------------------------------------------------------------------------------


def interleaved(steps: dict, device, rounds: int, inner: int) -> dict:
    """name -> median ms of one call, from ``rounds`` rounds that each time every step once,
    back to back. On a GPU each step is a CUDA-graph replay (``inner`` of them between two
    events: the kernels without the CPU's launch cost; eager where capture fails); on the CPU
    (the dry run) an eager call timed with perf_counter."""
    times = {n: [] for n in steps}
    if device.type == "cuda":
        graphs = {n: capture_graph(fn) for n, fn in steps.items()}
        for _ in range(rounds):
            for n, fn in steps.items():
                run = graphs[n].replay if graphs[n] is not None else fn
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    run()
                end.record()
                torch.cuda.synchronize()
                times[n].append(start.elapsed_time(end) / inner)
    else:
        for _ in range(rounds):
            for n, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


# --- one case ----------------------------------------------------------------------------------


def floor_ms(case: Case, op: str, bw_gbs: float) -> float:
    """The memory floor of the timed step: inputs read and output written once (forward), and
    for fwd+bwd every input three times (forward read, backward read, gradient write) and the
    output twice (output, grad_output); bench_msda's definition."""
    if case.kind == "msda":
        from bench_msda import floor_bytes

        value = case.inputs[0]
        out_elems = case.inputs[5].numel()
        fbytes = floor_bytes(case.inputs[:5], out_elems)
    else:
        feats, _, _, grad = case.inputs
        out_elems = grad.numel()
        fbytes = sum(f.numel() * f.element_size() for f in feats) + out_elems * feats[0].element_size()
        value = feats[0]
    if op.endswith("forward"):
        return fbytes / (bw_gbs * 1e9) * 1e3
    out_bytes = out_elems * value.element_size()
    return (3 * (fbytes - out_bytes) + 2 * out_bytes) / (bw_gbs * 1e9) * 1e3


def measure_variants(case: Case, kernels, device, bw: float, rounds: int, inner: int) -> list[dict]:
    rows = []
    for op in case.ops:
        step = "fwd" if op.endswith("forward") else "fwd+bwd"
        base = {"op": op, "case": case.name, "batch": case.batch, "dtype": dtype_name(case.dtype),
                "shape_class": case.shape_class(op), "step": step, "floor_ms": floor_ms(case, op, bw)}
        ref = reference(case, op)
        outs, good = {}, {}
        for v, name in enumerate(VARIANTS[op]):
            row = {**base, "kind": "variant", "name": name, "variant": v}
            try:
                got = tuple(t.detach() for t in variant_step(kernels, case, op, v)())
            except Exception as err:  # noqa: BLE001 - a variant that fails is reported, never chosen
                row.update(check=f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}", ms=None)
                rows.append(row)
                continue
            outs[v] = got
            err_ref = max_rel_err(got, ref)
            err_v0 = max_rel_err(got, outs[0]) if 0 in outs else math.inf
            row.update(err_vs_ref=err_ref, err_vs_v0=err_v0)
            ok = err_ref <= TOL_VS_REF[case.dtype] and err_v0 <= TOL_VS_V0[case.dtype]
            row["check"] = "ok" if ok else (f"DISAGREES: {err_v0:.2e} vs variant 0, {err_ref:.2e} vs the reference "
                                             f"(tolerances {TOL_VS_V0[case.dtype]:.0e}, {TOL_VS_REF[case.dtype]:.0e})")
            if not ok:
                progress(f"    {op} variant {name} on {case.name} batch {case.batch} {dtype_name(case.dtype)}: {row['check']}")
            good[name] = variant_step(kernels, case, op, v) if ok else None
            rows.append(row)
        outs.clear()
        timed = interleaved({n: fn for n, fn in good.items() if fn is not None}, device, rounds, inner)
        for row in rows:
            if row["op"] == op and row["name"] in timed:
                row["ms"] = timed[row["name"]]
        v0 = timed.get(VARIANTS[op][0])
        for row in rows:
            if row["op"] == op and row.get("ms"):
                row["x_floor"] = row["ms"] / row["floor_ms"]
                row["v0_over_this"] = v0 / row["ms"] if v0 else None
    return rows


def measure_baselines(case: Case, device, bw: float, rounds: int, inner: int, dry: bool) -> list[dict]:
    rows = []
    for op in case.ops:
        steps = baseline_steps(case, op, device, dry)
        if not steps:
            continue
        ref = reference(case, op)
        base = {"op": op, "case": case.name, "batch": case.batch, "dtype": dtype_name(case.dtype),
                "shape_class": case.shape_class(op), "step": "fwd" if op.endswith("forward") else "fwd+bwd",
                "floor_ms": floor_ms(case, op, bw), "kind": "baseline"}
        good = {}
        for label, fn in steps.items():
            row = {**base, "name": label, "variant": None}
            try:
                err = max_rel_err(tuple(t.detach() for t in fn()), ref)
                row["err_vs_ref"], row["check"] = err, "ok" if err <= TOL_VS_REF[case.dtype] else f"DISAGREES: {err:.2e} vs the reference"
                good[label] = fn
            except Exception as e:  # noqa: BLE001
                row["check"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
        timed = interleaved(good, device, rounds, inner)
        for row in rows:
            if row["op"] == op and row["name"] in timed:
                row["ms"] = timed[row["name"]]
                row["x_floor"] = row["ms"] / row["floor_ms"]
    return rows


# --- choosing the winners -------------------------------------------------------------------------


def choose_winners(rows: list[dict], min_margin: float = MIN_MARGIN) -> list[dict]:
    """Table entries from measured variant rows: per (op, dtype, shape class), over the cases
    where variant 0 and the candidate both have a time and the candidate's check passed, the
    variant with the lowest geometric mean of time / variant 0's time; variant 0 unless that
    beats it by ``min_margin``. A variant that disagreed (or failed) in any case of the class
    is never chosen for it. Entries carry ``margin`` (v0 / winner's time - 1) and ``cases``."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kind") != "variant":
            continue
        key = (r["op"], r["dtype"], r["shape_class"])
        groups.setdefault(key, {}).setdefault((r["case"], r["batch"]), {})[r["name"]] = r
    entries = []
    for (op, dtype, cls), cases in sorted(groups.items()):
        v0 = VARIANTS[op][0]
        bad = {n for per in cases.values() for n, r in per.items() if r.get("check") != "ok"}
        ratios: dict[str, list[float]] = {}
        for per in cases.values():
            if v0 not in per or not per[v0].get("ms") or v0 in bad:
                continue
            for n, r in per.items():
                if n not in bad and r.get("ms"):
                    ratios.setdefault(n, []).append(r["ms"] / per[v0]["ms"])
        if v0 not in ratios:
            continue  # variant 0 was not measured (or failed its check): no entry, the default stays
        n_cases = len(ratios[v0])
        # A candidate must have been timed on every case variant 0 was.
        geo = {n: math.exp(sum(map(math.log, rs)) / len(rs)) for n, rs in ratios.items() if len(rs) == n_cases}
        best = min(geo, key=lambda n: (geo[n], VARIANTS[op].index(n)))
        margin = 1.0 / geo[best] - 1.0
        if margin < min_margin:
            best, margin = v0, 0.0
        entries.append({"op": op, "dtype": dtype, "shape_class": cls, "variant": best, "margin": round(margin, 4),
                        "cases": n_cases, "rejected": sorted(bad)})
    return entries


# --- the run --------------------------------------------------------------------------------------


def make_cases(dry: bool) -> list[Case]:
    msda, merge = (DRY_MSDA, DRY_MERGE) if dry else (MSDA_SHAPES, MERGE_SHAPES)
    batches = (1,) if dry else BATCHES
    cases = []
    for dtype in DTYPES:
        for b in batches:
            cases += [Case("msda", s[0], b, dtype, s) for s in msda]
            cases += [Case("merge", s[0], b, dtype, s) for s in merge]
    return cases


def plan(cases: list[Case]) -> tuple[int, int, int, float]:
    """(cases, timed variants, baseline rows, estimated seconds on an H100/H200)."""
    n_var = sum(len(VARIANTS[op]) for c in cases for op in c.ops)
    n_base = sum(len(c.ops) * (2 if c.kind == "msda" and c.dtype == torch.float32 else 1) for c in cases)
    n_compile = sum(len(c.ops) for c in cases if c.kind == "merge" and c.batch == c.shape[3])
    est = (len(cases) * PLAN_S["case"] * 2 + n_var * PLAN_S["variant"] + n_base * PLAN_S["baseline"]
           + n_compile * PLAN_S["compile"])
    return len(cases), n_var, n_base + n_compile, est


def gpu_slug(name: str) -> str:
    """"h100" for "NVIDIA H100 80GB HBM3"."""
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Za-z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")).lower()


def write_outputs(out_dir: Path, stem: str, env: dict, rows: list[dict], table: dict, table_path: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / f"{stem}.jsonl").open("a") as f:
        f.write(json.dumps({"env": env, "rows": rows, "table": table}) + "\n")
    cols = ["op", "case", "batch", "dtype", "shape_class", "step", "kind", "name", "ms", "v0_over_this", "floor_ms",
            "x_floor", "err_vs_v0", "err_vs_ref", "check"]
    order = {op: i for i, op in enumerate(VARIANTS)}
    rows = sorted(rows, key=lambda r: (order[r["op"]], r["dtype"], r["case"], r["batch"], r["kind"] != "variant",
                                       r["variant"] if r["variant"] is not None else 99, r["name"]))
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    chosen = format_table(table["entries"], ["op", "dtype", "shape_class", "variant", "margin", "cases", "rejected"])
    (out_dir / f"{stem}.md").write_text(
        f"# Kernel-variant sweep ({stem})\n\n{header}\n\n"
        f"ms: median of interleaved rounds; v0_over_this: variant 0's time over this row's (above 1: faster); "
        f"x_floor: time over the memory floor; err_*: max |diff| / max |reference| per output.\n\n"
        f"## Dispatch table ({table_path.name}; margin rule: {MIN_MARGIN:.0%})\n\n{chosen}\n\n"
        f"## Measurements\n\n{format_table(rows, cols)}\n")
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(json.dumps(table, indent=1) + "\n")


def run_budgeted(work: list[tuple[str, Case]], budget_s: float | None, run) -> int:
    """Calls run(what, case) for each unit of ``work`` in order until ``budget_s`` seconds have
    passed (checked between units: the unit in progress finishes), printing progress; returns
    how many units ran."""
    start = time.monotonic()
    for i, (what, case) in enumerate(work):
        elapsed = time.monotonic() - start
        if budget_s is not None and elapsed > budget_s:
            progress(f"budget of {budget_s:.0f} s spent: {len(work) - i} of {len(work)} units left out "
                     f"({sum(w == 'variants' for w, _ in work[i:])} of them variant units); writing what was measured")
            return i
        left = f"about {elapsed / i * (len(work) - i):.0f} s left" if i else "estimate after the first unit"
        progress(f"[{i + 1}/{len(work)}] {what}: {case.name} batch {case.batch} {dtype_name(case.dtype)} "
                 f"(elapsed {elapsed:.0f} s, {left})")
        run(what, case)
    return len(work)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting cases after this many seconds, keeping what was measured")
    ap.add_argument("--plan", action="store_true", help="print the case and variant counts and the estimated time, then stop")
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, emulated CUDA kernels, Triton interpreter; needs --out-dir")
    ap.add_argument("--out-dir", type=Path, default=None, help="where results go (default bench/results; required by --dry-run)")
    ap.add_argument("--table-out", type=Path, default=None, help="the table's path (default piip_kernels/tuned/<arch>.json)")
    ap.add_argument("--rounds", type=int, default=None, help=f"interleaved rounds (default {ROUNDS}; 2 in the dry run)")
    args = ap.parse_args(argv)
    cases = make_cases(args.dry_run)
    if args.plan:
        n_cases, n_var, n_base, est = plan(make_cases(False))
        print(f"{n_cases} cases ({len(MSDA_SHAPES)} msda + {len(MERGE_SHAPES)} merge shapes x batches {BATCHES} x "
              f"{len(DTYPES)} dtypes); {n_var} timed (case, op, variant) measurements over "
              f"{', '.join(f'{op} {len(v)}' for op, v in VARIANTS.items())} variants; {n_base} baseline rows")
        print(f"estimated on an H100/H200: {est:.0f} s ({est / 60:.1f} min), assuming {PLAN_S['variant']} s per timed variant "
              f"(checks, graph capture, {ROUNDS} rounds x {INNER} replays), {PLAN_S['case']} s per case for inputs and "
              f"references (twice), {PLAN_S['baseline']} s per Triton / DETR-kernel row, {PLAN_S['compile']} s per "
              f"torch.compile row; --budget-s cuts baselines first")
        return 0
    if args.dry_run:
        if args.out_dir is None:
            ap.error("--dry-run writes into a scratch folder: pass --out-dir")
        out = args.out_dir.resolve()
        for forbidden in (ROOT / "bench" / "results", tuned.HERE):
            if out == forbidden.resolve() or forbidden.resolve() in out.parents:
                ap.error(f"--dry-run must not write into {forbidden}")
        device = torch.device("cpu")
        build = out / "emulation"
        build.mkdir(parents=True, exist_ok=True)
        kernels = EmulatedKernels(build)
        arch, device_label = "sm_90", "CPU emulation of the CUDA kernels (dry run: not a measurement)"
        rounds, inner, stem = args.rounds or 2, 1, "sweep_dryrun"
        bw = copy_bandwidth_gbs(device, nbytes=1 << 24)
    else:
        if not torch.cuda.is_available():
            ap.error("the sweep needs a CUDA device (or --dry-run / --plan)")
        device = torch.device("cuda")
        kernels = GpuKernels()
        arch, device_label = tuned.arch_of(device), device_name(device)
        rounds, inner, stem = args.rounds or ROUNDS, INNER, f"sweep_{gpu_slug(device_label)}"
        out = args.out_dir or ROOT / "bench" / "results"
        bw = copy_bandwidth_gbs(device)
    table_path = args.table_out or (out / f"{arch}.json" if args.dry_run else tuned.HERE / f"{arch}.json")
    env = environment()
    env.update(device=device_label, arch=arch, copy_bandwidth_GBps=round(bw, 1), variants=json.dumps(VARIANTS))
    progress(f"sweep on {device_label}: {len(cases)} cases; variants {dict(VARIANTS)}")

    rows: list[dict] = []
    work = [("variants", c) for c in cases] + [("baselines", c) for c in cases]

    def run(what: str, case: Case) -> None:
        nonlocal rows
        if not case.inputs:
            case.inputs = make_inputs(case, device)
        if what == "variants":
            rows += measure_variants(case, kernels, device, bw, rounds, inner)
        else:
            rows += measure_baselines(case, device, bw, rounds, inner, args.dry_run)
            case.inputs = []  # the last use of this case's inputs

    done = run_budgeted(work, args.budget_s, run)
    env["measured_units"] = f"{done} of {len(work)}"
    source = (out / f"{stem}.md")
    try:
        source = source.relative_to(ROOT)
    except ValueError:
        pass
    table = {"arch": arch, "device": device_label, "torch": torch.__version__, "cuda": torch.version.cuda,
             "commit": env["commit"], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "source": str(source), "min_margin": MIN_MARGIN, "entries": choose_winners(rows)}
    write_outputs(out, stem, env, rows, table, table_path)
    tuned.load(table_path)  # the table just written must load (validation of every name in it)
    progress(f"wrote {out / (stem + '.md')}, {out / (stem + '.jsonl')} and the table {table_path} "
             f"({len(table['entries'])} entries, {sum(e['variant'] != VARIANTS[e['op']][0] for e in table['entries'])} off variant 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
