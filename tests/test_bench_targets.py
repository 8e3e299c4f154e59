"""bench/targets.py: the issue targets read from benchmark records (synthetic records here;
the real ones come from bench/gpu_check.sh on a GPU)."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_targets", ROOT / "bench" / "targets.py")
targets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(targets)


def msda_row(case, batch, dtype, backend, fwd, fb, **kw):
    return {"case": case, "batch": batch, "dtype": dtype, "backend": backend, "fwd_ms": fwd, "fwd_bwd_ms": fb, **kw}


def write(tmp_path, name, *records):
    with (tmp_path / f"{name}.jsonl").open("w") as f:
        for rows in records:
            f.write(json.dumps({"env": {}, "rows": rows}) + "\n")


def by_target(lines):
    return {line.split(":")[0]: status for status, line in lines}


def test_targets_pass_fail_and_missing(tmp_path):
    old = [msda_row("SBL a", 2, "bfloat16", "cuda", 1.0, 1.0, fwd_vs_detr_kernel=0.1)]
    new = [
        msda_row("SBL a", 2, "bfloat16", "cuda", 0.010, 0.05, fwd_vs_detr_kernel=6.0, fwd_bwd_vs_detr_kernel=4.5),
        msda_row("SBL b", 2, "bfloat16", "cuda", 0.020, 0.08, fwd_vs_detr_kernel=5.5, fwd_bwd_vs_detr_kernel=3.9),
        msda_row("DETR enc", 2, "bfloat16", "cuda", 0.2, 0.7, fwd_vs_detr_kernel=3.3, fwd_bwd_vs_detr_kernel=3.4),
        msda_row("SBL a", 8, "float32", "cuda", 0.05, 0.2, fwd_x_floor=1.9, fwd_bwd_x_floor=2.5),
        msda_row("SBL a", 8, "float32", "triton", 0.07, 0.25, fwd_x_floor=2.7, fwd_bwd_x_floor=3.1),
    ]
    write(tmp_path, "msda_cuda", old, new)  # only the latest record counts
    write(tmp_path, "interaction_cuda", [
        # The kernel-only (CUDA graph) ratio decides where it was measured.
        {"case": "x", "dtype": "bfloat16", "path": "fused (cuda)", "fwd_bwd_vs_unfused_same_backend": 1.2,
         "fwd_bwd_gpu_vs_unfused_same_backend": 2.4},
        {"case": "y", "dtype": "bfloat16", "path": "fused (triton)", "fwd_bwd_vs_unfused_same_backend": 1.7},
    ])
    got = by_target(targets.check(tmp_path, "cuda"))
    assert got["ms_deform_attn [cuda] bf16 fwd vs DETR kernel, PIIP shapes"] == "PASS"
    assert got["ms_deform_attn [cuda] bf16 fwd+bwd vs DETR kernel, PIIP shapes"] == "FAIL"  # 3.9 < 4 on SBL b
    assert got["ms_deform_attn [cuda] bf16 fwd+bwd vs DETR kernel, 4-level encoder"] == "PASS"
    assert got["ms_deform_attn [cuda] batch 8 fwd x floor"] == "PASS"
    assert got["ms_deform_attn [triton] batch 8 fwd x floor"] == "FAIL"
    assert got["ms_deform_attn [triton] bf16 fwd vs DETR kernel, PIIP shapes"] == "MISSING"
    assert got["ms_deform_attn triton time / cuda time (worse of fwd, fwd+bwd)"] == "PASS"  # 0.07 / 0.05 = 1.4
    assert got["deform_cross_attn [cuda] bf16 fwd+bwd vs unfused same backend"] == "PASS"
    assert got["deform_cross_attn [triton] bf16 fwd+bwd vs unfused same backend"] == "FAIL"
    assert got["branch_merge"] == "MISSING"


def test_worst_case_is_reported(tmp_path):
    write(tmp_path, "branch_merge_cuda", [
        {"case": "a", "batch": 2, "dtype": "bfloat16", "path": "branch_merge (cuda)", "fwd_vs_eager": 20.0, "fwd_x_floor": 1.2,
         "fwd_bwd_vs_eager": 9.0},
        {"case": "b", "batch": 8, "dtype": "bfloat16", "path": "branch_merge (cuda)", "fwd_vs_eager": 16.0, "fwd_x_floor": 1.6,
         "fwd_bwd_vs_eager": 12.0},
    ])
    lines = dict((line.split(":")[0], (status, line)) for status, line in targets.check(tmp_path, "cuda"))
    status, line = lines["branch_merge [cuda] bf16 fwd x floor"]
    assert status == "FAIL" and "worst 1.60 (b, 8, bfloat16)" in line
    assert lines["branch_merge [cuda] bf16 fwd vs eager"][0] == "PASS"
    assert lines["ms_deform_attn"][0] == "MISSING"
