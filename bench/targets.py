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
  training ladder    (bench/ladder.py, model_ladder_<device>) GPU: SBL detection, bf16,
                     batch 2: the best rung >= 2.0x the official recipe's row, >= 35 % of the
                     bf16 peak, the GPU busy >= 90 % of its step. CPU (TSB classification, fp32,
                     batch 2): every rung's max_rel_diff <= 1e-5 and max_rel_diff_step2 <= 1e-5 +
                     2 lr_max (step2_bound), the best rung >= 1.4x official.
                     Both: no rung's peak memory > 5 % over official unless its note says why
  Hugging Face step  (bench_hf.py, hf_<device>; full sizes only) GPU: ours >= 2x transformers'
                     default path on Deformable DETR and >= 1.5x on Mask2Former, >= 1.1x the
                     Deformable DETR kernel's path (live), never slower on RT-DETR. CPU: ours
                     >= 2.0x default on Deformable DETR

``--device cpu`` judges the CPU targets of the ladder and the Hugging Face step on the
committed CPU records (the kernel targets are GPU targets: their CPU lines say so).
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
    shown = f"{worst:.3g}" if 0 < abs(worst) < 0.01 else f"{worst:.2f}"  # relative differences stay visible
    return ("PASS" if ok else "FAIL"), f"{target}: worst {shown} ({where}); need {sign} {limit:g}; {len(vals)} cases"


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


# The ladder's numerical targets on the CPU (fp32), against eager ours from the same weights.
# Step 1 (max_rel_diff, before any optimizer step): the rungs compute the same loss and
# gradients with other kernels, so they may differ by fp32 rounding only, summed over a step.
MAX_REL_DIFF = 1e-5
LADDER_CONTROL = "ours_again"  # bench/ladder.py --control's row


def step2_bound(lr_max: float) -> float:
    """The bound on max_rel_diff_step2, the second step's loss and gradients, after one
    optimizer step, for a recipe whose largest group learning rate is ``lr_max``.

    Adam's first update is lr * m/(sqrt(v) + eps) = lr * g/(|g| + eps) (bias-corrected: the
    betas cancel), that is lr * sign(g) for every gradient above eps, whatever its rounding.
    So a correct optimizer, given gradients that differ from eager ours' by rounding (step 1,
    MAX_REL_DIFF), leaves weights that differ in two ways only: by the fp32 rounding of the
    update (ulps of the weight), and by 2 lr <= 2 lr_max where a near-zero gradient, one that
    cancels to rounding level, changed sign. Such a weight changes its layer's output by at
    most 2 lr_max times the output's input scale; here weights act on LayerNorm-ed
    activations, or are LayerNorm gains and biases and residual gates, of unit scale, so to
    first order the activations after it, and every gradient, move by about 2 lr_max of their
    scale. Step 2's own kernel differences add MAX_REL_DIFF. Hence MAX_REL_DIFF + 2 lr_max:
    6.1e-4 for the TSB classification recipe (lr 3e-5, the parts trained from scratch at 10x),
    where the rungs measured 2.6e-6 to 3.3e-5.
    It is a first-order estimate for isolated sign changes, not a guarantee: a sampling point
    moved across a pixel edge changes its location gradient by a step (bilinear
    interpolation's gradient is piecewise constant). Step-1 gradients perturbed in every
    element by up to 3e-6 of each tensor's largest value (far more sign changes than the
    rungs' rounding makes) read 8e-2 at step 2 on the TSB classifier, 1.2e-4 on the tiny
    model of tests/test_ladder.py. What it is for: a fault of the optimizer moves whole
    tensors by about lr. Measured at step 2 against torch's AdamW, from the same step-1
    gradients: a group at twice its lr 0.97 (TSB) and 0.46 (tiny), every lr 10 % off 0.45
    and 4.9e-2, one tensor left unstepped (a stale master) 0.40 and 3.8e-2, nothing stepped
    3.4 and 0.49; the fused optimizer done right 2.6e-6 and 8.6e-7. Adam's betas and eps
    are not seen (the first update does not depend on them); weight decay, lr * wd * w a
    step, only where it moves sampling points across pixel edges (left out: 0.23 on TSB,
    2.5e-4 on the tiny model)."""
    return MAX_REL_DIFF + 2 * lr_max


