#!/usr/bin/env bash
# One prepared GPU check, meant to run in a single call on a lent GPU machine
# (H100, torch with CUDA, no internet):
#   build for sm_90 only -> backend table -> tests -> benchmarks -> short table last.
# Full logs and result files go to $OUT (default ./out). Nothing is installed
# from the network: the package builds with --no-deps against the image's torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PIIP_REQUIRE_EXT=1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
  git rev-parse --short HEAD
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

t0=$(date +%s)
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
"$PY" -c "import piip_kernels; piip_kernels.backend_report(devices=['cpu', 'cuda'])" | tee "$OUT/backends.txt"

# Tests: the whole suite, GPU tests included (CUDA and Triton backends on the GPU, all
# dtypes, awkward shapes, float64-derived tolerances, deterministic mode, NaN-poisoned memory).
# (CI runs the CPU tests; here only the GPU-facing files, to leave time for the benchmarks.)
timeout 240 "$PY" -m pytest tests/test_cuda.py tests/test_triton.py -q -p no:cacheprovider -m "gpu or not gpu" > "$OUT/tests.log" 2>&1
test_rc=$?
tail -3 "$OUT/tests.log"

# Memory checking of both GPU backends on a small case, forward and backward.
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" - > "$OUT/memcheck.log" 2>&1 <<'PYEOF'
import torch, piip_kernels
g = torch.Generator().manual_seed(0)
for backend in ("cuda", "triton"):
    for det in (False, True):
        v = torch.randn(2, 7 * 11 + 15, 3, 40, generator=g).cuda().requires_grad_()
        loc = (torch.rand(2, 9, 3, 2, 4, 2, generator=g) * 1.6 - 0.3).cuda().requires_grad_()
        w = torch.rand(2, 9, 3, 2, 4, generator=g).cuda().requires_grad_()
        shapes = torch.tensor([[7, 11], [3, 5]]).cuda()
        starts = torch.tensor([0, 77]).cuda()
        out = piip_kernels.ms_deform_attn(v, shapes, starts, loc, w, backend=backend, deterministic=det)
        torch.autograd.grad(out.sum(), (v, loc, w))
torch.cuda.synchronize()
print("memcheck case done")
PYEOF
mem_rc=$?
tail -2 "$OUT/memcheck.log"

# Benchmarks: every shape of shapes.md at batch 2 and 8, fp32 and bf16; the fused ops.
timeout 270 "$PY" bench/bench_msda.py > "$OUT/bench_msda.md" 2> "$OUT/bench_msda.log"
bench_rc=$?
timeout 90 "$PY" bench/bench_interaction.py > "$OUT/bench_interaction.md" 2> "$OUT/bench_interaction.log"
timeout 60 "$PY" bench/bench_branch_merge.py > "$OUT/bench_branch_merge.md" 2> "$OUT/bench_branch_merge.log"
cp -r bench/results "$OUT/results"

echo
echo "== summary (tests rc=$test_rc, memcheck rc=$mem_rc, bench rc=$bench_rc) =="
grep -E "^\| (case|SBL|cls|DETR)" "$OUT/bench_msda.md" | awk -F'|' '{printf "%-24s %3s %-9s %-18s fwd %8s  fwd+bwd %8s  x floor %7s / %7s\n", $2, $3, $5, $6, $7, $8, $10, $11}'
grep -E "fused|case" "$OUT/bench_interaction.md" | awk -F'|' '{printf "%-30s %-16s fwd %8s fwd+bwd %8s vs unfused %6s\n", $2, $6, $7, $8, $10}'
grep -E "branch_merge|case" "$OUT/bench_branch_merge.md" | awk -F'|' '{printf "%-14s %-9s %-22s fwd %8s x floor %7s vs eager fwd %6s fwd+bwd %6s\n", $2, $6, $7, $8, $10, $11, $12}'
exit $(( test_rc != 0 || mem_rc != 0 || bench_rc != 0 ))
