#!/usr/bin/env bash
# The integration tests against the real packages (Ultralytics, RF-DETR: tests/test_integrations_packages.py)
# and the benchmark's dry run on them, in a second virtual environment of their own: they need a
# torchvision that loads, which the CPU build of torch in the main environment does not give.
#
# Creates $PIIP_INTEGRATIONS_VENV (default .venv-integrations) when missing and installs into it,
# from the package registry (bypassing a local wheel folder or pip configuration that would
# bring the CPU build of torch), the registry's default torch at constraints.txt's version and
# requirements-integrations.txt. The environment's stamp records what it holds, so a second run
# installs nothing. The extension built in the main environment (same torch version) is used
# as it is; without one, the CPU kernels are built here (PIIP_KERNELS_NO_CUDA=1).
# PIIP_INTEGRATIONS_FRESH=1 recreates the environment. --setup-only stops once it is
# installed (CI downloads it while the main suite runs). Other arguments go to pytest.
# A missing package is a failure here (PIIP_REQUIRE_INTEGRATIONS=1), and so is "no tests
# collected" (pytest exit code 5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
VENV="${PIIP_INTEGRATIONS_VENV:-.venv-integrations}"
SETUP_ONLY=0
if [ "${1:-}" = "--setup-only" ]; then SETUP_ONLY=1; shift; fi
t0=$(date +%s)
[ "${PIIP_INTEGRATIONS_FRESH:-0}" = 1 ] && rm -rf "$VENV"
TORCH_PIN="$(grep -E '^torch==' constraints.txt)"
# Only the registry: no local wheel folder, no configuration file (its constraints pin torch's CPU build).
REGISTRY=(env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null
          PIP_DISABLE_PIP_VERSION_CHECK=1)
if [ ! -x "$VENV/bin/python" ]; then
  echo "integrations: creating $VENV" >&2
  "${REGISTRY[@]}" python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
want="$(cat constraints.txt requirements-integrations.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.piip-deps" 2>/dev/null)" != "$want" ]; then
  echo "integrations: installing $TORCH_PIN and requirements-integrations.txt into $VENV" >&2
  "${REGISTRY[@]}" "$PY" -m pip install -q "$TORCH_PIN" -r requirements-integrations.txt
  echo "$want" > "$VENV/.piip-deps"
fi
t1=$(date +%s)
echo "integrations: environment ready in $(( t1 - t0 )) s" >&2
[ "$SETUP_ONLY" = 1 ] && exit 0
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import piip_kernels._C" 2>/dev/null; then
  echo "integrations: building the CPU kernels in $VENV" >&2
  "${REGISTRY[@]}" "$PY" -m pip install -q ninja "setuptools>=64" wheel
  PIIP_KERNELS_NO_CUDA=1 "${REGISTRY[@]}" "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi
"$PY" -c "import importlib.metadata as m, piip_kernels._C; print('integrations:', ', '.join(p + ' ' + m.version(p) for p in ('torch', 'torchvision', 'ultralytics', 'rfdetr')))"
export PIIP_REQUIRE_INTEGRATIONS=1
set +e
"$PY" -m pytest tests/test_integrations_packages.py -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "integrations: pytest collected no tests" >&2
  exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
# The benchmark's code paths on the packages (tiny sizes, nothing saved).
"$PY" bench/bench_integrations.py --tiny --device cpu --cases rtdetr_l rfdetr --no-save > /dev/null
echo "integrations: tests and benchmark dry run $(( $(date +%s) - t1 )) s" >&2