def ladder_checks(rows: list[dict], device: str, any_config: bool = False) -> list[tuple[str, str]]:
    """The training ladder's targets on its latest record (see the module docstring).
    ``any_config``: judge whatever the record holds (the dry run's tiny model)."""
    if any_config:
        what = "ladder (any config: dry run)"
    elif device == "cuda":
        rows = [r for r in rows if "sbl_1568_1120_672" in r.get("config", "") and r.get("dtype") == "bfloat16"
                and r.get("batch") == 2 and r.get("scale") == 1.0]
        what = "ladder SBL det bf16 batch 2"
    else:
        rows = [r for r in rows if "tsb_368" in r.get("config", "") and r.get("batch") == 2]
        what = "ladder TSB cls fp32 batch 2"
    numeric = []
    if device != "cuda":  # fp32 on the CPU: judged whether or not the rows were timed
        numeric.append(verdict(f"{what}: every rung's max_rel_diff vs eager ours", rows, "max_rel_diff", MAX_REL_DIFF, False))
        lr_max = max((r["lr_max"] for r in rows if r.get("lr_max")), default=None)
        step2 = f"{what}: every rung's max_rel_diff_step2 (after one optimizer step) vs eager ours"
        numeric.append(verdict(step2, rows, "max_rel_diff_step2", step2_bound(lr_max), False) if lr_max else
                       ("MISSING", f"{step2}: the record has no lr_max (a ladder older than the check)"))
    # The control row (a second copy of ours) measures noise: it is no rung.
    rungs = [r for r in rows if r["path"] not in ("official", LADDER_CONTROL) and r.get("speedup") is not None]
    if not rungs:
        return [("MISSING", f"{what}: no measured rung")] + (numeric if rows else [])
    best = [max(rungs, key=lambda r: r["speedup"])]
    out = [verdict(f"{what}: best rung ({best[0]['path']}) vs official", best, "speedup", 2.0 if device == "cuda" else 1.4, True)]
    if device == "cuda":
        out.append(verdict(f"{what}: best rung's fraction of the bf16 peak", best, "peak_fraction", 0.35, True))
        out.append(verdict(f"{what}: best rung's GPU busy share", best, "gpu_busy", 0.9, True))
    out += numeric
    official = next((r for r in rows if r["path"] == "official"), {})
    over = [{**r, "mem_over_official": r["peak_mem_mb"] / official["peak_mem_mb"]} for r in rungs
            if r.get("peak_mem_mb") and official.get("peak_mem_mb") and "over official:" not in (r.get("note") or "")]
    out.append(verdict(f"{what}: peak memory / official (rungs without a stated reason)", over, "mem_over_official", 1.05, False))
    return out


def hf_checks(rows: list[dict], device: str, any_config: bool = False) -> list[tuple[str, str]]:
    """The Hugging Face step's targets (full-size rows only, unless ``any_config``: the dry run's tiny ones)."""
    ours = [r for r in rows if r["path"] == "ours" and (any_config or not r.get("tiny"))]
    if not ours:
        return [("MISSING", "Hugging Face step: no full-size rows")]
    def of(model):
        return [r for r in ours if r["model"] == model]
    if device != "cuda":
        return [verdict("HF Deformable DETR step, ours vs transformers' default (CPU)", of("deformable_detr"), "speedup", 2.0, True)]
    return [verdict("HF Deformable DETR step, ours vs default", of("deformable_detr"), "speedup", 2.0, True),
            verdict("HF Mask2Former step, ours vs default", of("mask2former"), "speedup", 1.5, True),
            verdict("HF Deformable DETR step, ours vs the DETR kernel's path (live)", of("deformable_detr"), "vs_detr_live", 1.1, True),
            verdict("HF RT-DETR step, ours vs default (never slower)", of("rt_detr"), "speedup", 1.0, True)]


def check(results: Path = RESULTS, device: str = "cuda", backends=GPU_BACKENDS, any_config: bool = False) -> list[tuple[str, str]]:
    """(status, line) for every target, from the latest records of `device`. `backends`: the
    kernel backends judged (the GPU ones; the dry run passes "cpu" so that every check runs);
    ``any_config``: the model-level checks take any config and size (the dry run's tiny ones)."""
    backends = tuple(backends)
    msda = latest(results, f"msda_{device}")
    return ((msda_checks(msda, backends) if msda else [("MISSING", "ms_deform_attn: no record")])
            + interaction_checks(latest(results, f"interaction_{device}"), backends)
            + merge_checks(latest(results, f"branch_merge_{device}"), backends)
            + model_checks(latest(results, f"model_{device}"), latest(results, f"memory_validation_{device}"))
            + ladder_checks(latest(results, f"model_ladder_{device}"), device, any_config)
            + hf_checks(latest(results, f"hf_{device}"), device, any_config))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", nargs="+", default=list(GPU_BACKENDS),
                   help="kernel backends to judge (default cuda triton; the dry run judges cpu)")
    p.add_argument("--any-config", action="store_true",
                   help="model-level checks on any config and size (the dry run's tiny models)")
    args = p.parse_args(argv)
    lines = check(args.results, args.device, args.backends, args.any_config)
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
