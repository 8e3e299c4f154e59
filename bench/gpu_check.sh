#!/usr/bin/env bash
# One prepared GPU check, meant to run in a single call on a lent GPU machine
# (H100, torch with CUDA, no internet):
#   build for sm_90 only -> backend table -> GPU tests -> memcheck -> kernel benchmarks ->
#   model step benchmark -> memory-planner check -> targets.
# Everything fits GPU_CHECK_BUDGET_S seconds (default 560, under a 10-minute call): each
# stage gets a share of what is left, and the benchmarks measure our backends first and
# stop starting new cases when their share is spent, keeping every row measured.
# Full logs and result files go to $OUT (default ./out). Nothing is installed from the
# network: the package builds with --no-deps against the image's torch. Where the tree
# arrives without .git, pass the commit: PIIP_COMMIT=$(git rev-parse --short HEAD).
#
# The Deformable DETR kernel is timed beside ours when its sources are found: in
# $PIIP_ANCHOR_SRC, ../shared/anchors/deformable_detr_ops, or .anchor/deformable_detr_ops
# (an ignored folder: a session whose device machine has no ../shared copies the anchor
# there and carries it along). It is built outside the tree, in parallel with our build,
# and never becomes part of the project.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PIIP_REQUIRE_EXT=1
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-560} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
# share CAP RESERVE: at most CAP seconds, leaving RESERVE for the later stages (at least 10).
share() { local s=$(( $(left) - $2 )); (( s > $1 )) && s=$1; (( s < 10 )) && s=10; echo $s; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo "${PIIP_COMMIT:-unknown} (PIIP_COMMIT; no .git here)")"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# The anchor kernel builds in the background while ours builds.
ANCHOR_SRC=""
for d in "${PIIP_ANCHOR_SRC:-}" ../shared/anchors/deformable_detr_ops .anchor/deformable_detr_ops; do
  [ -n "$d" ] && [ -f "$d/setup.py" ] && { ANCHOR_SRC="$d"; break; }
done
anchor_pid=""
if [ -n "$ANCHOR_SRC" ]; then
  export PIIP_ANCHOR_DIR="${PIIP_ANCHOR_DIR:-/tmp/piip_anchor_ddetr}"
  rm -rf "$PIIP_ANCHOR_DIR" && cp -r "$ANCHOR_SRC" "$PIIP_ANCHOR_DIR"
  ( cd "$PIIP_ANCHOR_DIR" && MAX_JOBS=8 timeout 240 "$PY" setup.py build_ext --inplace ) > "$OUT/anchor_build.log" 2>&1 &
  anchor_pid=$!
else
  echo "no Deformable DETR anchor sources found: the DETR-kernel targets will read MISSING"
fi

t0=$(date +%s)
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"
  # The Triton backends need no build: still test them.
  timeout "$(share 300 60)" "$PY" -m pytest tests/test_triton.py -q -p no:cacheprovider > "$OUT/tests_triton.log" 2>&1
  tail -3 "$OUT/tests_triton.log"
  exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
"$PY" -c "import piip_kernels; piip_kernels.backend_report(devices=['cpu', 'cuda'])" | tee "$OUT/backends.txt"

# GPU tests: CUDA and Triton backends on the GPU, all dtypes, awkward shapes, float64-derived
# tolerances, deterministic mode, NaN-poisoned memory. (CI runs the CPU tests.)
per_test=""
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=90"
# One Triton config per kernel here (PIIP_TRITON_AUTOTUNE=0): the tests compile many head dims
# and dtypes, and autotuning would compile and time every config of each.
PIIP_TRITON_AUTOTUNE=0 timeout -k 10 "$(share 200 250)" "$PY" -m pytest tests/test_cuda.py tests/test_triton.py -q \
  -p no:cacheprovider $per_test --durations=15 -m "gpu or not gpu" > "$OUT/tests.log" 2>&1
test_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
tail -1 "$OUT/tests.log"

# Memory checking of both GPU backends on a small case, forward and backward.
PIIP_TRITON_AUTOTUNE=0 timeout -k 5 "$(share 60 190)" compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" - > "$OUT/memcheck.log" 2>&1 <<'PYEOF'
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
        value = torch.randn(2, 5 * 7, 4, 24, generator=g).cuda().requires_grad_()
        off = torch.randn(2, 3 * 4, 4, 4, 2, generator=g).mul(3).cuda().requires_grad_()
        logits = torch.randn(2, 3 * 4, 4, 4, generator=g).cuda().requires_grad_()
        out = piip_kernels.deform_cross_attn(value, (5, 7), off, logits, (3, 4), backend=backend, deterministic=det)
        torch.autograd.grad(out.sum(), (value, off, logits))
    feats = [torch.randn(2, 8, s, s + 1, generator=g).cuda().requires_grad_() for s in (3, 5, 9)]
    wts = torch.rand(3, generator=g).cuda().requires_grad_()
    out = piip_kernels.branch_merge(feats, wts, (9, 10), backend=backend)
    torch.autograd.grad(out.sum(), feats + [wts])
torch.cuda.synchronize()
print("memcheck cases done")
PYEOF
mem_rc=$?
tail -2 "$OUT/memcheck.log"

if [ -n "$anchor_pid" ]; then
  if wait "$anchor_pid"; then echo "anchor kernel built from $ANCHOR_SRC"; else tail -5 "$OUT/anchor_build.log"; echo "ANCHOR BUILD FAILED"; fi
fi

# Benchmarks (our backends first in each; rows are kept when a budget or timeout cuts in).
b=$(share 150 190); timeout -k 20 $(( b + 30 )) "$PY" bench/bench_msda.py --budget-s "$b" > "$OUT/bench_msda.md" 2> "$OUT/bench_msda.log"
bench_rc=$?
b=$(share 40 145); timeout -k 10 $(( b + 20 )) "$PY" bench/bench_interaction.py --budget-s "$b" > "$OUT/bench_interaction.md" 2> "$OUT/bench_interaction.log"
b=$(share 30 110); timeout -k 10 $(( b + 15 )) "$PY" bench/bench_branch_merge.py --budget-s "$b" > "$OUT/bench_branch_merge.md" 2> "$OUT/bench_branch_merge.log"
# Model level: an SBL detection training step at full resolution, batch 2, bf16, ours against the
# official path (the DETR kernel when built), then the memory planner against
# torch.cuda.max_memory_allocated on one full-size preset.
b=$(share 80 30); timeout -k 10 "$b" "$PY" bench/bench_model.py --steps 6 > "$OUT/bench_model.md" 2> "$OUT/bench_model.log"
b=$(share 30 5); timeout -k 10 "$b" "$PY" bench/memory.py --config deit_tsb_1568_1120_672 --batch 1 --dtype bfloat16 --validate --quiet \
  > "$OUT/memory_validation.md" 2> "$OUT/memory_validation.log"
cp -r bench/results "$OUT/results"
grep -h "left out" "$OUT"/bench_*.log

echo
echo "== summary: tests rc=$test_rc, memcheck rc=$mem_rc, bench_msda rc=$bench_rc, $(left) s of the budget left =="
"$PY" bench/targets.py | tee "$OUT/targets.txt"
exit $(( test_rc != 0 || mem_rc != 0 || bench_rc != 0 ))
