"""bench/ladder.py (also bench_model.py --ladder) on the tiny built-in model on the CPU: every
row's columns, max_rel_diff and max_rel_diff_step2 against eager ours (and an optimizer
fault that only the second catches), a rung that cannot run (an unknown compile backend)
saying why while the others run, the CUDA-graph rung's code through its CPU stand-in, the
profile files and the JSON; the timing protocol's rounds (common.timed_rounds) and its
control row. (Compiled regions against eager: tests/test_compile.py.)"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_model  # noqa: E402
import common  # noqa: E402
import ladder  # noqa: E402
import targets  # noqa: E402


def judged(rows) -> dict:
    """bench/targets.py's ladder lines on these rows: {target: PASS / FAIL / MISSING}."""
    prefix = "ladder (any config: dry run): "
    return {line[len(prefix):].split(":")[0]: s for s, line in targets.ladder_checks(rows, "cpu", any_config=True)}


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profile")
    rows = ladder.run_ladder(ladder.TINY, 2, 1.0, torch.float32, torch.device("cpu"), steps=2, warmup=1,
                             compile_backend="no_such_backend", profile_dir=str(folder), control=True)
    return rows, folder


def test_rows_and_columns(tiny_rows):
    rows, _ = tiny_rows
    assert [r["path"] for r in rows] == list(ladder.RUNGS) + [ladder.CONTROL]
    for r in rows:
        assert set(ladder.LADDER_COLUMNS) <= set(r), set(ladder.LADDER_COLUMNS) - set(r)
        assert r["config"] == "tiny" and r["dtype"] == "float32" and r["batch"] == 2
    timed = {r["path"]: r for r in rows if r.get("step_ms")}
    assert set(timed) == {"official", "ours", "fused_optimizer", "exact_resize", ladder.CONTROL}
    assert "noise" in timed[ladder.CONTROL]["note"]
    for r in timed.values():
        assert r["step_ms"] > 0 and r["speedup"] > 0 and r["tflops"] > 0
        assert r["aten_ops"] > 0 and r["copies"] > 0 and r["copies_mb"] > 0 and r["peak_mem_mb"] > 0
        assert r.get("gpu_busy") is None and r.get("kernels") is None and r.get("peak_fraction") is None  # CPU
        # The protocol: two kept rounds after one warm-up round, the machine's other load recorded.
        assert len(r["step_ms_all"]) == 2 and r["min_ms"] == min(r["step_ms_all"]) <= r["step_ms"]
        assert r["warmup_rounds"] == 1 and r["rounds_redone"] == 0 and 0 <= r["others_cpu"] <= 1
        assert r["setup_s"] > 0 and r["lr_max"] == pytest.approx(3e-4)  # the TSB recipe: 3e-5, x10 from scratch
    assert timed["official"]["speedup"] == 1.0
    # torch's fused AdamW is one call per group instead of a loop of calls per parameter.
    assert timed["fused_optimizer"]["aten_ops"] < timed["ours"]["aten_ops"] / 1.2


def test_max_rel_diff_against_eager_ours(tiny_rows):
    rows, _ = tiny_rows
    diffs = {r["path"]: r.get("max_rel_diff") for r in rows}
    assert diffs["ours"] == 0.0
    for path in ("official", "fused_optimizer", "exact_resize", "cuda_graphs"):
        assert diffs[path] is not None and diffs[path] <= 1e-5, (path, diffs[path])
    # After one optimizer step: within the bound bench/targets.py derives from the recipe's lr.
    step2 = {r["path"]: r.get("max_rel_diff_step2") for r in rows}
    assert step2["ours"] == 0.0
    assert diffs[ladder.CONTROL] == step2[ladder.CONTROL] == 0.0   # a second copy of ours: the same bits
    for path in ("official", "fused_optimizer", "exact_resize", "cuda_graphs"):
        assert step2[path] is not None and step2[path] <= targets.step2_bound(3e-4), (path, step2[path])
    lines = judged(rows)
    assert lines["every rung's max_rel_diff_step2 (after one optimizer step) vs eager ours"] == "PASS"


