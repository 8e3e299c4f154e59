# Sourced by run.sh and test.sh: creates or reuses the project's virtual environment,
# installs what the project needs into it, and builds the extension.
#
# An active virtual environment is used as it is. Otherwise $PIIP_VENV (default .venv)
# is created when missing and activated. Dependencies are installed when the
# environment has not yet seen this constraints.txt + requirements-dev.txt (a stamp
# file in the environment records it), so a second run only rebuilds the extension.
# torch comes first and everything else is installed under constraints.txt, which pins
# torch, so no dependency can swap the CPU build for a CUDA one.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -z "${VIRTUAL_ENV:-}" ]; then
  PIIP_VENV="${PIIP_VENV:-.venv}"
  if [ ! -x "$PIIP_VENV/bin/python" ]; then
    echo "piip: creating the virtual environment $PIIP_VENV" >&2
    python3 -m venv "$PIIP_VENV"
  fi
  . "$PIIP_VENV/bin/activate"
fi
_stamp="$VIRTUAL_ENV/.piip-deps"
_want="$(cat constraints.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "piip: installing dependencies into $VIRTUAL_ENV" >&2
  # An environment that already has torch (say a CUDA build) keeps it.
  python -c "import torch" 2>/dev/null || python -m pip install -q -c constraints.txt torch
  python -m pip install -q -c constraints.txt -r requirements-dev.txt
  echo "$_want" > "$_stamp"
fi
echo "piip: building the extension" >&2
python -m pip install -q --no-build-isolation --no-deps -e .
