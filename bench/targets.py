"""The speed targets of the kernel issues, checked against the latest benchmark records.

    python bench/targets.py                  # latest *_cuda records in bench/results/
    python bench/targets.py --results DIR --device cuda

Ratios to the memory floor and to the Deformable DETR kernel use the CUDA-graph
(kernel-only) times where the benchmarks measured them. Reads the last record of
msda_<device>.jsonl, interaction_<device>.jsonl and
branch_merge_<device>.jsonl (written by the three benchmarks) and prints one line per
target and backend: PASS, FAIL or MISSING (not measured, for example cut by a time
budget), with the worst case and its value. The targets (H100 figures, same run):

  ms_deform_attn     bf16 forward >= 5x and forward+backward >= 4x faster than the Deformable
                     DETR kernel (fp32) timed in the same run on every PIIP shape; the 4-level
                     encoder >= 3x forward+backward. Without a live measurement the target is
                     MISSING, and the line quotes the ratio to the kernel's published H100
                     figures (bench/data/shapes.md) for information only
                     batch 8: forward <= 2x its memory floor, forward+backward <= 3x its floor
                     Triton within 1.5x of CUDA on every shape
  deform_cross_attn  fused >= 2x faster than the unfused path, same backend, bf16 forward+backward
  branch_merge       bf16: >= 15x faster than eager forward, forward <= 1.5x its floor,
                     forward+backward >= 8x faster than eager
  model step         SBL detection, full resolution, batch 2, bf16: our path >= 1.3x faster
                     than the official path (bench_model.py)
  memory planner     within 10 % of torch.cuda.max_memory_allocated on the checked preset
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GPU_BACKENDS = ("cuda", "triton")


def latest(results: Path, name: str) -> list[dict]:
    """Rows of the last record of results/<name>.jsonl ([] when there is none)."""
    path = results / f"{name}.jsonl"
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1])["rows"] if lines else []


def verdict(target: str, rows: list[dict], key: str, limit: float, at_least: bool) -> tuple[str, str]:
    """One target over `rows`: every row's `key` must be >= limit (at_least) or <= limit."""
    vals = [(r[key], r) for r in rows if r.get(key) is not None]
    if not vals:
        return "MISSING", f"{target}: no measurement"
    worst, row = min(vals, key=lambda v: v[0]) if at_least else max(vals, key=lambda v: v[0])
    ok = worst >= limit if at_least else worst <= limit
    where = ", ".join(str(row[k]) for k in ("case", "batch", "dtype") if k in row)
    sign = ">=" if at_least else "<="
    return ("PASS" if ok else "FAIL"), f"{target}: worst {worst:.2f} ({where}); need {sign} {limit:g}; {len(vals)} cases"


def vs_detr(target: str, rows: list[dict], key: str, limit: float) -> tuple[str, str]:
    """The live ratio `<key>_vs_detr_live` decides; other GPUs' published figures never do."""
    status, line = verdict(target, rows, f"{key}_vs_detr_live", limit, True)
    if status == "MISSING" and any(r.get(f"{key}_vs_detr_standin") is not None for r in rows):
        return status, line + " (a stand-in for the DETR kernel ran: a dry run, never judged)"
    if status == "MISSING":
        _, published = verdict(target, rows, f"{key}_vs_detr_kernel", limit, True)
        if "no measurement" not in published:
            line += " in this run (the DETR kernel was not built); against its published H100 figures," + published.split(":", 1)[1]
    return status, line


def _kernel_ms(a: dict, b: dict, key: str) -> tuple[float, float]:
    """(a's, b's) time of `key` ("fwd" or "fwd_bwd"): CUDA-graph times where both rows have
    them, else both eager calls, so the two are always of one kind."""
    if a.get(f"{key}_gpu_ms") and b.get(f"{key}_gpu_ms"):
        return a[f"{key}_gpu_ms"], b[f"{key}_gpu_ms"]
    return a[f"{key}_ms"], b[f"{key}_ms"]