def test_step2_catches_an_optimizer_fault_that_step1_cannot_see(monkeypatch):
    """A fused optimizer that steps one group at twice its lr: the gradients of the first
    step (taken before any optimizer step) are exact, the second step's are not."""
    make = ladder.make_optimizer

    def faulty(model, preset, fused, capturable):
        opt = make(model, preset, fused, capturable)
        if fused:
            max(opt.param_groups, key=lambda g: len(g["params"]))["lr"] *= 2
        return opt

    monkeypatch.setattr(ladder, "make_optimizer", faulty)
    rows = ladder.run_ladder(ladder.TINY, 2, 1.0, torch.float32, torch.device("cpu"), steps=1, warmup=0,
                             rungs=("ours", "fused_optimizer"))
    fused = rows[1]
    assert fused["max_rel_diff"] == 0.0 and fused["max_rel_diff_step2"] > 10 * targets.step2_bound(fused["lr_max"])
    lines = judged(rows)
    assert lines["every rung's max_rel_diff vs eager ours"] == "PASS"
    assert lines["every rung's max_rel_diff_step2 (after one optimizer step) vs eager ours"] == "FAIL"


def test_a_disturbed_timing_says_so(monkeypatch):
    """Without --wait-idle, rounds that other processes disturbed are kept, and every timed
    row says it is not comparable."""
    monkeypatch.setattr(common, "others_busy", lambda since: 0.5)
    row, = ladder.run_ladder(ladder.TINY, 1, 1.0, torch.float32, torch.device("cpu"), steps=1, warmup=0, rungs=("ours",))
    assert row["others_cpu"] == 0.5 and row["rounds_redone"] == 0
    assert "disturbed: other processes took up to 50% of the CPUs" in row["note"]


def test_timed_rounds_redo_disturbed_rounds_rotate_and_stop(monkeypatch):
    """Rounds in which other processes took the CPUs are discarded and run again after a
    wait; each round starts at the next step; warm-up rounds come first, after a wait for an
    idle machine, and are not timed."""
    shares = iter([0.5, 0.0, 0.2, 0.0, 0.0])
    monkeypatch.setattr(common, "others_busy", lambda since: next(shares))
    waits, calls = [], []
    monkeypatch.setattr(common, "wait_idle", waits.append)
    steps = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    got = common.timed_rounds(steps, 3, torch.device("cpu"), wait_s=7, warmup=1, rotate=True)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab" + "abc" + "bca"  # warm-up, then 5 rounds, 2 discarded
    # One wait before the warm-up, one after each discarded round.
    assert got.redone == 2 and waits == [7, 7, 7] and got.others == [0.0, 0.0, 0.0] and got.others_cpu == 0.0
    assert all(len(t) == 3 and min(t) >= 0 for t in got.times.values())
    # Without wait_s a disturbed round is kept and shows in others_cpu; stop() ends after a kept round.
    shares = iter([0.3, 0.0])
    calls.clear()
    got = common.timed_rounds(steps, 3, torch.device("cpu"), stop=lambda: True)
    assert "".join(calls) == "abc" and got.redone == 0 and got.others_cpu == 0.3 and len(got.times["a"]) == 1
    # Nothing to time (every rung skipped): no round, no wait.
    waits.clear()
    assert common.timed_rounds({}, 3, torch.device("cpu"), wait_s=7, warmup=2, rotate=True).times == {} and not waits


def test_a_rung_that_cannot_run_says_why(tiny_rows):
    rows, _ = tiny_rows
    by = {r["path"]: r for r in rows}
    assert by["compile"]["note"].startswith("skipped: torch.compile(backend='no_such_backend') fails on cpu")
    assert by["compile"].get("step_ms") is None and by["compile"].get("max_rel_diff") is None
    graphs = by["cuda_graphs"]
    assert "without compile" in graphs["note"] and "needs CUDA" in graphs["note"] and graphs.get("step_ms") is None
    assert "grid_sample" in by["official"]["note"]


