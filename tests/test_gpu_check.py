"""The GPU-only code paths, run on the CPU: the faults the first GPU run met, each caught
here, and bench/gpu_check.sh --dry-run as a whole (what CI runs before any GPU minute)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import piip_kernels
from helpers import dca_grads, dca_inputs, merge_grads, merge_inputs, msda_inputs, run_with_grads

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")


def test_gradient_helpers_put_grad_output_beside_the_output():
    """The first GPU run: grad_output made on the CPU for CUDA outputs failed 111 tests
    ("invalid gradient at index 0"). On meta the same mismatch raises the same error."""
    inputs = [t.to(META) for t in msda_inputs([(5, 7), (2, 3)], Lq=4, M=2, D=8, P=2)]
    got, grad_out = run_with_grads(lambda *a: piip_kernels.ms_deform_attn(*a, backend="cuda"), inputs)
    assert all(t.device == META for t in got) and grad_out.device.type == "cpu"
    assert got[1].shape == inputs[0].shape and got[2].shape == inputs[3].shape
    got, _ = dca_grads(lambda *a: piip_kernels.deform_cross_attn(*a, backend="triton"),
                       [t.to(META) for t in dca_inputs()], (5, 7), (3, 4))
    assert all(t.device == META for t in got)
    feats, w = merge_inputs([(3, 3), (5, 6)])
    got, _ = merge_grads(lambda f, w, s, a: piip_kernels.branch_merge(f, w, s, align_corners=a, backend="cuda"),
                         [f.to(META) for f in feats], w.to(META), (5, 6))
    assert all(t.device == META for t in got) and got[0].shape == (2, 3, 5, 6)


def test_meta_tensors_still_refuse_what_a_backend_refuses():
    inputs = [t.to(META) for t in msda_inputs([(3, 4)], dtype=torch.float64)]
    with pytest.raises(RuntimeError, match="triton.*float64|float64.*triton|dtype torch.float64"):
        piip_kernels.ms_deform_attn(*inputs, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        piip_kernels.ms_deform_attn(*inputs, backend="tpu")


def test_non_contiguous_input_test_keeps_its_view_on_the_device(monkeypatch):
    """The first GPU run: .to(cuda) compacted the non-contiguous CPU view, so the test's
    own assertion failed and it tested nothing. Run on meta, the test must pass as written."""
    import test_cuda

    monkeypatch.setattr(test_cuda, "DEV", META)
    test_cuda.test_nan_poisoned_memory_and_non_contiguous_inputs()


def _bench_msda(monkeypatch, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_msda

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would take minutes here
    monkeypatch.setenv("PIIP_DRY_RUN", "1")
    monkeypatch.setenv("PIIP_ANCHOR_STANDIN", "1")
    monkeypatch.setenv("PIIP_RESULTS_DIR", str(tmp_path))
    return bench_msda


def test_bench_msda_reaches_the_anchor_path(monkeypatch, tmp_path):
    """The first GPU run: with the DETR kernel importable, bench_msda hashed its shape rows
    (which hold lists) and crashed before measuring anything. The stand-in takes that path."""
    bench_msda = _bench_msda(monkeypatch, tmp_path)
    rows = bench_msda.main(["--device", "cpu", "--batch", "2", "--dtype", "bfloat16", "float32", "--query-scale", "0.01",
                            "--sets", "1", "--shapes", "SBL 1764q", "cls 144q", "--no-compiled-reference"])
    standin = [r for r in rows if r["backend"] == bench_msda.STANDIN]
    # One fp32 measurement per (shape, batch) serves both dtypes.
    assert sorted((r["case"], r["dtype"]) for r in standin) == [("SBL 1764q 70x70 D32", "float32"), ("cls 144q 8x8 D12", "float32")]
    ours = [r for r in rows if r["backend"] == "cpu"]
    assert len(ours) == 4 and all(r["fwd_vs_detr_standin"] > 0 and r["fwd_gpu_ms"] > 0 for r in ours)
    # A stand-in is never reported as the anchor.
    assert not any("fwd_vs_detr_live" in r or r["backend"] == bench_msda.ANCHOR for r in rows)
    assert (tmp_path / "msda_cpu.jsonl").exists()


def test_targets_never_judge_a_stand_in(monkeypatch, tmp_path):
    bench_msda = _bench_msda(monkeypatch, tmp_path)
    bench_msda.main(["--device", "cpu", "--batch", "2", "--dtype", "bfloat16", "--query-scale", "0.01", "--sets", "1",
                     "--shapes", "cls 144q", "--no-compiled-reference"])
    sys.path.insert(0, str(ROOT / "bench"))
    import targets

    lines = targets.msda_checks(targets.latest(tmp_path, "msda_cpu"), ("cpu",))
    vs = [(s, line) for s, line in lines if "vs DETR kernel, PIIP shapes" in line]
    assert vs and all(s == "MISSING" and "stand-in" in line for s, line in vs)


def test_commit_of_a_copy_without_git_inside_another_repository(tmp_path, monkeypatch):
    """The first GPU run: the tree arrived without .git inside another repository, and the
    check printed that repository's commit. Only this tree's own repository counts."""
    parent = tmp_path / "parent"
    tree = parent / "tree"
    (tree / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "common.py", tree / "bench" / "common.py")
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    subprocess.run(git + ["init", "-q", str(parent)], check=True)
    (parent / "README").write_text("another project\n")
    subprocess.run(git + ["-C", str(parent), "add", "README"], check=True)
    subprocess.run(git + ["-C", str(parent), "commit", "-q", "-m", "x"], check=True)
    parent_commit = subprocess.run(["git", "-C", str(parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip()
    code = "import sys; sys.path.insert(0, sys.argv[1]); import common; print(common.tree_commit())"
    env = {k: v for k, v in os.environ.items() if k != "PIIP_COMMIT"}
    got = subprocess.run([sys.executable, "-c", code, str(tree / "bench")], capture_output=True, text=True, env=env).stdout
    assert parent_commit not in got and got.startswith("unknown")
    got = subprocess.run([sys.executable, "-c", code, str(tree / "bench")], capture_output=True, text=True,
                         env=dict(env, PIIP_COMMIT="abc1234")).stdout.strip()
    assert got == "abc1234"
    # In this clone, the clone's own commit.
    here = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    got = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench")], capture_output=True, text=True, env=env).stdout
    assert got.startswith(here)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """bash bench/gpu_check.sh --dry-run: every stage on the CPU, the same kinds of files."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIIP_DRY", "PIIP_ANCHOR", "PIIP_RESULTS", "PIIP_GPU_TEST"))}
    env.update(OUT=str(out), PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    table = res.stdout[res.stdout.rindex("| stage | rc |"):]
    stages = re.findall(r"^\| (.+?) \| (\d+) \| \d+ \| .+ \|$", table, re.M)
    names = [n for n, _ in stages]
    for want in ("GPU tests (meta)", "memcheck cases (meta, no sanitizer)", "bench_msda", "bench_interaction",
                 "bench_branch_merge", "bench_model (two paths)", "bench_model --ladder", "HF GPU tests", "bench_hf", "bench_integrations", "memory --validate",
                 "targets"):
        assert want in names, f"stage {want!r} did not run: {names}"
    assert all(rc == "0" for _, rc in stages), table
    assert re.search(r"\d+ passed", (out / "tests.log").read_text())
    assert "commit " in (out / "device.txt").read_text() and "dry run" in (out / "device.txt").read_text()
    for name in ("msda", "interaction", "branch_merge", "memory_validation", "hf", "integrations"):
        text = (out / "results" / f"{name}_cpu.jsonl").read_text()
        assert '"dry_run"' in text, name
    assert "detr stand-in" in (out / "bench_msda.md").read_text()
    assert "DRY RUN records" in (out / "targets.txt").read_text()
    # Nothing of a dry run lands among the committed results.
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "bench/results"], capture_output=True,
                            text=True).stdout
    assert "jsonl" not in status or os.environ.get("PIIP_ALLOW_DIRTY_RESULTS"), status
