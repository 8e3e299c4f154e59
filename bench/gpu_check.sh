#!/usr/bin/env bash
# One prepared GPU check, meant to run in a single call on a lent GPU machine
# (H200, torch with CUDA, no internet):
#   build for sm_90 only -> backend table -> GPU tests -> memcheck -> kernel benchmarks ->
#   model step (two paths, then the ladder) -> Hugging Face step -> detector integrations -> memory-planner check ->
#   targets -> a short table of the stages.
# Everything fits GPU_CHECK_BUDGET_S seconds (default 560, under a 10-minute call): each
# stage gets a share of what is left, and the benchmarks measure our backends first and
# stop starting new cases when their share is spent, keeping every row measured.
# Full logs and result files go to $OUT (default ./out). Nothing is installed from the
# network: the package builds with --no-deps against the image's torch, or, with --wheel, the
# wheel built elsewhere (scripts/build_wheels.sh) is installed as it is, with --no-deps, into
# $OUT/wheel (first on PYTHONPATH; pytest runs as `python -P`, so the source tree in the
# current folder is not imported instead). Where the tree arrives without .git, pass the
# commit: PIIP_COMMIT=$(git rev-parse --short HEAD).
#
#   bash bench/gpu_check.sh             # on the GPU machine
#   bash bench/gpu_check.sh --wheel dist/piip_kernels-...whl   # the same, on the prebuilt wheel
#   bash bench/gpu_check.sh --dry-run   # on any CPU machine (CI runs it): every stage, tiny
#   bash bench/gpu_check.sh --install-only [--wheel PATH]   # build or install, the backend table, stop
#
# --dry-run runs every stage on the CPU within a few minutes and writes the same kinds of
# files under $OUT: the GPU test modules on the meta device (their harness: devices, shapes,
# dtypes; tests/helpers.py), the memcheck cases on meta, every benchmark with tiny shapes
# and budgets and its GPU-only code paths on (eager timing stands in for CUDA graphs, a
# stand-in built from our reference for the Deformable DETR kernel, labelled as such and
# never judged as it), results under $OUT/results, and targets.py on those files. The build
# is the installed one (CI has just built it), and compute-sanitizer is not run.
#
# The Deformable DETR kernel is timed beside ours when its sources are found: in
# $PIIP_ANCHOR_SRC, ../shared/anchors/deformable_detr_ops, or .anchor/deformable_detr_ops
# (an ignored folder: a session whose device machine has no ../shared copies the anchor
# there and carries it along). It is built outside the tree, in parallel with our build,
# and never becomes part of the project.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
WHEEL=""
INSTALL_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheel) WHEEL="${2:-}"; shift ;;
    --install-only) INSTALL_ONLY=1 ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--wheel PATH] [--install-only]" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# pytest's command: with a wheel, `python -P` keeps the current folder (the source tree) off
# sys.path, so the tests import the installed wheel.
PYTEST=("$PY" -m pytest)
if [ -n "$WHEEL" ]; then
  [ -f "$WHEEL" ] || { echo "gpu_check: no wheel at $WHEEL" >&2; exit 2; }
  PYTEST=("$PY" -P -m pytest)
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PIIP_REQUIRE_EXT=1
# The dry run keeps a quarter of every share: it checks the paths, it measures nothing.
SCALE=$(( DRY ? 4 : 1 ))
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-560} / SCALE ))
left() { echo $(( DEADLINE - $(date +%s) )); }
# A stage's time limit for a budget of B seconds plus EXTRA to finish its last case; the dry
# run's limits are generous instead (tiny cases, but imports and compilation on a slow, maybe
# shared CPU: a dry-run stage cut by its limit fails CI without finding a fault). Every stage's
# timeout goes through it, the GPU tests' too.
limit() { echo $(( DRY ? $1 + 240 : $1 + $2 )); }
# share CAP RESERVE: at most CAP seconds, leaving RESERVE for the later stages (at least 10).
share() { local s=$(( $(left) - $2 / SCALE )); (( s > $1 / SCALE )) && s=$(( $1 / SCALE )); (( s < 10 )) && s=10; echo $s; }

