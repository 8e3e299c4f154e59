#!/usr/bin/env bash
# Checks the published wheel (scripts/build_wheels.sh) the way a user gets it: too slow
# for every CI run (each torch is a 1 to 4 GB environment), so run by hand after a build,
# its last output kept in bench/results/wheel_check.txt:
#
#   bash scripts/check_wheel.sh [WHEEL] 2>&1 | tee bench/results/wheel_check.txt
#
# 1. the file: cp310-abi3 and a manylinux tag, under 100 MB (the registry's file limit);
# 2. each binary: no at::/c10::/torch:: symbol (nm -D), no libgomp, libtorch_python, torch
#    CUDA library or CUDA runtime in NEEDED, the newest GLIBC symbol version it needs;
# 3. the CUDA binary: machine code for every arch of setup.WHEEL_ARCHS and the PTX (cuobjdump,
#    from the registry's nvidia-cuda-cuobjdump, installed here when missing);
# 4. for each torch in $PIIP_CHECK_TORCH (default: 2.14.1, the newest here; 2.10.0, the oldest
#    the binaries target, CUDA 12.8; 2.11.0 under Python 3.12, the GPU machine's pair; all the
#    registry's CUDA builds), an entry VERSION or VERSION:PYTHON: an environment with that
#    torch, the wheel installed with --no-deps (no rebuild), the CPU op tests run against it,
#    and the CUDA kernels either loaded and registered (a CUDA 13 torch: no GPU is needed for
#    that) or refused with the reason backend_report() gives (any other torch).
# 5. build/hub, loaded by the kernels library of the active environment ($PIIP_HUB_PYTHON,
#    default python): the variant its resolver picks, computing what the reference does.
# Environments live in $PIIP_CHECK_VENVS/torch-<version>[-py<python>] (default
# build/check-venvs) and are reused when present.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEEL="${1:-$(ls dist/piip_kernels-*.whl 2>/dev/null | head -1)}"
[ -f "$WHEEL" ] || { echo "check_wheel: no wheel (bash scripts/build_wheels.sh writes dist/)" >&2; exit 1; }
WHEEL=$(realpath "$WHEEL")
TORCHES="${PIIP_CHECK_TORCH:-2.14.1 2.10.0 2.11.0:3.12}"
VENVS="${PIIP_CHECK_VENVS:-$ROOT/build/check-venvs}"
PY="${PIIP_CHECK_PYTHON:-python3}"
FAIL=0
fail() { echo "FAIL: $*"; FAIL=1; }

echo "== check_wheel $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "wheel: $(basename "$WHEEL") ($(du -m "$WHEEL" | cut -f1) MB, $(stat -c %s "$WHEEL") bytes)"
case "$(basename "$WHEEL")" in
  *-cp310-abi3-manylinux_*_x86_64.whl) echo "ok: cp310-abi3, manylinux tag: $(basename "$WHEEL" | sed 's/.*-abi3-\(.*\)\.whl/\1/')" ;;
  *) fail "the wheel is not cp310-abi3 manylinux" ;;
esac
[ "$(stat -c %s "$WHEEL")" -lt 100000000 ] || fail "the wheel is over 100 MB"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m zipfile -e "$WHEEL" "$WORK/unpacked"
for so in "$WORK"/unpacked/piip_kernels/_C*.so; do
  name=$(basename "$so")
  cxx=$(nm -D -C "$so" | grep -cE '\b(at|c10|torch)::' || true)
  [ "$cxx" = 0 ] && echo "ok: $name has no at::/c10::/torch:: symbol" || fail "$name has $cxx at::/c10::/torch:: symbols"
  needed=$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
  echo "   $name NEEDED: $needed"
  if echo "$needed" | grep -qE 'lib(gomp|torch_python|torch_cuda|c10_cuda|cudart|python3)'; then fail "$name needs $needed"; fi
  echo "   $name newest GLIBC symbol: $(nm -D "$so" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)," \
       "GLIBCXX: $(nm -D "$so" | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -1)"
done

CUDA_SO="$WORK/unpacked/piip_kernels/_C_cuda.abi3.so"
if [ -f "$CUDA_SO" ]; then
  CUOBJDUMP=$(command -v cuobjdump || ls "$VENVS"/tools/lib/python*/site-packages/nvidia/cu13/bin/cuobjdump 2>/dev/null | head -1 || true)
  if [ -z "$CUOBJDUMP" ]; then
    "$PY" -m venv "$VENVS/tools" && "$VENVS/tools/bin/pip" install -q nvidia-cuda-cuobjdump
    CUOBJDUMP=$(ls "$VENVS"/tools/lib/python*/site-packages/nvidia/cu13/bin/cuobjdump | head -1)
  fi
  elfs=$("$CUOBJDUMP" --list-elf "$CUDA_SO" | grep -o 'sm_[0-9]*' | sort -uV | tr '\n' ' ')
  ptx=$("$CUOBJDUMP" --list-ptx "$CUDA_SO" | grep -o 'sm_[0-9]*' | sort -uV | tr '\n' ' ')
  echo "   cuobjdump: machine code for $elfs; PTX for $ptx"
  archs=$(cd "$ROOT" && "$PY" -c 'import re, sys; sys.argv = ["x"]; exec(re.search(r"WHEEL_ARCHS = .*", open("setup.py").read()).group(0)); print(WHEEL_ARCHS)')
  for a in $(echo "$archs" | tr ';' ' '); do
    sm="sm_$(echo "${a%+PTX}" | tr -d .)"
    echo " $elfs" | grep -q " $sm " && echo "ok: $sm machine code" || fail "no $sm machine code"
    if [ "${a%+PTX}" != "$a" ]; then echo " $ptx" | grep -q " $sm " && echo "ok: $sm PTX" || fail "no $sm PTX"; fi
  done
