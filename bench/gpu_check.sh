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

# Tests: the whole suite. Until the CUDA and Triton backends land it holds no GPU-specific
# tests, so on a GPU this checks the build and the CPU paths against the image's torch.
timeout 300 "$PY" -m pytest tests -q -x -p no:cacheprovider > "$OUT/tests.log" 2>&1
test_rc=$?
tail -3 "$OUT/tests.log"

# Benchmarks: every shape of shapes.md at batch 2 and 8, fp32 and bf16.
timeout 240 "$PY" bench/bench_msda.py > "$OUT/bench_msda.md" 2> "$OUT/bench_msda.log"
bench_rc=$?
cp -r bench/results "$OUT/results"

echo
echo "== summary (tests rc=$test_rc, bench rc=$bench_rc) =="
grep -E "^\| (case|SBL|cls|DETR)" "$OUT/bench_msda.md" | awk -F'|' '{printf "%-24s %3s %-9s %-18s fwd %8s  fwd+bwd %8s  x floor %7s\n", $2, $3, $5, $6, $7, $8, $10}'
exit $(( test_rc != 0 || bench_rc != 0 ))