# The stages' outcomes, printed as the last table: name, exit code, seconds, log.
STAGES=()
# stage NAME LOG CMD...: runs CMD with stdout to $OUT/LOG and stderr to $OUT/<LOG's stem>.log
# (both to LOG when it ends in .log), and records the outcome.
stage() {
  local name=$1 log=$2; shift 2
  local t0 rc
  t0=$(date +%s)
  if [ "${log%.log}" != "$log" ]; then "$@" > "$OUT/$log" 2>&1; else "$@" > "$OUT/$log" 2> "$OUT/${log%.*}.log"; fi
  rc=$?
  STAGES+=("$name|$rc|$(( $(date +%s) - t0 ))|$log")
  return $rc
}

if [ "$DRY" = 1 ]; then
  # The GPU-only paths on the CPU: results under $OUT, stand-ins labelled as such.
  export PIIP_DRY_RUN=1 PIIP_ANCHOR_STANDIN=1 PIIP_RESULTS_DIR="$OUT/results"
  export PIIP_GPU_TEST_DEVICE=meta
  # The benchmarks time the CPU backends: Triton's interpreter (which the CPU test suite runs
  # the Triton kernels in, and may have left set) would take minutes on their shapes.
  unset TRITON_INTERPRET
  DEV=cpu
else
  DEV=cuda
fi