def msda_checks(rows: list[dict], backends=GPU_BACKENDS) -> list[tuple[str, str]]:
    out = []
    for b in backends:
        mine = [r for r in rows if r["backend"] == b]
        if not mine:
            continue
        bf16 = [r for r in mine if r["dtype"] == "bfloat16"]
        piip = [r for r in bf16 if not r["case"].startswith("DETR")]
        detr = [r for r in bf16 if r["case"].startswith("DETR")]
        b8 = [r for r in mine if r["batch"] == 8]
        out += [
            vs_detr(f"ms_deform_attn [{b}] bf16 fwd vs DETR kernel, PIIP shapes", piip, "fwd", 5),
            vs_detr(f"ms_deform_attn [{b}] bf16 fwd+bwd vs DETR kernel, PIIP shapes", piip, "fwd_bwd", 4),
            vs_detr(f"ms_deform_attn [{b}] bf16 fwd+bwd vs DETR kernel, 4-level encoder", detr, "fwd_bwd", 3),
            verdict(f"ms_deform_attn [{b}] batch 8 fwd x floor", b8, "fwd_x_floor", 2, False),
            verdict(f"ms_deform_attn [{b}] batch 8 fwd+bwd x floor", b8, "fwd_bwd_x_floor", 3, False),
        ]
    # Triton against CUDA (in the dry run: the first backend given against itself).
    first, second = (backends[0], backends[-1])
    cuda = {(r["case"], r["batch"], r["dtype"]): r for r in rows if r["backend"] == first}
    ratios = []
    for r in rows:
        c = cuda.get((r["case"], r["batch"], r["dtype"]))
        if r["backend"] == second and c:
            # Kernel times (CUDA-graph replays) where both were measured, else eager calls.
            ratio = [_kernel_ms(r, c, k)[0] / _kernel_ms(r, c, k)[1] for k in ("fwd", "fwd_bwd")]
            ratios.append({**r, "triton_over_cuda": max(ratio)})
    out.append(verdict("ms_deform_attn triton time / cuda time (worse of fwd, fwd+bwd)", ratios, "triton_over_cuda", 1.5, False))
    return out


def interaction_checks(rows: list[dict], backends=GPU_BACKENDS) -> list[tuple[str, str]]:
    out = []
    for b in backends:
        # The kernels alone (CUDA-graph replays) where both paths were captured, else eager calls.
        fused = [{**r, "vs_unfused": r.get("fwd_bwd_gpu_vs_unfused_same_backend") or r.get("fwd_bwd_vs_unfused_same_backend")}
                 for r in rows if r["path"] == f"fused ({b})" and r["dtype"] == "bfloat16"]
        if fused:
            out.append(verdict(f"deform_cross_attn [{b}] bf16 fwd+bwd vs unfused same backend", fused, "vs_unfused", 2, True))
    return out or [("MISSING", "deform_cross_attn: no bf16 GPU rows")]


def merge_checks(rows: list[dict], backends=GPU_BACKENDS) -> list[tuple[str, str]]:
    out = []
    for b in backends:
        mine = [r for r in rows if r["path"] == f"branch_merge ({b})" and r["dtype"] == "bfloat16"]
        if mine:
            out += [
                verdict(f"branch_merge [{b}] bf16 fwd vs eager", mine, "fwd_vs_eager", 15, True),
                verdict(f"branch_merge [{b}] bf16 fwd x floor", mine, "fwd_x_floor", 1.5, False),
                verdict(f"branch_merge [{b}] bf16 fwd+bwd vs eager", mine, "fwd_bwd_vs_eager", 8, True),
            ]
    return out or [("MISSING", "branch_merge: no bf16 GPU rows")]


def model_checks(rows: list[dict], memory: list[dict]) -> list[tuple[str, str]]:
    sbl = [r for r in rows if r["path"] == "ours" and "sbl_1568_1120_672" in r["config"] and r["dtype"] == "bfloat16"
           and r.get("scale") == 1.0]
    out = [verdict("model step SBL det bf16 ours vs official", sbl, "speedup", 1.3, True)]
    out.append(verdict("memory planner / measured (above)", memory, "plan_over_measured", 1.1, False))
    out.append(verdict("memory planner / measured (below)", memory, "plan_over_measured", 0.9, True))
    return out


def check(results: Path = RESULTS, device: str = "cuda", backends=GPU_BACKENDS) -> list[tuple[str, str]]:
    """(status, line) for every target, from the latest records of `device`. `backends`: the
    kernel backends judged (the GPU ones; the dry run passes "cpu" so that every check runs)."""
    backends = tuple(backends)
    msda = latest(results, f"msda_{device}")
    return ((msda_checks(msda, backends) if msda else [("MISSING", "ms_deform_attn: no record")])
            + interaction_checks(latest(results, f"interaction_{device}"), backends)
            + merge_checks(latest(results, f"branch_merge_{device}"), backends)
            + model_checks(latest(results, f"model_{device}"), latest(results, f"memory_validation_{device}")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", nargs="+", default=list(GPU_BACKENDS),
                   help="kernel backends to judge (default cuda triton; the dry run judges cpu)")
    args = p.parse_args(argv)
    lines = check(args.results, args.device, args.backends)
    path = args.results / f"msda_{args.device}.jsonl"
    if path.exists() and path.read_text().strip():
        env = json.loads(path.read_text().strip().splitlines()[-1])["env"]
        if env.get("dry_run"):
            print(f"DRY RUN records ({env['dry_run']}): the verdicts below only show that every check runs")
    for status, line in lines:
        print(f"{status:8s}{line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
