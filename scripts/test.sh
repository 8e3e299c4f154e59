#!/usr/bin/env bash
# The project's test command (README): builds the extension into the active
# environment, then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import piip_kernels; piip_kernels.backend_report()"
python -m pytest tests -q "$@"