{
  if [ "$DRY" = 1 ]; then echo "dry run on the CPU ($(nproc) cores): no GPU, nothing here is a measurement"
  else nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  command -v nvcc > /dev/null && nvcc --version | tail -1
  # The tree's own commit only: a copy without .git may sit inside another repository.
  echo "commit $("$PY" -c "import sys; sys.path.insert(0, 'bench'); import common; print(common.tree_commit())")"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# The anchor kernel builds in the background while ours builds.
anchor_pid=""
if [ "$DRY" = 1 ]; then
  echo "anchor: the stand-in built from our reference (PIIP_ANCHOR_STANDIN=1)"
else
  ANCHOR_SRC=""
  for d in "${PIIP_ANCHOR_SRC:-}" ../shared/anchors/deformable_detr_ops .anchor/deformable_detr_ops; do
    [ -n "$d" ] && [ -f "$d/setup.py" ] && { ANCHOR_SRC="$d"; break; }
  done
  if [ -n "$ANCHOR_SRC" ]; then
    export PIIP_ANCHOR_DIR="${PIIP_ANCHOR_DIR:-/tmp/piip_anchor_ddetr}"
    rm -rf "$PIIP_ANCHOR_DIR" && cp -r "$ANCHOR_SRC" "$PIIP_ANCHOR_DIR"
    ( cd "$PIIP_ANCHOR_DIR" && MAX_JOBS=8 timeout 240 "$PY" setup.py build_ext --inplace ) > "$OUT/anchor_build.log" 2>&1 &
    anchor_pid=$!
  else
    echo "no Deformable DETR anchor sources found: the DETR-kernel targets will read MISSING"
  fi
fi

t0=$(date +%s)
if [ -n "$WHEEL" ]; then
  # The wheel as built elsewhere: no compiler here, only an unpack.
  rm -rf "$OUT/wheel"
  if ! "$PY" -m pip install --no-deps --no-index --target "$OUT/wheel" "$WHEEL" > "$OUT/build.log" 2>&1; then
    tail -20 "$OUT/build.log"; echo "WHEEL INSTALL FAILED"; exit 1
  fi
  export PYTHONPATH="$OUT/wheel${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -P -c "import piip_kernels, sys; from piip_kernels import _ext
assert piip_kernels.__file__.startswith(sys.argv[1]), f'piip_kernels from {piip_kernels.__file__}, not the wheel'
assert _ext.EXT is not None, _ext.EXT_ERROR
print('wheel:', sys.argv[2], 'installed in', sys.argv[1], '; CUDA kernels:', _ext.CUDA_EXT is not None, _ext.CUDA_ERROR or '')" \
    "$OUT/wheel" "$(basename "$WHEEL")" 2>&1 | tee -a "$OUT/build.log"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "WHEEL NOT USABLE"; exit 1; }
elif [ "$DRY" = 1 ]; then
  echo "build: the installed extension (dry run)" | tee "$OUT/build.log"
  "$PY" -c "import piip_kernels._C" >> "$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; echo "BUILD MISSING"; exit 1; }
elif ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"
  # The Triton backends need no build: still test them.
  timeout "$(share 300 60)" "${PYTEST[@]}" tests/test_triton.py -q -p no:cacheprovider > "$OUT/tests_triton.log" 2>&1
  tail -3 "$OUT/tests_triton.log"
  exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
"$PY" -P -c "import piip_kernels; piip_kernels.backend_report(devices=['cpu', 'cuda'])" | tee "$OUT/backends.txt"
[ "$INSTALL_ONLY" = 1 ] && exit 0

# GPU tests: CUDA and Triton backends on the GPU, all dtypes, awkward shapes, float64-derived
# tolerances, deterministic mode, NaN-poisoned memory. (CI runs the CPU tests.) The sm_90
# compile check needs no GPU and runs in CI.
per_test=""
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=90"
# One Triton config per kernel here (PIIP_TRITON_AUTOTUNE=0): the tests compile many head dims
# and dtypes, and autotuning would compile and time every config of each.
PIIP_TRITON_AUTOTUNE=0 stage "GPU tests (${PIIP_GPU_TEST_DEVICE:-cuda})" tests.log timeout -k 10 "$(limit "$(share 200 250)" 0)" \
  "${PYTEST[@]}" tests/test_cuda.py tests/test_triton.py -q -p no:cacheprovider $per_test --durations=15 \
  -m "gpu or not gpu" -k "not compile_for_sm90"
test_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
tail -1 "$OUT/tests.log"

# Memory checking of both GPU backends on a small case, forward and backward.
if [ "$DRY" = 1 ]; then
  PIIP_TRITON_AUTOTUNE=0 stage "memcheck cases (meta, no sanitizer)" memcheck.log "$PY" bench/memcheck_cases.py --device meta
else
  PIIP_TRITON_AUTOTUNE=0 stage "memcheck" memcheck.log timeout -k 5 "$(share 60 190)" \
    compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" bench/memcheck_cases.py --device cuda
fi
mem_rc=$?
tail -2 "$OUT/memcheck.log"

if [ -n "$anchor_pid" ]; then
  if wait "$anchor_pid"; then echo "anchor kernel built from $ANCHOR_SRC"; else tail -5 "$OUT/anchor_build.log"; echo "ANCHOR BUILD FAILED"; fi
fi

# Benchmarks (our backends first in each; rows are kept when a budget or timeout cuts in).
# The dry run gives each the GPU run's arguments shrunk to tiny shapes.
if [ "$DRY" = 1 ]; then
  MSDA=(--device cpu --batch 2 --dtype bfloat16 float32 --query-scale 0.005 --sets 1 --shapes "SBL 1764q" DETR)
  INTER=(--device cpu --dtype bfloat16 --query-scale 0.01)
  MERGE=(--device cpu --dtype float32 bfloat16 --channel-scale 0.01)
  MODEL=(--device cpu --tiny --steps 1 --warmup 1)
  LADDER=(--device cpu --tiny --steps 1 --warmup 1 --profile "$OUT/profile")
  HF=(--device cpu --tiny)
  INTEGRATIONS=(--device cpu --tiny)
  MEMORY=(--config piip_3branch_tsb_368-192-128_cls_token_deit1 --side 64 --batch 1 --dtype bfloat16 --validate --device cpu --quiet)
else
  MSDA=()
  INTER=()
  MERGE=()
  MODEL=(--steps 6)
  LADDER=(--config mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16 --batch 2 --dtype bfloat16 --steps 5
          --profile "$OUT/profile")
  HF=()
  INTEGRATIONS=()
  MEMORY=(--config deit_tsb_1568_1120_672 --batch 1 --dtype bfloat16 --validate --quiet)
fi
b=$(share 150 250); stage "bench_msda" bench_msda.md timeout -k 20 "$(limit "$b" 30)" "$PY" bench/bench_msda.py --budget-s "$b" "${MSDA[@]}"
bench_rc=$?
b=$(share 40 210); stage "bench_interaction" bench_interaction.md timeout -k 10 "$(limit "$b" 20)" "$PY" bench/bench_interaction.py --budget-s "$b" "${INTER[@]}"
b=$(share 30 180); stage "bench_branch_merge" bench_branch_merge.md timeout -k 10 "$(limit "$b" 15)" "$PY" bench/bench_branch_merge.py --budget-s "$b" "${MERGE[@]}"
# Model level: an SBL detection training step at full resolution, batch 2, bf16: ours against
# the official path (the DETR kernel when built), then the ladder of what each piece adds.
# (The dry run gives the model stages room for every rung: skipping one would leave its code unrun.)
b=$(share 70 110); (( DRY )) && b=240; stage "bench_model (two paths)" bench_model.md timeout -k 10 "$(limit "$b" 0)" "$PY" bench/bench_model.py --budget-s "$b" "${MODEL[@]}"
# (A cold inductor compile of the SBL model's block signatures alone may take a minute or two.)
b=$(share 180 50); (( DRY )) && b=240; stage "ladder" ladder.md timeout -k 10 "$(limit "$b" 30)" "$PY" bench/ladder.py --budget-s "$b" "${LADDER[@]}"
# transformers' detectors on our kernel: the GPU tests of the three routes (CUDA, fp32 and bf16;
# in the dry run they say they need CUDA), then one training step per model.
stage "HF GPU tests" tests_hf.log timeout -k 10 "$(limit "$(share 60 60)" 0)" "${PYTEST[@]}" tests/test_hf.py -q \
  -p no:cacheprovider -m gpu -rs
if [ -f bench/bench_hf.py ]; then
  b=$(share 90 90); stage "bench_hf" bench_hf.md timeout -k 10 "$(limit "$b" 20)" "$PY" bench/bench_hf.py --budget-s "$b" "${HF[@]}"
fi
# The detector integrations: Deformable DETR's encoder through our extension stand-in against
# the compiled Deformable DETR op (its stand-in in the dry run), and Ultralytics RT-DETR-l and
# RF-DETR (with the bit-identical deterministic check) where those packages are installed.
b=$(share 60 30); stage "bench_integrations" bench_integrations.md timeout -k 10 "$(limit "$b" 30)" \
  "$PY" bench/bench_integrations.py --budget-s "$b" "${INTEGRATIONS[@]}"
# The memory planner against the measured peak on one full-size preset.
b=$(share 30 5); stage "memory --validate" memory_validation.md timeout -k 10 "$(limit "$b" 0)" "$PY" bench/memory.py "${MEMORY[@]}"
if [ "$DRY" = 0 ]; then cp -r bench/results "$OUT/results"; fi
grep -h "left out" "$OUT"/bench_*.log

echo
echo "== summary: tests rc=$test_rc, memcheck rc=$mem_rc, bench_msda rc=$bench_rc, $(left) s of the budget left =="
if [ "$DRY" = 1 ]; then
  # The CPU backend's rows stand in for the GPU backends', so every check's code runs.
  stage "targets" targets.txt "$PY" bench/targets.py --results "$OUT/results" --device cpu --backends cpu --any-config
else
  stage "targets" targets.txt "$PY" bench/targets.py
fi
cat "$OUT/targets.txt"
echo
echo "| stage | rc | s | output |"
echo "|---|---|---|---|"
failed=0
for s in "${STAGES[@]}"; do
  IFS='|' read -r name rc secs log <<< "$s"
  echo "| $name | $rc | $secs | $log |"
  [ "$rc" = 0 ] || failed=1
done
if [ "$DRY" = 1 ]; then exit $failed; fi
exit $(( test_rc != 0 || mem_rc != 0 || bench_rc != 0 ))