else
  echo "   (no CUDA binary in this wheel)"
fi

for ENTRY in $TORCHES; do
  T="${ENTRY%%:*}"
  PYV=""; VPY="$PY"
  if [ "$T" != "$ENTRY" ]; then PYV="${ENTRY#*:}"; VPY="python$PYV"; fi
  V="$VENVS/torch-$T${PYV:+-py$PYV}"
  echo "== torch $T${PYV:+, Python $PYV} ($V)"
  if [ ! -x "$V/bin/python" ] || ! "$V/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$T')" 2>/dev/null; then
    rm -rf "$V"
    "$VPY" -m venv "$V"
    "$V/bin/pip" install -q "torch==$T" numpy pytest > "$WORK/pip.log" 2>&1 || { tail -5 "$WORK/pip.log"; fail "torch $T did not install"; continue; }
  fi
  "$V/bin/pip" install -q --no-deps --force-reinstall "$WHEEL"
  # Outside the source tree, so that `import piip_kernels` is the installed wheel.
  (cd "$WORK" && "$V/bin/python" - "$ROOT" <<'EOF') || fail "torch $T: the wheel's kernels did not load as expected"
import sys
import torch
import piip_kernels
from piip_kernels import _ext
site = piip_kernels.__file__
assert sys.prefix in site and sys.argv[1] not in site, f"not the installed wheel: {site}"
print(f"   torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}, piip_kernels from {site}")
assert _ext.EXT is not None, _ext.EXT_ERROR
ops = sorted({n for n, _ in _ext._KERNELS})
cpu = [n for n in ops if _ext.has_kernel(n, "CPU")]
cuda = [n for n in ops if _ext.has_kernel(n, "CUDA")]
print(f"   CPU kernels: {', '.join(cpu)}")
print(f"   CUDA kernels: {', '.join(cuda) or 'none'}; why not: {_ext.CUDA_ERROR}")
assert len(cpu) == 6, cpu
if torch.version.cuda is not None and torch.version.cuda.split(".")[0] == "13":
    assert _ext.CUDA_EXT is not None, _ext.CUDA_ERROR
    assert len(cuda) == 7, cuda
    print(f"ok: CUDA kernels registered (built with CUDA {_ext.CUDA_EXT.CUDA_VERSION} for {_ext.CUDA_EXT.ARCHS})")
else:
    assert not cuda and _ext.CUDA_ERROR, "CUDA kernels must stay off under this torch"
    report = piip_kernels.backend_report(devices=["cuda"], file=open("/dev/null", "w"))
    assert _ext.CUDA_ERROR in report
    print("ok: CUDA kernels off, and backend_report() says why")
EOF
  # The CPU op tests on the installed wheel (the compiled backends against the reference).
  (cd "$WORK" && "$V/bin/python" -m pytest -q -p no:cacheprovider -m "not gpu and not triton and not slow" \
      "$ROOT/tests/test_msda.py" "$ROOT/tests/test_fused_ops.py" "$ROOT/tests/test_stable_abi.py" 2>&1 | tail -3) \
    | tee "$WORK/pytest.log"
  grep -qE '^[0-9]+ passed' "$WORK/pytest.log" && ! grep -qE 'failed|error' "$WORK/pytest.log" \
    && echo "ok: op tests pass under torch $T" || fail "op tests under torch $T"
done

# 5. The hub build beside the wheel (build/hub), loaded by the kernels library of the active
#    environment: its resolver picks the variant for that torch, and the variant computes.
HUBPY="${PIIP_HUB_PYTHON:-python}"
if [ -d "$ROOT/build/hub/build" ] && "$HUBPY" -c "import kernels, torch" 2>/dev/null; then
  echo "== hub: build/hub with the kernels library of $("$HUBPY" -c 'import sys; print(sys.prefix)')"
  (cd "$WORK" && "$HUBPY" - "$ROOT/build/hub" <<'EOF') || fail "the hub build did not load or compute"
import sys
from pathlib import Path

import kernels
import torch
from kernels._internals.variants import get_variants_local, resolve_variant

variant, _ = resolve_variant(get_variants_local(Path(sys.argv[1]) / "build"))
kernel = kernels.get_local_kernel(Path(sys.argv[1]))
print(f"   variants: {', '.join(sorted(p.name for p in (Path(sys.argv[1]) / 'build').iterdir()))}")
print(f"   the resolver picks {variant.variant_str} for torch {torch.__version__}; ops under torch.ops.{kernel.NAMESPACE}")
shapes = torch.tensor([[6, 5], [3, 2]])
starts = torch.tensor([0, 30])
value, loc, attn = torch.randn(2, 36, 2, 8), torch.rand(2, 7, 2, 2, 3, 2), torch.rand(2, 7, 2, 2, 3)
sys.path.insert(0, str(Path(sys.argv[1]) / "build" / variant.variant_str))
from reference import ms_deform_attn_reference  # the variant's own copy of the specification
torch.testing.assert_close(kernel.ms_deform_attn(value, shapes, starts, loc, attn),
                           ms_deform_attn_reference(value, shapes, starts, loc, attn))
print("ok: the hub variant matches the reference")
EOF
fi

[ "$FAIL" = 0 ] && echo "== check_wheel: all checks passed" || echo "== check_wheel: FAILED"
exit "$FAIL"
