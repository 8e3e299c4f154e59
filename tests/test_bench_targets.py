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
    old = [msda_row("SBL a", 2, "bfloat16", "cuda", 1.0, 1.0, fwd_vs_detr_live=0.1)]
    new = [
        msda_row("SBL a", 2, "bfloat16", "cuda", 0.010, 0.05, fwd_vs_detr_live=6.0, fwd_bwd_vs_detr_live=4.5),
        msda_row("SBL b", 2, "bfloat16", "cuda", 0.020, 0.08, fwd_vs_detr_live=5.5, fwd_bwd_vs_detr_live=3.9),
        msda_row("DETR enc", 2, "bfloat16", "cuda", 0.2, 0.7, fwd_vs_detr_live=3.3, fwd_bwd_vs_detr_live=3.4),
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


def test_published_figures_never_decide_the_detr_targets(tmp_path):
    """Without the DETR kernel timed in the same run the target is MISSING, whatever the
    ratio to its published figures (another GPU's timings); the line still quotes it."""
    write(tmp_path, "msda_cuda", [msda_row("SBL a", 2, "bfloat16", "cuda", 0.01, 0.05,
                                           fwd_vs_detr_kernel=9.0, fwd_bwd_vs_detr_kernel=9.0)])
    lines = dict((line.split(":")[0], (status, line)) for status, line in targets.check(tmp_path, "cuda"))
    status, line = lines["ms_deform_attn [cuda] bf16 fwd vs DETR kernel, PIIP shapes"]
    assert status == "MISSING" and "published H100 figures" in line and "9.00" in line


def test_live_detr_kernel_runner_and_ratios(tmp_path, monkeypatch):
    """bench_msda's runner for the Deformable DETR extension, with a stand-in extension of the
    same interface (our reference op), and the live ratios computed from its rows."""
    import sys

    import torch

    from helpers import msda_inputs, run_with_grads

    from piip_kernels import ms_deform_attn

    (tmp_path / "MultiScaleDeformableAttention.py").write_text(
        "import torch\n"
        "from piip_kernels import ms_deform_attn_reference as ref\n"
        "def ms_deform_attn_forward(v, s, st, l, a, step):\n"
        "    assert step == 64 and v.dtype == torch.float32\n"
        "    return ref(v, s, st, l, a)\n"
        "def ms_deform_attn_backward(v, s, st, l, a, go, step):\n"
        "    with torch.enable_grad():\n"
        "        v, l, a = (t.detach().requires_grad_() for t in (v, l, a))\n"
        "        return torch.autograd.grad(ref(v, s, st, l, a), (v, l, a), go)\n")
    monkeypatch.setenv("PIIP_ANCHOR_DIR", str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("MultiScaleDeformableAttention", None)
    import bench_msda

    run = bench_msda.anchor_runner()
    assert run is not None
    inputs = msda_inputs([(5, 6), (2, 3)], Lq=4, M=2, D=3, P=2)
    got, go = run_with_grads(run, inputs)
    want, _ = run_with_grads(lambda *a: ms_deform_attn(*a, backend="reference"), inputs, go)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    sys.modules.pop("MultiScaleDeformableAttention", None)

    rows = [
        {"case": "c", "batch": 2, "dtype": "bfloat16", "backend": "cuda", "fwd_ms": 0.5, "fwd_bwd_ms": 1.0,
         "fwd_gpu_ms": 0.1, "fwd_bwd_gpu_ms": 0.4},
        {"case": "c", "batch": 2, "dtype": "float32", "backend": "detr kernel", "fwd_ms": 1.0, "fwd_bwd_ms": 3.0,
         "fwd_gpu_ms": 0.6, "fwd_bwd_gpu_ms": None},
    ]

    class Args:
        no_save, locations = True, "grid"

    bench_msda._finish(Args, torch.device("cpu"), 1.0, rows)
    ours = next(r for r in rows if r["backend"] == "cuda")
    assert ours["fwd_vs_detr_live"] == 0.6 / 0.1          # kernels: both captured
    assert ours["fwd_bwd_vs_detr_live"] == 3.0 / 1.0      # eager calls: the DETR graph was not


def test_model_and_memory_targets(tmp_path):
    write(tmp_path, "model_cuda", [
        {"config": "mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16", "path": "ours", "dtype": "bfloat16", "scale": 1.0,
         "speedup": 1.25, "batch": 2},
        {"config": "mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16", "path": "official", "dtype": "bfloat16", "scale": 1.0, "batch": 2},
    ])
    write(tmp_path, "memory_validation_cuda", [{"config": "x", "batch": 1, "dtype": "bfloat16", "plan_over_measured": 0.95}])
    got = by_target(targets.check(tmp_path, "cuda"))
    assert got["model step SBL det bf16 ours vs official"] == "FAIL"  # 1.25 < 1.3
    assert got["memory planner / measured (above)"] == "PASS" and got["memory planner / measured (below)"] == "PASS"


def test_bench_model_one_case_on_the_cpu():
    """bench_model's case runner on a full-size classification preset at a small input:
    both paths, the speed-up, the time share of sampling and merging, the peak memory."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import torch

    import bench_model

    rows = bench_model.run_case("piip_3branch_tsb_368-192-128_cls_token_deit1", 1, 0.35, torch.float32, torch.device("cpu"),
                                False, steps=1, warmup=0, paths=["ours", "official"])
    assert [r["path"] for r in rows] == ["ours", "official"]
    for r in rows:
        assert r["side"] == 128 and r["step_ms"] > 0 and 0 < r["msda_share"] < 1
        assert r["peak_mem_mb"] > 144e6 * 16 / 2 ** 20 * 0.9  # parameters, AdamW states and gradients at least
    assert rows[0]["speedup"] == rows[1]["step_ms"] / rows[0]["step_ms"]


def ladder_row(path, speedup, **kw):
    return {"config": "mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16", "dtype": "bfloat16", "batch": 2, "scale": 1.0,
            "path": path, "speedup": speedup, **kw}


def test_ladder_targets_judge_the_best_rung(tmp_path):
    write(tmp_path, "model_ladder_cuda", [
        ladder_row("official", 1.0, peak_mem_mb=1000.0),
        ladder_row("ours", 1.2, peak_mem_mb=1010.0, peak_fraction=0.2, gpu_busy=0.7),
        ladder_row("compile", 2.1, peak_mem_mb=1100.0, peak_fraction=0.36, gpu_busy=0.85),
        # A rung over the memory bound that says why is not held against the target.
        ladder_row("cuda_graphs", 1.9, peak_mem_mb=1300.0, note="peak +30% over official: static graph buffers"),
    ])
    lines = dict((line.split(":")[1].strip(), s) for s, line in targets.check(tmp_path, "cuda") if line.startswith("ladder"))
    assert lines["best rung (compile) vs official"] == "PASS"                   # 2.1x
    assert lines["best rung's fraction of the bf16 peak"] == "PASS"
    assert lines["best rung's GPU busy share"] == "FAIL"                        # 0.85 < 0.9
    assert lines["peak memory / official (rungs without a stated reason)"] == "FAIL"  # compile: 1.10


def test_ladder_cpu_targets_and_any_config(tmp_path):
    rows = [{"config": "piip_3branch_tsb_368-192-128_cls_token_deit1", "batch": 2, "dtype": "float32", "path": p,
             "speedup": s, "max_rel_diff": d} for p, s, d in (("official", 1.0, 0.0), ("ours", 1.1, 2e-7), ("compile", 1.5, 2e-5),
                                                               ("ours_again", 1.6, 0.0))]   # the control is no rung
    write(tmp_path, "model_ladder_cpu", rows)
    lines = {line.split(":")[1].strip(): s for s, line in targets.ladder_checks(rows, "cpu")}
    assert lines["best rung (compile) vs official"] == "PASS" and lines["every rung's max_rel_diff vs eager ours"] == "FAIL"
    tiny = [dict(r, config="tiny") for r in rows]
    assert targets.ladder_checks(tiny, "cpu")[0][0] == "MISSING"          # never judged as the preset
    assert targets.ladder_checks(tiny, "cpu", any_config=True)[0][0] == "PASS"


def test_ladder_step2_bound():
    """max_rel_diff_step2 (after one optimizer step) against 1e-5 + 2 lr_max: rounding-level
    differences pass, an optimizer fault's fails, and a record without lr_max is MISSING
    (never judged against a guessed bound). The speed lines need timed rows; these do not."""
    def rows(step2, lr_max=3e-4, timed=True):
        return [{"config": "piip_3branch_tsb_368-192-128_cls_token_deit1", "batch": 2, "dtype": "float32", "path": p,
                 "max_rel_diff": 3e-6, "max_rel_diff_step2": d, "lr_max": lr_max,
                 **({"speedup": 1.1} if timed and p != "official" else {})}
                for p, d in (("official", 3.0e-5), ("ours", 0.0), ("fused_optimizer", step2))]

    name = "every rung's max_rel_diff_step2 (after one optimizer step) vs eager ours"

    def judged(rs):
        return {line.split(": ", 1)[1].split(":")[0]: (s, line) for s, line in targets.ladder_checks(rs, "cpu")}

    assert targets.step2_bound(3e-4) == 1e-5 + 6e-4
    status, line = judged(rows(3.3e-5))[name]
    assert status == "PASS" and "worst 3.3e-05" in line and "need <= 0.00061" in line
    assert judged(rows(7e-4))[name][0] == "FAIL"                # above 6.1e-4
    assert judged(rows(7e-4, lr_max=1e-3))[name][0] == "PASS"   # a recipe with a larger lr allows more
    assert judged(rows(7e-4, lr_max=None))[name][0] == "MISSING"
    untimed = judged(rows(7e-4, timed=False))
    assert untimed[name][0] == "FAIL" and untimed["no measured rung"][0] == "MISSING"


def test_hugging_face_targets(tmp_path):
    def row(model, path, **kw):
        return {"model": model, "path": path, "batch": 1, "dtype": "float32", **kw}

    rows = [row("deformable_detr", "default"), row("deformable_detr", "ours", speedup=2.3, vs_detr_live=1.05),
            row("mask2former", "ours", speedup=1.6), row("rt_detr", "ours", speedup=0.98),
            row("deformable_detr", "ours", speedup=9.0, tiny=True)]      # a dry-run row never counts
    got = {line.split(",")[0]: s for s, line in targets.hf_checks(rows, "cuda")}
    assert got == {"HF Deformable DETR step": "FAIL", "HF Mask2Former step": "PASS", "HF RT-DETR step": "FAIL"}
    lines = [line for _, line in targets.hf_checks(rows, "cuda")]
    assert any("worst 2.30" in line and "ours vs default" in line for line in lines)   # not the tiny 9.0
    assert targets.hf_checks(rows, "cpu")[0][0] == "PASS"


def test_triton_against_cuda_on_kernel_times_where_both_were_measured():
    rows = [msda_row("a", 2, "bfloat16", "cuda", 1.0, 1.0, fwd_gpu_ms=0.10, fwd_bwd_gpu_ms=0.20),
            msda_row("a", 2, "bfloat16", "triton", 3.0, 3.0, fwd_gpu_ms=0.12, fwd_bwd_gpu_ms=0.28),
            msda_row("b", 2, "bfloat16", "cuda", 1.0, 1.0),
            msda_row("b", 2, "bfloat16", "triton", 1.3, 1.2, fwd_gpu_ms=0.1)]   # eager on both sides
    line = [ln for s, ln in targets.msda_checks(rows) if "triton time / cuda time" in ln][0]
    assert "worst 1.40 (a," in line and "PASS" == [s for s, ln in targets.msda_checks(rows) if ln == line][0]