def test_profile_files(tiny_rows):
    _, folder = tiny_rows
    table = (folder / "ladder_kinds_cpu.md").read_text()
    for kind in ladder.KINDS:
        assert kind in table
    assert "Commit " in table and "after the 2 timed rounds" in table and "0 disturbed rounds run again" in table
    kinds = json.loads((folder / "ladder_kinds_cpu.json").read_text())
    assert set(kinds["kinds"]) == {"official", "ours", "fused_optimizer", "exact_resize", ladder.CONTROL}
    # Every rung spends time in GEMMs and in the optimizer; the official row's sampling
    # (grid_sample) and ours (our kernels) both count as our ops.
    for r, v in kinds["kinds"].items():
        assert v["GEMM"] > 0 and v["optimizer"] > 0 and v["our ops"] > 0, (r, v)
    assert (folder / "top_ops_official.txt").exists()


def test_command_line_json_and_bad_rungs(tmp_path):
    out = tmp_path / "rows.json"
    assert bench_model.main(["--ladder", "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--rungs",
                             "official", "ours", "--json", str(out), "--no-save"]) == 0
    data = json.loads(out.read_text())
    assert [r["path"] for r in data["rows"]] == ["official", "ours"] and "commit" in data["env"]
    with pytest.raises(SystemExit, match="choose from"):
        ladder.run_ladder(ladder.TINY, 1, 1.0, torch.float32, torch.device("cpu"), 1, 0, rungs=("official", "fast"))
    with pytest.raises(SystemExit, match="ours"):
        ladder.run_ladder(ladder.TINY, 1, 1.0, torch.float32, torch.device("cpu"), 1, 0, rungs=("official",))
    assert not os.path.exists(ROOT / "bench" / "results" / "model_ladder_cpu_tiny.jsonl")


@pytest.mark.parametrize("output", ["detection", "classification"])
def test_the_gpu_recipe_runs_on_the_cpu(output):
    """The official row's form on a GPU: the whole model in bf16 (fp32 masters in the
    optimizer), attention cast to fp32 around the official core, the eager merge. Both paths
    give outputs of the same dtype and agree to bf16 rounding; the optimizer steps masters."""
    from helpers import tiny_config

    import piip

    torch.manual_seed(0)
    model = piip.PIIP(tiny_config(3, output=output))
    bench_model.move_offsets_off_pixel_centres(model)
    model = model.to(torch.bfloat16)
    side = model.cfg.branches[-1].image_size
    img = torch.randn(2, 3, side, side).to(torch.bfloat16)
    outs = {}
    for path in ("ours", "official"):
        model.set_execution(path, msda=bench_model.fp32_msda(None) if path == "official" else None)
        out = model(img)
        outs[path] = out if isinstance(out, list) else [out]
        sum(o.float().square().mean() for o in outs[path]).backward()
    for a, b in zip(outs["ours"], outs["official"]):
        assert a.dtype == b.dtype == torch.bfloat16
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()) < 3e-2
    opt = piip.build_optimizer(model, bench_model.TINY_RECIPE, fused=True)
    assert type(opt).__name__ == "MasterWeightAdamW"
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_kinds_of_gpu_kernel_names():
    """The per-kind table's rules on kernel names of an H200 step profile (the GPU-only path)."""
    kind = ladder._kind_of
    names = {
        "sm90_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize128x128x8_stage3": "GEMM",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": "GEMM",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
        "void piip::dca::(anonymous namespace)::backward_kernel<float, 32>(piip::dca::Params)": "our ops",
        "_dca_fwd_kernel": "our ops",
        "ms_deformable_col2im_gpu_kernel": "our ops",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)": "casts/copies",
        "Memcpy DtoD (Device -> Device)": "casts/copies",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimizer",
        "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel<c10::BFloat16, float>": "norms",
        "triton_per_fused_native_layer_norm_0": "norms",
        "triton_poi_fused_add_gelu_mul_1": "elementwise",
        "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16>>": "elementwise",
        "void at::native::(anonymous namespace)::upsample_bicubic2d_backward_out_frame<float, float>": "other",
    }
    for name, want in names.items():
        assert kind(name, False) == want, (name, kind(name, False), want)
    assert kind("aten::mul", True) == "optimizer"   # CPU: ops under Optimizer.step
